"""A service's rollout bookkeeping around the engine: when one begins, what the engine
observes, and what its step means for replicas and history. Pure.

The rollout engine (``rollout.py``) decides one step from ``ObservedReplica``s. Around it
the supervisor has to decide more, and all of that is here, over plain data:

    begin         a desired revision (``revisions.target_revision``) differs from the
                  rollout's: record it in the history and start a rollout, unless nothing
                  of another revision runs (a first deploy: reconcile starts it, and the
                  revision is marked complete once every replica is ready)
    observe       ``model.Replica`` facts -> ``ObservedReplica``s: the phase of each replica
                  (an exited one of the target that the restart policy restarts counts as
                  starting), its restarts in this rollout, its slot's last exit code
    plan_step     ``rollout_step`` and what its actions mean: a ``StartReplica`` placed
                  (beside the slot's old replica, else anywhere it fits) becomes a
                  ``model.Start`` (or ``Wait`` while the slot is held, ``Unplaceable`` when
                  nothing fits), ``RetireReplica`` a ``model.Stop``, ``SetWeight`` a
                  ``model.SetWeight``; ``MarkFailed``/``MarkComplete``/``Revert`` change the
                  history (a revert records the target again, with its restart token)

Counts (``Counts``): the target's crashes per slot (restarts of a new replica), refused
starts per slot, the slot's last exit code, and which exits were counted (so an exit seen
twice, or again after a supervisor restart, counts once). ``crash_doc`` / ``read_crash_doc``
are their KV form (``meshlet/rollout/<service>/crashes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import config

from .backoff import BackoffState, decide
from .model import Action, Observed, Replica, SetWeight, Start, Stop, Unplaceable, Wait
from .placement import place_beside
from .reconcile import HELD, allocations, pinned_request
from .rollout import pause, rollout_step, start_rollout
from .rollout_history import EntryStatus, mark_revision, record
from .volumes import one_writer
from .rollout_types import (COMPLETE, EXITED, FAILED, PAUSED, PROGRESSING, READY, REVERTING, STARTING,
                            TERMINATING, MarkComplete, MarkFailed, ObservedReplica, RetireReplica,
                            Revert, RolloutState, SetWeight as EngineSetWeight, SlotRefusal,
                            StartReplica, Strategy)

__all__ = ["ENGINE_OWNS", "Counts", "count_exit", "count_start", "crash_doc", "read_crash_doc",
           "Begun", "begin", "observe", "StepPlan", "plan_step", "spec_of_revision"]

# Phases in which the engine owns which revisions run where (reconcile leaves them alone).
ENGINE_OWNS = (PROGRESSING, PAUSED, FAILED, REVERTING)


# ---------------------------------------------------------------- counts

@dataclass(frozen=True, slots=True)
class Counts:
    """One service's counts for the rollout to its target revision."""
    crashes: Mapping[int, int] = field(default_factory=dict)     # slot -> restarts of the target
    refused: Mapping[int, int] = field(default_factory=dict)     # slot -> refused starts of the target
    last_exit: Mapping[int, int] = field(default_factory=dict)   # slot -> exit code of its last crash
    counted: frozenset[str] = frozenset()                        # exits already counted


def count_exit(counts: Counts, state: RolloutState | None, r: Replica) -> Counts:
    """An exit of ``r`` (a crash, a kill, or found exited at start): a restart of the
    rollout's target, counted once per instance. Anything else leaves the counts."""
    if r.instance_id in counts.counted or r.terminating or state is None \
            or state.phase not in ENGINE_OWNS or r.revision != state.revision:
        return counts
    last_exit = dict(counts.last_exit)
    if r.exit_code is not None:
        last_exit[r.slot] = r.exit_code
    else:   # not witnessed (adopted): an older code would be taken for this exit's
        last_exit.pop(r.slot, None)
    return Counts({**counts.crashes, r.slot: counts.crashes.get(r.slot, 0) + 1}, counts.refused,
                  last_exit, counts.counted | {r.instance_id})


def count_start(counts: Counts, slot: int, started: bool) -> Counts:
    """A start of the target in ``slot``: a refused one counts (a crash the engine cannot
    see, as no replica exists), one that started clears the slot's refusals."""
    refused = dict(counts.refused)
    if started:
        refused.pop(slot, None)
    else:
        refused[slot] = refused.get(slot, 0) + 1
    return dataclasses.replace(counts, refused=refused)


def crash_doc(revision: str, counts: Counts, live: Collection[str] | None = None) -> dict[str, Any] | None:
    """The ``crashes`` key's value for a rollout to ``revision`` (None: nothing to keep).
    ``live``: the instance ids that still exist (one gone is never observed again, so its
    id need not be kept); None keeps every counted id."""
    counted = counts.counted if live is None else counts.counted & frozenset(live)
    if not (counts.crashes or counts.refused or counted):
        return None
    return {"revision": revision, "crashes": {str(k): v for k, v in sorted(counts.crashes.items())},
            "refused": {str(k): v for k, v in sorted(counts.refused.items())}, "counted": sorted(counted)}


def read_crash_doc(value: Any, revision: str) -> Counts | None:
    """The counts of a ``crashes`` value, if it is about ``revision``; None when it is about
    another revision (an older rollout). ValueError if malformed."""
    if not isinstance(value, dict) or not isinstance(value.get("revision"), str):
        raise ValueError(f"expected an object with a revision, got {str(value)[:80]!r}")
    if value["revision"] != revision:
        return None
    counts = []
    for name in ("crashes", "refused"):
        d = value.get(name) or {}
        if not isinstance(d, dict) or not all(k.isdigit() and isinstance(v, int) and v >= 0
                                              for k, v in d.items()):
            raise ValueError(f"{name}: expected {{slot: count}}, got {str(d)[:80]!r}")
        counts.append({int(k): v for k, v in d.items()})
    counted = value.get("counted") or []
    if not isinstance(counted, list) or not all(isinstance(i, str) for i in counted):
        raise ValueError(f"counted: expected a list of instance ids, got {str(counted)[:80]!r}")
    return Counts(counts[0], counts[1], {}, frozenset(counted))


# ---------------------------------------------------------------- which spec

def spec_of_revision(applied: config.ServiceSpec, applied_target: str, history: Sequence[Mapping[str, Any]],
                     revision: str) -> tuple[config.ServiceSpec, str | None]:
    """The spec replicas of ``revision`` run, and a problem to report if its history entry
    is unreadable: the applied spec for the applied target (and for revisions the history
    does not know, adopted from before any history), else its history entry's spec with
    the applied ``replicas`` (a revert goes back on the template, not the scale)."""
    if revision == applied_target:
        return applied, None
    problems = []
    for e in reversed(history):
        if e.get("revision") == revision and isinstance(e.get("spec"), dict):
            try:
                spec = config.ServiceSpec.from_dict(e["spec"], source=f"history of {applied.name}")
            except (config.ConfigError, ValueError, TypeError) as exc:
                problems.append(f"history entry {e.get('number')} of {applied.name}: {exc}")
                continue
            return dataclasses.replace(spec, replicas=applied.replicas), None
    return applied, "; ".join(problems) or None


# ---------------------------------------------------------------- begin

@dataclass(frozen=True, slots=True)
class Begun:
    """What ``begin`` changed: the state (None: no rollout state), the history, whether a
    new rollout started (its counts start at zero), and a problem to log."""
    state: RolloutState | None
    history: list[dict[str, Any]]
    started: bool = False
    problem: str | None = None


def begin(service: str, spec: config.ServiceSpec, want: str, token: str | None,
          state: RolloutState | None, history: Sequence[Mapping[str, Any]], replicas: Sequence[Replica],
          paused: str | None, now: float) -> Begun | None:
    """A sync's first look at ``service``, whose replicas should run ``want``. None: nothing
    to change. ``paused``: the CLI's pause reason when the rollout is to wait (None: not
    paused). ``replicas``: every replica of the service."""
    history = [dict(e) for e in history]
    if state is not None and want in (state.revision, state.reverted_from):
        return None
    others = [r for r in replicas if r.running and r.revision != want and not r.terminating]
    if not others:
        # A first deploy (or everything on it already): reconcile starts it; no rollout.
        problem = None
        if not history or history[-1].get("revision") != want:
            history, problem = record(history, want, spec.to_dict(), token, now, spec.update.history)
        done = first_complete(service, spec, want, token, history, replicas, now)
        return done if done is not None else Begun(None, history, problem=problem)
    history, problem = record(history, want, spec.to_dict(), token, now, spec.update.history)
    new_state = start_rollout(service, want, history, now, restart_token=token)
    if paused is not None:
        new_state = pause(new_state, paused)
    return Begun(new_state, history, started=True, problem=problem)


def first_complete(service: str, spec: config.ServiceSpec, want: str, token: str | None,
                   history: Sequence[Mapping[str, Any]], replicas: Sequence[Replica],
                   now: float) -> Begun | None:
    """No rollout state, and the history's active entry is ``want``: once every replica of
    it is ready it is marked complete (a later auto-revert target) and the state says so."""
    last = history[-1] if history else None
    if last is None or spec.replicas == 0 or last["revision"] != want or last["status"] != EntryStatus.ACTIVE:
        return None
    ready = sum(1 for r in replicas if r.revision == want and r.running and r.ready)
    if ready < spec.replicas:
        return None
    state = RolloutState(service, want, COMPLETE, now, now, restart_token=token,
                         reason=f"deployed {want}: {ready} ready")
    return Begun(state, mark_revision(history, want, EntryStatus.COMPLETE))


# ---------------------------------------------------------------- observe

def _restarts(r: Replica, spec: config.ServiceSpec, backoff: BackoffState, now: float) -> bool:
    if r.slot >= spec.replicas:
        return False
    return decide(spec.restart, backoff, exit_code=r.exit_code, started_at=r.started_at,
                  finished_at=r.finished_at if r.finished_at is not None else now, failed=r.killed).restart


def observe(state: RolloutState, replicas: Sequence[Replica], spec: config.ServiceSpec, counts: Counts,
            backoff: Mapping[tuple[str, int], BackoffState], now: float,
            last_output: Mapping[tuple[str, int, str], str] | None = None) -> list[ObservedReplica]:
    """The engine's view of every replica of ``state.service`` (``replicas``: all of them,
    retired and exited ones included). One exited replica of the target stands for its
    slot (the newest), and only when nothing of the target runs there."""
    target = state.revision
    running_new = {r.slot for r in replicas if r.running and r.revision == target and not r.terminating}
    latest_exit: dict[int, Replica] = {}
    for r in replicas:
        if not r.running and r.revision == target and not r.terminating and r.slot not in running_new:
            prev = latest_exit.get(r.slot)
            if prev is None or (prev.finished_at or 0) < (r.finished_at or 0):
                latest_exit[r.slot] = r
    out = []
    for r in replicas:
        restarts = counts.crashes.get(r.slot, 0) if r.revision == target else 0
        ready_since = None
        if r.terminating:
            phase = TERMINATING
        elif not r.running:
            if r.revision == target:
                if latest_exit.get(r.slot) is not r:
                    continue
                phase = STARTING if _restarts(r, spec, backoff.get((r.service, r.slot), BackoffState()), now) \
                    else EXITED
            else:
                phase = EXITED
        elif r.serving:
            # ready once the catalog says so: an old replica is never retired before its
            # replacement is passing where proxies and DNS read it
            phase, ready_since = READY, r.ready_since if r.ready_since is not None else now
        else:
            phase = STARTING
        last_exit = output = None
        if r.revision == target:   # its own exit, or the slot's last crash before it
            last_exit = r.exit_code if not r.running else counts.last_exit.get(r.slot)
            output = (last_output or {}).get((r.service, r.slot, target))
        out.append(ObservedReplica(r.instance_id, r.slot, r.revision, phase, ready_since, restarts,
                                   r.weight, last_exit=last_exit, last_output=output))
    return out


# ---------------------------------------------------------------- step

@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step, decided: the new state and history, the replica actions to carry out,
    when to look again, whether a revert began (counts and holds start afresh), the
    engine's fields for the log, and the phase it left (for a note when it changes)."""
    state: RolloutState
    history: list[dict[str, Any]]
    actions: tuple[Action, ...] = ()
    followup_at: float | None = None
    reverted: bool = False
    failed: str | None = None            # why the revision failed (MarkFailed), for the log
    fields: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None           # an unreadable history, for the log


def plan_step(service: str, state: RolloutState, history: Sequence[Mapping[str, Any]],
              spec: config.ServiceSpec, applied: config.ServiceSpec,
              effective: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed,
              counts: Counts, start_errors: Mapping[int, str], now: float) -> StepPlan | None:
    """The next step of the rollout of ``service`` (None when it is not progressing or
    reverting). ``spec``: the spec of the target revision; ``applied``: the applied one
    (a revert records with its history limit); ``effective``: (spec, revision) of every
    desired service, for the room replicas take; ``start_errors``: the runtime's last
    refusal per slot."""
    if state.phase not in (PROGRESSING, REVERTING):
        return None
    mine = [r for r in observed.replicas if r.service == service]
    strategy = Strategy.from_spec(spec.replicas, spec.update, one_writer=one_writer(spec))
    refused = {slot: SlotRefusal(n, start_errors.get(slot) or "the runtime refused to start it")
               for slot, n in counts.refused.items()}
    result = rollout_step(state, observe(state, mine, spec, counts, observed.backoff, now, observed.last_output),
                          strategy, now, refused)
    new_state, hist = result.state, [dict(e) for e in history]
    actions: list[Action] = []
    reverted, failed, problem = False, None, None
    placed: list[Replica] = list(observed.replicas)
    for a in result.actions:
        if isinstance(a, StartReplica):
            actions.append(_start(service, a, spec, mine, effective, observed, placed, now))
        elif isinstance(a, RetireReplica):
            r = next((r for r in mine if r.instance_id == a.instance_id), None)
            if r is not None:
                actions.append(Stop(r.instance_id, service, r.slot, r.node, f"retired: {a.reason}"))
        elif isinstance(a, EngineSetWeight):
            actions.append(SetWeight(a.instance_id, service, a.weight, a.reason))
        elif isinstance(a, MarkFailed):
            failed = a.reason
            hist = mark_revision(hist, a.revision, EntryStatus.FAILED)
        elif isinstance(a, MarkComplete):
            hist = mark_revision(hist, a.revision, EntryStatus.COMPLETE)
        elif isinstance(a, Revert):
            entry = next((e for e in reversed(hist) if e.get("revision") == a.to_revision), None)
            token = entry.get("restart_token") if entry else None
            hist, problem = record(hist, a.to_revision, entry.get("spec") if entry else None, token, now,
                                   applied.update.history)
            new_state = dataclasses.replace(new_state, restart_token=token)
            reverted = True
    return StepPlan(new_state, hist, tuple(actions), result.followup_at, reverted, failed,
                    result.fields(), problem)


def _start(service: str, a: StartReplica, spec: config.ServiceSpec, mine: Sequence[Replica],
           effective: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed,
           placed: list[Replica], now: float) -> Action:
    hold = observed.holds.get((service, a.slot))
    if hold is not None and now < hold:
        return Wait(service, a.slot, hold, HELD)
    beside = [r.node for r in mine if r.slot == a.slot]
    result = place_beside(pinned_request(spec, a.slot, observed.volume_homes), beside, observed.nodes, allocations(effective, placed, observed.starting))
    if not result.placed:
        return Unplaceable(service, a.slot, result.failed[0][1] if result.failed else "no node")
    node = result.placed[0][1]
    # what this start will take counts for the next one placed in the same step
    placed.append(Replica(f"{service}-{a.slot}-planned", service, a.slot, a.revision, node, True))
    return Start(service, a.slot, a.revision, node, BackoffState(), a.reason, a.weight)
