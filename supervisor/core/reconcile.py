"""Reconciliation: desired services vs what runs -> a list of named actions. Pure.

Vocabulary
    slot       a replica's position 0..replicas-1 within its service (stable across
               restarts and revisions; instance ids change, slots do not)
    replica    what a runtime runs for a slot: ``model.Replica`` (plain data, from the daemon)
    current    a replica of the revision the service should run (``is_current``: the one
               place the revision is compared). The daemon passes the *target* revision
               (``revisions.target_revision``: the spec without ``replicas``, changed by
               a rolling restart's token), so scaling keeps running replicas.

Per service and slot, in this order (one ordered pass, like ``syncDeployment``):

1. service no longer desired -> every replica stopped (``ORPHAN``)
2. slot >= replicas -> stopped (``SCALE_DOWN``: the highest slots go)
3. a current replica runs -> keep the best (ready, alive, newest), stop the rest
   (``DUPLICATE``/``OUTDATED``), forget exited ones; kill it if a probe says dead
4. only an old revision runs -> stop it and start the current one (``OUTDATED``)
5. only exited replicas -> restart policy and back-off decide: restart now, ``Wait`` until
   the back-off ends, or leave it exited (``never``/clean on-failure). A restart is placed
   anew with the node it failed on ranked below every equally good node
   (``Request.failed_on``: Nomad's reschedule penalty), so a replica that keeps failing
   on a bad node moves; after a clean exit no node is avoided. A service with volumes
   restarts on its node: its data is there.
6. nothing -> place a new replica (``place``) or report why it cannot (``Unplaceable``)

Volumes (``volumes.py``): every replica placed is pinned to the node its node-local
volumes live on (``pinned_request``). A service with a per-replica volume has one writer
per slot: a slot whose previous replica is still being retired gets a ``Wait`` (not a
start beside it), and an old revision's replica is stopped first and replaced once it is
gone (``ONE_WRITER``).

Catalog registrations follow: a kept running replica not registered -> ``Register``; a
registration of the service with no kept running replica behind it -> ``Deregister``.
Stop and Kill deregister first themselves (deregistered BEFORE stopped). A start the
runtime refused holds its slot for a back-off (``Observed.holds``): a Start there becomes
a ``Wait`` until the hold ends (``apply_holds``).

A service in ``Observed.rolling`` has a rollout in progress, paused or failed: the rollout
engine (``rollout.py``, planned by ``rollout_plan.py``) owns which revisions run where, so
reconcile neither stops a replica for its revision, slot or duplicate (no ``OUTDATED``,
``DUPLICATE``, ``SCALE_DOWN``), nor starts the target revision in a free slot. It still
kills a replica whose liveness probe failed, restarts an exited replica of the target
revision under the restart policy (the engine counts those restarts), and keeps the
catalog in step with every running replica. Exited replicas of other revisions are the
engine's to clean up. Replicas being retired (``Replica.terminating``) are their
retirement's: reconcile neither keeps nor restarts them, and they hold no slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import config

from .backoff import BackoffState, decide
from .model import (Action, Deregister, Kill, Observed, Register, Replica, Start, Stop, StopReason,
                    Unplaceable, Wait, summary)
from .placement import Allocation, Placement, Request, place
from .placement_fleet import requests_of
from .volumes import one_writer, pin

__all__ = ["reconcile", "reconcile_service", "is_current", "allocations", "summary", "apply_holds",
           "pinned_request", "ORPHAN", "SCALE_DOWN", "DUPLICATE", "OUTDATED", "EXITED", "STALE",
           "PROBE_FAILED", "HELD", "ONE_WRITER", "NODE_RETURNED", "DRAINED", "REBALANCED", "MOVING"]

ORPHAN, SCALE_DOWN, DUPLICATE, OUTDATED, EXITED, STALE, PROBE_FAILED, NODE_RETURNED, DRAINED, REBALANCED = \
    tuple(StopReason)
MOVING = "moving off its node (drain or rebalance): its replacement starts first"
HELD = "the runtime refused the last start; trying again after a back-off"
ONE_WRITER = "waiting for the slot's previous replica to stop: it holds the slot's per-replica volume"
# A slot waiting for its previous replica looks again this often at the latest (the
# retirement's end enqueues the service at once; this is the safety net).
_ONE_WRITER_RECHECK = 1.0


def pinned_request(spec: config.ServiceSpec, slot: int, homes: Mapping[str, str],
                   failed_on: str | None = None) -> Request:
    """The placement request of a replica of ``slot``, pinned where its volumes live."""
    node, why = pin(spec, slot, homes)
    return Request(spec, slot, failed_on=failed_on, pinned_to=node, pinned_by=why)


def apply_holds(actions: Sequence[Action], holds: Mapping[tuple[str, int], float],
                now: float) -> list[Action]:
    """``actions`` with every Start of a held slot (the runtime refused its last start, and
    the back-off has not passed) turned into a Wait until the hold ends."""
    out: list[Action] = []
    for a in actions:
        hold = holds.get((a.service, a.slot)) if isinstance(a, Start) else None
        out.append(Wait(a.service, a.slot, hold, HELD) if hold is not None and now < hold else a)
    return out


def is_current(replica: Replica, revision: str) -> bool:
    """The one place revisions are compared."""
    return replica.revision == revision


def _rank(r: Replica) -> tuple[bool, bool, bool, float]:
    # a replica that came back with its lost node never wins over its replacement
    return (not r.stale, r.ready, r.alive, r.started_at or 0.0)


def allocations(desired: Mapping[str, tuple[config.ServiceSpec, str]],
                replicas: Sequence[Replica], starting: Sequence[Allocation] = ()) -> list[Allocation]:
    """What running replicas reserve: their requests (a retired one holds its room until
    it is gone), and ``starting``: the room of starts decided but not yet running
    (``Observed.starting``), so that two services placed at once never share it."""
    out = list(starting)
    for r in replicas:
        if r.running and r.service in desired:
            req = desired[r.service][0].resources.requests
            out.append(Allocation(r.node, r.service, req.cpu or 0.0, req.memory or 0))
    return out


def reconcile_service(name: str, desired: Mapping[str, tuple[config.ServiceSpec, str]],
                      observed: Observed, now: float) -> list[Action]:
    """The actions for service ``name`` (desired or not). Replicas being retired are left
    alone (their retirement is under way) and hold no slot."""
    mine = observed.of(name)
    actions: list[Action] = []
    kept: set[str] = set()
    handled: set[str] = set()

    def stop(r: Replica, reason: str) -> None:
        actions.append(Stop(r.instance_id, r.service, r.slot, r.node, reason))
        handled.add(r.instance_id)

    if name not in desired:
        for r in sorted(mine, key=lambda r: r.slot):
            stop(r, ORPHAN)
    elif name in observed.rolling:
        _rolling(name, desired, observed, now, mine, actions, kept, handled, stop)
    else:
        spec, revision = desired[name]
        node_names = {n.name for n in observed.nodes}
        homes = observed.volume_homes
        by_slot: dict[int, list[Replica]] = {}
        for r in mine:
            by_slot.setdefault(r.slot, []).append(r)
        # one writer per slot: a slot whose replica is being retired starts nothing yet
        stopping = {r.slot for r in observed.replicas if r.service == name and r.terminating} \
            if one_writer(spec) else set()
        for slot in sorted(s for s in by_slot if s >= spec.replicas):
            for r in by_slot[slot]:
                stop(r, SCALE_DOWN)
        to_place: list[Request] = []
        restarts: dict[int, tuple[BackoffState, str]] = {}
        draining = observed.draining_nodes()
        moves: list[tuple[int, Replica]] = []     # (slot, replica on a draining node)
        in_flight = 0                             # moves whose replacement is starting
        for slot in range(spec.replicas):
            group = by_slot.get(slot, [])
            running = [r for r in group if r.running]
            exited = sorted((r for r in group if not r.running),
                            key=lambda r: (r.finished_at or 0.0, r.instance_id))
            state = observed.backoff.get((name, slot), BackoffState())
            current = [r for r in running if is_current(r, revision)]
            if current:
                keep = max(current, key=_rank)
                moving = None
                leaves = _leaving(draining, observed.moves.get((name, slot)))
                if leaves(keep):
                    keep, moving = _drain_pair(keep, current, leaves)
                    if moving is not None:
                        # its replacement is not ready yet: both stay, the old one serves
                        kept.add(moving.instance_id)
                        handled.add(moving.instance_id)
                        in_flight += 1
                    elif leaves(keep) and keep.alive:
                        moves.append((slot, keep))
                for r in running:
                    if r is not keep and r is not moving:
                        stop(r, _why_extra(r, keep, revision, leaves, draining))
                for r in exited:
                    stop(r, STALE)
                if keep.alive:
                    kept.add(keep.instance_id)
                else:
                    actions.append(Kill(keep.instance_id, name, slot, keep.node, PROBE_FAILED))
                    handled.add(keep.instance_id)
                continue
            if running:
                for r in running:
                    stop(r, OUTDATED)
                for r in exited:
                    stop(r, STALE)
                if one_writer(spec):      # replaced once it is gone, never beside it
                    actions.append(Wait(name, slot, now + _ONE_WRITER_RECHECK, ONE_WRITER))
                    continue
                node = max(running, key=_rank).node
                actions.append(Start(name, slot, revision, node, BackoffState(), OUTDATED))
                continue
            if slot in stopping:
                actions.append(Wait(name, slot, now + _ONE_WRITER_RECHECK, ONE_WRITER))
                continue
            if exited:
                last = exited[-1]
                for r in exited[:-1]:
                    stop(r, STALE)
                if not is_current(last, revision):
                    stop(last, OUTDATED)
                    if last.node in node_names:
                        actions.append(Start(name, slot, revision, last.node, BackoffState(), OUTDATED))
                    else:
                        to_place.append(pinned_request(spec, slot, homes))
                    continue
                _restart_exited(spec, revision, last, state, node_names, now, stop, actions, to_place, restarts,
                                homes)
                continue
            to_place.append(pinned_request(spec, slot, homes))
        if moves and not to_place and one_writer(spec):
            # one writer per slot: the old replica stops first (one slot at a time) and its
            # slot is placed anew once it is gone
            if not stopping:
                slot, old = moves[0]
                stop(old, DRAINED if old.node in draining else REBALANCED)
        elif moves and not to_place:
            # a drain or a rebalance moves replicas like a rolling update: max_surge at a
            # time (at least one), each replacement started before its predecessor stops
            room = max(1, _surge(spec)) - in_flight
            for slot, old in moves[:max(0, room)]:
                target = observed.moves.get((name, slot))
                to_place.append(Request(spec, slot, pinned_to=target, pinned_by=f"meshlet rebalance moves it to {target}")
                                if target is not None and old.node not in draining
                                else pinned_request(spec, slot, homes))
                restarts[slot] = (observed.backoff.get((name, slot), BackoffState()), MOVING)
        if to_place:
            running_others = [r for r in observed.replicas
                              if r.terminating or r.instance_id not in handled or r.service != name]
            result = _place_with_hints(name, to_place, by_slot, observed,
                                       allocations(desired, running_others, observed.starting))
            for req, node in result.placed:
                state, why = restarts.get(req.slot) or (
                    observed.backoff.get((name, req.slot), BackoffState()),
                    "new replica" if not by_slot.get(req.slot) else EXITED)
                actions.append(Start(name, req.slot, revision, node, state, why))
            for req, reason in result.failed:
                if restarts.get(req.slot, (None, ""))[1] == MOVING:
                    reason = f"cannot move off its node: {reason}"
                actions.append(Unplaceable(name, req.slot, reason))
    actions = apply_holds(actions, observed.holds, now)
    by_id = {r.instance_id: r for r in mine}
    for iid in sorted(kept):
        if iid not in observed.registered:
            actions.append(Register(iid, name))
    retiring = {r.instance_id for r in observed.replicas if r.terminating}
    lost = observed.lost_nodes()
    on_lost = {r.instance_id for r in observed.replicas if r.node in lost}
    for iid, service in sorted(observed.registered.items()):
        if service == name and iid not in kept and iid not in handled and iid not in retiring:
            r = by_id.get(iid)
            why = ("its node is lost" if iid in on_lost else "no such replica" if r is None
                   else "exited" if not r.running else "not kept")
            actions.append(Deregister(iid, name, why))
    return actions


def _place_with_hints(name: str, to_place: list[Request], by_slot: Mapping[int, list[Replica]],
                      observed: Observed, existing: list[Allocation]) -> Placement:
    """``place`` for a service's new replicas, where the joint placement of every service
    waiting at once (``Observed.hints``, ``core.joint``) put them when that node can
    still hold them; the rest (and any slot with a history: a restart or a move) as
    ``place`` decides alone."""
    hinted = [(r, observed.hints[(name, r.slot)]) for r in to_place
              if (name, r.slot) in observed.hints and not by_slot.get(r.slot) and r.pinned_to is None]
    if not hinted:
        return place(to_place, observed.nodes, existing)
    existing = list(existing)
    placed: list[tuple[Request, str]] = []
    rest = [r for r in to_place if not any(r is h for h, _ in hinted)]
    by_name = {n.name: n for n in observed.nodes}
    for req, node in hinted:
        got = place([req], [by_name[node]], existing) if node in by_name else Placement()
        if got.placed:
            placed.append((req, node))
            cpu, mem = requests_of(req.spec)
            existing.append(Allocation(node, req.spec.name, cpu, mem))
        else:
            rest.append(req)
    others = place(rest, observed.nodes, existing)
    return Placement(tuple(placed) + others.placed, others.failed)


def _leaving(draining: frozenset[str], move_to: str | None) -> Callable[[Replica], bool]:
    """Must a replica of the slot leave its node: the node drains, or ``meshlet rebalance``
    moves the slot to ``move_to``?"""
    def leaves(r: Replica) -> bool:
        return r.node in draining or (move_to is not None and r.node != move_to)
    return leaves


def _drain_pair(keep: Replica, current: Sequence[Replica],
                leaves: Callable[[Replica], bool]) -> tuple[Replica, Replica | None]:
    """The slot's kept replica must leave its node: (the replica to keep, the replacement
    starting where it goes that must stay too). A ready replacement is kept and the old
    one goes (DRAINED / REBALANCED); one not ready yet stays beside the old one, which
    serves."""
    arrived = [r for r in current if not leaves(r) and r.alive]
    if not arrived:
        return keep, None
    new = max(arrived, key=_rank)
    return (new, None) if new.ready else (keep, new)


def _why_extra(r: Replica, keep: Replica, revision: str, leaves: Callable[[Replica], bool],
               draining: frozenset[str]) -> str:
    """Why a running replica beside the slot's kept one is stopped."""
    if not is_current(r, revision):
        return OUTDATED
    if r.stale:
        return NODE_RETURNED
    if leaves(r) and not leaves(keep):
        return DRAINED if r.node in draining else REBALANCED
    return DUPLICATE


def _surge(spec: config.ServiceSpec) -> int:
    """The rolling update's max_surge as a number of replicas (a percentage rounds up)."""
    surge = spec.update.max_surge
    if isinstance(surge, str) and surge.endswith("%"):
        return -(-spec.replicas * int(float(surge[:-1])) // 100)
    return int(surge or 0)


def _restart_exited(spec: config.ServiceSpec, revision: str, last: Replica, state: BackoffState,
                    node_names: set[str], now: float, stop: Callable[[Replica, str], None],
                    actions: list[Action], to_place: list[Request],
                    restarts: dict[int, tuple[BackoffState, str]], homes: Mapping[str, str]) -> None:
    """``last``, the newest exited replica of its slot, per the restart policy: nothing
    (policy says no), Wait (backing off), or stop it and place it again, away from the
    node it failed on when it failed (``restarts`` gets the slot's next back-off state and
    reason for the Start); a service with volumes starts again on its node if it is there."""
    d = decide(spec.restart, state, exit_code=last.exit_code, started_at=last.started_at,
               finished_at=last.finished_at if last.finished_at is not None else now,
               failed=last.killed)
    if not d.restart:
        return
    if now < d.at:
        actions.append(Wait(last.service, last.slot, d.at, d.reason))
        return
    stop(last, EXITED)
    if spec.volumes and last.node in node_names:
        actions.append(Start(last.service, last.slot, revision, last.node, d.state, d.reason))
        return
    failed = last.killed or last.exit_code != 0      # an unknown code counts as a failure
    to_place.append(pinned_request(spec, last.slot, homes, failed_on=last.node if failed else None))
    restarts[last.slot] = (d.state, d.reason)


def _rolling(name: str, desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed,
             now: float, mine: Sequence[Replica], actions: list[Action], kept: set[str],
             handled: set[str], stop: Callable[[Replica, str], None]) -> None:
    """A service under rollout: keep every running replica (kill the dead ones), restart
    exited replicas of the target revision; revisions and slots are the engine's."""
    spec, revision = desired[name]
    node_names = {n.name for n in observed.nodes}
    by_slot: dict[int, list[Replica]] = {}
    for r in mine:
        by_slot.setdefault(r.slot, []).append(r)
    to_place: list[Request] = []
    restarts: dict[int, tuple[BackoffState, str]] = {}
    for slot in sorted(by_slot):
        group = by_slot[slot]
        for r in group:
            if not r.running:
                continue
            if r.alive:
                kept.add(r.instance_id)
            else:
                actions.append(Kill(r.instance_id, name, slot, r.node, PROBE_FAILED))
                handled.add(r.instance_id)
        exited = sorted((r for r in group if not r.running and is_current(r, revision)),
                        key=lambda r: (r.finished_at or 0.0, r.instance_id))
        if not exited or slot >= spec.replicas:
            continue
        if any(r.running and is_current(r, revision) for r in group):
            for r in exited:
                stop(r, STALE)
            continue
        last = exited[-1]
        for r in exited[:-1]:
            stop(r, STALE)
        _restart_exited(spec, revision, last, observed.backoff.get((name, slot), BackoffState()),
                        node_names, now, stop, actions, to_place, restarts, observed.volume_homes)
    if to_place:
        others = [r for r in observed.replicas
                  if r.terminating or r.instance_id not in handled or r.service != name]
        result = place(to_place, observed.nodes, allocations(desired, others, observed.starting))
        for req, node in result.placed:
            state, why = restarts.get(req.slot) or (observed.backoff.get((name, req.slot), BackoffState()), EXITED)
            actions.append(Start(name, req.slot, revision, node, state, why))
        for req, reason in result.failed:
            actions.append(Unplaceable(name, req.slot, reason))


def reconcile(desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed,
              now: float) -> list[Action]:
    """Every service's actions: desired ones, then orphans (replicas or registrations
    of services no longer desired), in name order."""
    names = set(desired) | {r.service for r in observed.replicas} | set(observed.registered.values())
    out: list[Action] = []
    for name in sorted(names):
        out.extend(reconcile_service(name, desired, observed, now))
    return out
