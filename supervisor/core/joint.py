"""Placing every waiting replica of every service at once. Pure.

The supervisor syncs each service on its own, so a whole config applied to an empty
fleet would be placed one service at a time, in whatever order the syncs run: first fit,
not first-fit-decreasing, and no packing search. ``joint_hints`` places every replica
that no service has placed yet (slots with no replica at all, of services not under
rollout and not pinned by volumes) in one ``place`` call, as ``meshlet plan`` does, and
hands each service's reconcile the node chosen for each of its slots
(``Observed.hints``). Reconcile starts a hinted slot there if the node can still hold it
(``reconcile._place_with_hints``), else places it alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import config

from .model import Observed
from .placement import Request, place
from .reconcile import allocations
from .volumes import homes_of

__all__ = ["waiting_slots", "joint_hints"]


def waiting_slots(desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed) -> list[tuple[str, int]]:
    """(service, slot) of every slot with no replica at all (running, exited or starting)."""
    have = {(r.service, r.slot) for r in observed.replicas if r.node not in observed.lost_nodes()}
    starting = {a.service for a in observed.starting}
    out = []
    for name, (spec, _rev) in sorted(desired.items()):
        if name in observed.rolling or name in starting:
            continue
        for slot in range(spec.replicas):
            if (name, slot) not in have and not homes_of(spec, slot):
                out.append((name, slot))
    return out


def joint_hints(desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed) -> dict[tuple[str, int], str]:
    """Where one ``place`` call over every waiting slot puts each; empty with fewer than
    two services waiting (one service alone is placed the same by its own sync)."""
    waiting = waiting_slots(desired, observed)
    if len({svc for svc, _ in waiting}) < 2:
        return {}
    requests = [Request(desired[svc][0], slot) for svc, slot in waiting]
    result = place(requests, observed.nodes, allocations(desired, observed.replicas, observed.starting))
    return {(req.spec.name, req.slot): node for req, node in result.placed}
