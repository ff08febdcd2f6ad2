"""``meshlet rebalance``: which running replicas to move so the fleet looks as placement
would place it now. Pure. On request only, never by surprise.

Placement decides one replica at a time as replicas come and go, so a fleet drifts: nodes
added after a service started stay empty under ``spread``, replicas of a ``binpack``
service stay scattered after a scale-down. ``plan_rebalance`` looks at each movable
replica as if it were placed again with everything else where it is (``explain``); it
moves when another node ranks strictly better by what the strategy is about: the
``spread_over`` groups, the replicas of the service on the node (spread), or filling a
node in use over keeping one open (binpack), or a fit better by more than ``MIN_GAIN``.
Equal standing never moves a replica, so a balanced fleet plans nothing, and the plan is
made of few moves. Each move is counted before the next is looked at.

Not moved: replicas of a service under rollout, of a service whose volumes pin it or
that needs one writer per slot, replicas not ready, and replicas on nodes that are lost.
The moves are carried out by reconcile like a drain (``Observed.moves``): the replacement
starts on the target node, and the old replica stops once it is ready, max_surge at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import config

from .model import Observed, Replica
from .placement import Allocation, Request, explain
from .reconcile import is_current
from .volumes import is_node_local, mounted, one_writer

__all__ = ["Move", "plan_rebalance", "MIN_GAIN", "MAX_PASSES"]

MIN_GAIN = 0.1        # a fit this much better is worth a move on its own
MAX_PASSES = 3


@dataclass(frozen=True, slots=True)
class Move:
    service: str
    slot: int
    instance_id: str
    source: str
    target: str

    def describe(self) -> str:
        return f"{self.service} slot {self.slot}: {self.source} -> {self.target}"


def _better(best: tuple, here: tuple) -> bool:
    """``best`` ranks above ``here`` by something other than the node's name, and by
    more than a sliver of fit. Keys are ``placement_score.rank_key`` tuples (lower wins),
    ending with (-fit or -worth, node name): what comes before is discrete."""
    if best[:-1] >= here[:-1]:
        return False
    if best[:-2] != here[:-2]:
        return True
    return here[-2] - best[-2] > MIN_GAIN


def plan_rebalance(desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed) -> list[Move]:
    lost = observed.lost_nodes()
    movable: list[Replica] = []
    for r in observed.replicas:
        entry = desired.get(r.service)
        if (entry is None or r.service in observed.rolling or not r.running or not r.ready or r.terminating
                or r.stale or r.node in lost or not is_current(r, entry[1])):
            continue
        spec = entry[0]
        if one_writer(spec) or any(is_node_local(vol) for _, vol in mounted(spec)):
            continue
        movable.append(r)
    # one replica per slot: a slot mid-move (two running) is left to finish
    per_slot: dict[tuple[str, int], int] = {}
    for r in observed.replicas:
        if r.running and not r.terminating:
            per_slot[(r.service, r.slot)] = per_slot.get((r.service, r.slot), 0) + 1
    movable = [r for r in movable if per_slot.get((r.service, r.slot)) == 1]
    where = {r.instance_id: r.node for r in observed.replicas}
    running = [r for r in observed.replicas if r.running and r.node not in lost]
    moves: dict[str, Move] = {}
    for _ in range(MAX_PASSES):
        changed = False
        for r in sorted(movable, key=lambda r: (r.service, r.slot)):
            spec = desired[r.service][0]
            others = [Allocation(where[x.instance_id], x.service, *_req(desired, x)) for x in running
                      if x.instance_id != r.instance_id and x.service in desired]
            others += list(observed.starting)
            verdicts = explain(Request(spec, r.slot), observed.nodes, others).verdicts
            scored = [v for v in verdicts if v.score is not None]
            here = next((v for v in scored if v.node == where[r.instance_id]), None)
            if not scored or here is None or scored[0].node == here.node:
                continue
            if not _better(scored[0].score.key, here.score.key):   # type: ignore[union-attr]
                continue
            target = scored[0].node
            where[r.instance_id] = target
            if target == r.node:
                moves.pop(r.instance_id, None)     # moved away and back: no move
            else:
                moves[r.instance_id] = Move(r.service, r.slot, r.instance_id, r.node, target)
            changed = True
        if not changed:
            break
    return sorted(moves.values(), key=lambda m: (m.service, m.slot))


def _req(desired: Mapping[str, tuple[config.ServiceSpec, str]], r: Replica) -> tuple[float, int]:
    req = desired[r.service][0].resources.requests
    return req.cpu or 0.0, req.memory or 0
