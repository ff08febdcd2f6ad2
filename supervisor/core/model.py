"""What the pure core decides over, and what it asks the shell to do. Plain frozen data.

Inputs
    ``Replica``   one replica the supervisor knows of (any revision, running or exited,
                  being retired or not), as facts: built by the daemon from the runtime's
                  report, the probes and the catalog's acknowledgements.
    ``Observed``  everything a decision about one service may look at: replicas, catalog
                  registrations, nodes, restart back-off per slot, start holds, the
                  services whose revisions the rollout engine owns, and where node-local
                  volumes live.

Actions (the daemon carries them out in ``daemon/supervisor.py``, and nothing else)
    ``Start``       start a replica of a revision in a slot on a node (register it at once,
                    its check critical until its readiness passes), with a Meta weight
    ``Stop``        retire it: deregister, drain, wait for requests in flight, stop with the
                    grace period, remove. In the background; never blocks a sync.
    ``Kill``        deregister and stop, keeping the exited replica (a failed liveness or
                    startup probe): its exit then goes through the restart policy
    ``Register`` / ``Deregister``   a catalog registration
    ``SetWeight``   re-register with a new Meta weight (a canary step)
    ``Wait``        nothing to do for the slot before ``at``: look again then
    ``Unplaceable`` no node can run the slot now; the reason is the service's problem

Every ``Stop`` carries a ``StopReason`` (or the rollout engine's ``RetireReason``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Union

from .backoff import BackoffState
from .placement import Allocation, NodeInfo

__all__ = ["Replica", "Observed", "StopReason", "Start", "Stop", "Kill", "Register", "Deregister",
           "SetWeight", "Wait", "Unplaceable", "Action", "summary"]


class StopReason(StrEnum):
    """Why reconcile stops a replica."""
    ORPHAN = "service no longer desired"
    SCALE_DOWN = "scaled down"
    DUPLICATE = "duplicate of the slot's kept replica"
    OUTDATED = "revision replaced"
    EXITED = "exited; replaced by a new replica"
    STALE = "old exited replica of the slot"
    PROBE_FAILED = "liveness/startup probe failed"
    NODE_RETURNED = "its node was lost and came back: the slot was replaced meanwhile"
    DRAINED = "its node is draining: moved to another node"
    REBALANCED = "meshlet rebalance moved it to another node"


@dataclass(frozen=True, slots=True)
class Replica:
    instance_id: str
    service: str
    slot: int
    revision: str
    node: str
    running: bool
    ready: bool = False                # running and its readiness probe passes
    alive: bool = True                 # False: a liveness/startup probe failed
    started_at: float | None = None
    finished_at: float | None = None   # for exited ones: when it exited (or was noticed)
    exit_code: int | None = None
    killed: bool = False               # meshlet killed it for a failed probe
    serving: bool = False              # ready, not killed, and the catalog acknowledged it passing
    ready_since: float | None = None   # when readiness last turned passing
    weight: int = 1                    # its catalog Meta weight
    terminating: bool = False          # being retired (deregistered, draining, stopping)
    stale: bool = False                # it ran on a node while the node was lost: replaced


@dataclass(frozen=True, slots=True)
class Observed:
    replicas: tuple[Replica, ...] = ()
    registered: Mapping[str, str] = field(default_factory=dict)   # instance id -> service
    nodes: tuple[NodeInfo, ...] = ()
    backoff: Mapping[tuple[str, int], BackoffState] = field(default_factory=dict)
    rolling: frozenset[str] = frozenset()     # services whose revisions the rollout engine owns
    # (service, slot) -> no start before this time: the runtime refused the last one
    holds: Mapping[tuple[str, int], float] = field(default_factory=dict)
    # (service, slot, revision) -> the last line the newest exit of that revision there wrote
    last_output: Mapping[tuple[str, int, str], str] = field(default_factory=dict)
    # the room of starts decided and under way (not yet replicas): placement counts it
    starting: tuple[Allocation, ...] = ()
    # where node-local volumes live (``volumes.home_key`` -> node): their replicas are pinned
    volume_homes: Mapping[str, str] = field(default_factory=dict)
    # (service, slot) -> the node ``meshlet rebalance`` moves the slot's replica to
    moves: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # (service, slot) -> where the joint placement of every waiting replica puts a new one
    hints: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def of(self, service: str) -> list[Replica]:
        """The service's replicas that are not being retired and not on a lost node."""
        lost = self.lost_nodes()
        return [r for r in self.replicas if r.service == service and not r.terminating
                and r.node not in lost]

    def lost_nodes(self) -> frozenset[str]:
        """Nodes unreachable past the grace period: what ran there counts as gone."""
        return frozenset(n.name for n in self.nodes if n.lost)

    def draining_nodes(self) -> frozenset[str]:
        return frozenset(n.name for n in self.nodes if n.draining and not n.lost)


@dataclass(frozen=True, slots=True)
class Start:
    service: str
    slot: int
    revision: str
    node: str
    backoff: BackoffState
    reason: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Stop:
    """Retire: deregister, drain, stop (grace period) and remove, in the background."""
    instance_id: str
    service: str
    slot: int
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    """Deregister and stop, keeping the exited replica: its exit then goes through the
    restart policy and back-off like any other exit."""
    instance_id: str
    service: str
    slot: int
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Register:
    instance_id: str
    service: str


@dataclass(frozen=True, slots=True)
class Deregister:
    instance_id: str
    service: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetWeight:
    instance_id: str
    service: str
    weight: int
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do for the slot before ``at``: look again then (a follow-up)."""
    service: str
    slot: int
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    service: str
    slot: int
    reason: str


Action = Union[Start, Stop, Kill, Register, Deregister, SetWeight, Wait, Unplaceable]


def summary(actions: list[Action] | tuple[Action, ...]) -> dict[str, int]:
    """Structured log fields: counts per action type (``{"start": 2, "stop": 1}``)."""
    out: dict[str, int] = {}
    for a in actions:
        key = type(a).__name__.lower()
        out[key] = out.get(key, 0) + 1
    return out
