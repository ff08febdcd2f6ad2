"""Node health and an operator's say over a node: pure.

A node is *ready* while its engine answers (and its event stream is alive). When it stops
answering it is *unreachable* from then on: it takes no new replica, but what it runs is
left alone, since an engine restart or a short partition must not move a fleet. Past the
grace period (``mesh.node_grace``, 30 s by default: Nomad's heartbeat grace, Kubernetes'
node-monitor-grace-period) it is *lost*: its replicas count as gone and are placed again
elsewhere. When a lost node answers again, whatever still runs there of a replaced slot is
stopped by the ordinary reconcile (``Replica.stale``).

An operator cordons a node (no new replicas), drains it (cordon, and its replicas move
off as in a rolling update) or uncordons it (both undone). That state lives in the
catalog (``meshlet/nodes/<name>``) so a restarted or standby supervisor keeps it::

    {"cordoned": true, "draining": false, "at": 1765000000.0}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["NodeHealth", "NodeControl", "observe", "availability", "parse_control", "control_doc",
           "DEFAULT_GRACE"]

DEFAULT_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class NodeHealth:
    reachable: bool = True
    since: float | None = None        # unreachable since (None: reachable)
    lost: bool = False                # unreachable for longer than the grace period
    error: str | None = None          # the engine's last answer when unreachable
    cpu: float | None = None          # what the engine reports (for nodes without declared capacity)
    memory: int | None = None


@dataclass(frozen=True, slots=True)
class NodeControl:
    cordoned: bool = False
    draining: bool = False


def observe(h: NodeHealth, ok: bool, now: float, grace: float, *, error: str | None = None,
            cpu: float | None = None, memory: int | None = None) -> NodeHealth:
    """The node's health after one look: ``ok`` the engine answered (with ``cpu`` and
    ``memory``, when it says)."""
    if ok:
        return NodeHealth(True, None, False, None, cpu if cpu is not None else h.cpu,
                          memory if memory is not None else h.memory)
    since = h.since if h.since is not None else now
    return replace(h, reachable=False, since=since, lost=now - since >= grace, error=error)


def availability(h: NodeHealth, c: NodeControl) -> str | None:
    """Why the node takes no new replica now (placement's filter reason), or None."""
    if not h.reachable:
        at = time.strftime("%H:%M:%S", time.localtime(h.since or 0))
        what = "lost" if h.lost else "unreachable"
        return f"node {what} (engine not answering since {at}" + (f": {h.error})" if h.error else ")")
    if c.draining:
        return "node draining"
    if c.cordoned:
        return "node cordoned"
    return None


def parse_control(raw: bytes | None) -> NodeControl:
    """A stored document; anything unreadable counts as no say at all."""
    if not raw:
        return NodeControl()
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        return NodeControl()
    if not isinstance(doc, dict):
        return NodeControl()
    return NodeControl(doc.get("cordoned") is True or doc.get("draining") is True, doc.get("draining") is True)


def control_doc(c: NodeControl, now: float) -> bytes:
    return json.dumps({"cordoned": c.cordoned, "draining": c.draining, "at": now}).encode()
