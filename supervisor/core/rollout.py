"""The rollout engine: one service moving from its old revision(s) to a new one. Pure.

No I/O, no asyncio; time is an input. The supervisor calls ``rollout_step`` each time it
looks at a service under rollout (on any change it observes, and at ``followup_at``),
carries out the returned actions, and stores the returned state in KV
(``meshlet/rollout/<service>``) so that a restarted supervisor resumes where it was.

Vocabulary
    target      ``state.revision``: the revision new replicas run ("new"; the rest are "old")
    alive       a replica that runs and is not being retired (starting, ready, available)
    available   ready for at least ``min_ready`` (phase ``available``, or phase ``ready``
                with ``ready_since + min_ready <= now``: the engine computes it itself, so
                the supervisor may report ``ready`` and leave the clock to the engine)
    total       alive + terminating replicas, of any revision: a retired replica still
                holds its resources until it is gone, so it counts against replicas + surge
    slot        a replica's stable position 0..replicas-1. A new replica takes the slot of
                the old one it replaces and runs beside it (two revisions of one slot may
                coexist, DESIGN.md): the surge is extra replicas in taken slots, never
                slots >= replicas. Old replicas in a slot that already has a new replica
                are retired first, so replacements pair up (Nomad's destructive pairs).

Per call, in this order (Kubernetes ``syncDeployment``/``rolloutRolling``; the first that
applies returns):

1. paused / complete / failed -> nothing (a paused rollout does not run its deadline)
2. a new replica crashed (restarts >= ``crash_restarts`` while not available, or exited
   for good) -> ``MarkFailed``; with auto_revert and a last complete revision, ``Revert``
   (a failing revert pauses instead: a revert is never reverted, as in Swarm)
3. done (exactly ``replicas`` new ones, all available, nothing else left) -> ``MarkComplete``
4. no progress for ``progress_deadline`` -> as 2
5. weights differ from what the canary step wants -> ``SetWeight``
6. scale up: start new replicas while total < replicas + surge
7. scale down: retire old ones, unhealthy first, keeping replicas - unavailable available
8. cleanup: retire exited old replicas and surplus new ones
9. canary: a step whose replicas are all available waits its pause, then the next step

Recreate: retire every old replica, wait until they are gone, start all new ones.

One writer per slot (``Strategy.one_writer``: the service mounts a per-replica volume):
surge is 0, so a replica is retired first (step 7) and its slot's replacement starts only
once nothing of another revision runs or stops in that slot (step 6), one slot at a time
within max_unavailable, highest slot first as a StatefulSet rolls. The slots that keep
running serve meanwhile, so with 2+ replicas no request is dropped.
Complete means every one of ``replicas`` new replicas available (stricter than Kubernetes,
which accepts replicas - maxUnavailable): ``meshlet rollout status`` exits 0 only then.

The supervisor's side (the contract)
    start       a service's desired revision differs from ``state.revision`` (or there is no
                state and replicas of another revision run): ``record_revision`` the history,
                then ``start_rollout(service, revision, history, now)``. A rolling restart
                is a rollout to ``restart_revision(revision, token)`` with the token kept in
                ``state.restart_token`` and the KV document; ``meshlet rollback [--to N]`` is
                a rollout to ``rollback_target(history, N)['revision']`` (spec from the entry).
    observe     every replica of the service, any revision: ``ObservedReplica`` with phase
                starting/ready/available/terminating/failed, ``ready_since`` (when its
                readiness probe last turned passing), ``restarts`` (counted since it was
                started for this rollout, so an old crash does not fail a revert) and the
                Meta ``weight`` it is registered with.
    act         ``StartReplica``: place and start it in ``slot`` beside any old replica of
                that slot; register it (Meta weight ``weight``) only once ready.
                ``RetireReplica``: mark it terminating at once (report it so from now on),
                deregister, wait drain_delay and in-flight requests, SIGTERM, grace,
                SIGKILL, then forget it. ``SetWeight``: re-register with the new Meta weight.
                ``MarkFailed``/``MarkComplete``: ``mark_revision`` in the history.
                ``Revert``: the service's desired revision becomes ``to_revision`` (spec
                from its history entry, ``record_revision`` again); keep calling with the
                returned state.
    store       the returned state (``to_dict``) in KV after acting, and call again at
                ``followup_at`` or on the next observed change, whichever comes first.
    reconcile   leaves a service with a rollout in progress/paused/failed to this engine
                (no OUTDATED/DUPLICATE stops for it); it keeps restarting crashed replicas.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from math import gcd
from typing import Any

from .rollout_history import (EntryStatus, RolloutError, mark_revision, record_revision,
                              resolve_fenceposts, restart_revision, rollback_target)
from .rollout_types import (_ALIVE, AVAILABLE, COMPLETE, EXITED, FAILED, PAUSED, PROGRESSING,
                            READY, RETIRE_EXITED, RETIRE_RECREATE, RETIRE_REPLACED,
                            RETIRE_SURPLUS, RETIRE_UNHEALTHY, REVERTING, STARTING, TERMINATING,
                            Action, MarkComplete, MarkFailed, ObservedReplica, ObservedReplicas,
                            ReplicaPhase, RetireReason, RetireReplica, Revert, RolloutPhase,
                            RolloutState, SetWeight, SlotRefusal, SlotRefusals, StartReplica,
                            StepResult, Strategy)

__all__ = ["ObservedReplica", "ObservedReplicas", "Strategy", "RolloutState", "StepResult",
           "StartReplica", "RetireReplica", "SetWeight", "MarkFailed", "MarkComplete", "Revert",
           "Action", "SlotRefusal", "SlotRefusals", "RolloutPhase", "ReplicaPhase", "RetireReason",
           "rollout_step", "start_rollout", "pause", "resume", "describe", "describe_exit",
           "is_available", "canary_count", "resolve_fenceposts", "record_revision",
           "mark_revision", "rollback_target", "restart_revision", "RolloutError",
           "PROGRESSING", "PAUSED", "COMPLETE", "FAILED", "REVERTING",
           "STARTING", "READY", "AVAILABLE", "TERMINATING", "EXITED"]

_NO_REFUSALS: SlotRefusals = {}


# ---------------------------------------------------------------- starting, pausing

def start_rollout(service: str, revision: str, history: Sequence[dict[str, Any]], now: float,
                  restart_token: str | None = None) -> RolloutState:
    """The state of a new rollout of ``service`` to ``revision`` (already the spec's revision,
    or ``restart_revision(spec_revision, token)`` for a rolling restart). ``revert_to`` is
    the newest complete revision in ``history`` other than ``revision``."""
    revert_to = next((e["revision"] for e in reversed(history)
                      if e.get("status") == EntryStatus.COMPLETE and e.get("revision") != revision), None)
    return RolloutState(service, revision, PROGRESSING, now, now, revert_to=revert_to,
                        restart_token=restart_token)


def pause(state: RolloutState, reason: str = "paused by the user") -> RolloutState:
    """``meshlet rollout pause``: no changes, no deadline, until ``resume``."""
    if state.phase not in (PROGRESSING, REVERTING):
        return state
    return replace(state, phase=PAUSED, paused_from=state.phase, reason=reason)


def resume(state: RolloutState, now: float) -> RolloutState:
    """``meshlet rollout resume``: the deadline counts again from now (Kubernetes does too)."""
    if state.phase != PAUSED:
        return state
    return replace(state, phase=state.paused_from or PROGRESSING, paused_from=None, reason="",
                   last_progress_at=now, step_ready_at=None)


# ---------------------------------------------------------------- classification

def is_available(r: ObservedReplica, now: float, min_ready: float) -> bool:
    if r.phase == AVAILABLE:
        return True
    return r.phase == READY and r.ready_since is not None and now - r.ready_since >= min_ready


def canary_count(weight: int, replicas: int) -> int:
    """New replicas a canary step of ``weight`` percent runs: rounded up, at least 1
    (10% of 3 -> 1, 50% of 3 -> 2, 100% -> all)."""
    if replicas <= 0:
        return 0
    return max(1, min(replicas, -(-weight * replicas // 100)))


@dataclass(slots=True)
class _View:
    new: list[ObservedReplica] = field(default_factory=list)          # alive, target revision
    new_available: list[ObservedReplica] = field(default_factory=list)
    old: list[ObservedReplica] = field(default_factory=list)          # alive, other revisions
    old_available: list[ObservedReplica] = field(default_factory=list)
    terminating: list[ObservedReplica] = field(default_factory=list)
    exited_new: list[ObservedReplica] = field(default_factory=list)
    exited_old: list[ObservedReplica] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.new) + len(self.old) + len(self.terminating)

    @property
    def available(self) -> int:
        return len(self.new_available) + len(self.old_available)


def _classify(state: RolloutState, observed: ObservedReplicas, s: Strategy, now: float) -> _View:
    v = _View()
    for r in sorted(observed, key=lambda r: (r.slot, r.instance_id)):
        new = r.revision == state.revision
        if r.phase == TERMINATING:
            v.terminating.append(r)
        elif r.phase in _ALIVE:
            (v.new if new else v.old).append(r)
            if is_available(r, now, s.min_ready):
                (v.new_available if new else v.old_available).append(r)
        else:                                   # EXITED, or a phase we do not know
            (v.exited_new if new else v.exited_old).append(r)
    return v


def _crash(state: RolloutState, v: _View, s: Strategy, refused: SlotRefusals, now: float) -> str | None:
    """Why the new revision failed, if it did: a new replica exited for good, restarted
    ``crash_restarts`` times without becoming available, or a slot whose start the runtime
    refused that often."""
    crashed = None
    for r in v.exited_new:
        crashed = r
        break
    else:
        for r in v.new:
            if r.restarts >= s.crash_restarts and not is_available(r, now, s.min_ready):
                crashed = r
                break
    if crashed is not None:
        what = ("exited and is not restarted" if crashed.phase not in _ALIVE
                else f"restarted {crashed.restarts} times without becoming available")
        if crashed.last_exit is not None or crashed.last_output:
            code = describe_exit(crashed.last_exit) if crashed.last_exit is not None else "code unknown"
            what += f" (last exit: {code}" + (f": {crashed.last_output}" if crashed.last_output else "") + ")"
        return f"{_name(state, crashed)} ({crashed.instance_id}) of revision {state.revision} {what}"
    taken = {r.slot for r in v.new}
    for slot, refusal in sorted(refused.items()):
        if slot not in taken and slot < s.replicas and refusal.attempts >= s.crash_restarts:
            return (f"{state.service}-{slot} of revision {state.revision} could not be started "
                    f"({refusal.attempts} attempts): {refusal.problem}")
    return None


def _progress(state: RolloutState, v: _View, now: float) -> RolloutState:
    """Progress (Kubernetes ``DeploymentProgressing``): more new replicas, more new ones
    available, or fewer old ones than ever before in this rollout. High-water marks, so a
    replica that crashes and comes back is no progress."""
    mark = (len(v.new), len(v.new_available), len(v.old))
    if state.marks is None:
        return replace(state, marks=mark)
    hi_new, hi_avail, lo_old = state.marks
    moved = mark[0] > hi_new or mark[1] > hi_avail or mark[2] < lo_old
    marks = (max(hi_new, mark[0]), max(hi_avail, mark[1]), min(lo_old, mark[2]))
    return replace(state, marks=marks, last_progress_at=now if moved else state.last_progress_at)


# ---------------------------------------------------------------- the step

def describe_exit(code: int) -> str:
    """An exit code as people read it: 137 -> "code 137 (SIGKILL)"."""
    if code > 128:
        try:
            return f"code {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"code {code}"


def _name(state: RolloutState, r: ObservedReplica) -> str:
    return f"{state.service}-{r.slot}"


def _canary_stage(state: RolloutState, s: Strategy) -> tuple[int, float] | None:
    """(percent, pause) of the current canary step, None outside one. A step never takes
    traffic back: its percent is the highest so far (10 -> 50 -> 30 holds 50)."""
    if s.kind != "rolling" or state.phase != PROGRESSING or state.canary_step >= len(s.canary):
        return None
    pct = max(w for w, _ in s.canary[:state.canary_step + 1])
    return pct, s.canary[state.canary_step][1]


def _weights(state: RolloutState, s: Strategy) -> tuple[int, int]:
    """(each new replica's weight, each old one's): new ones together get the step's
    percentage of the traffic once the step's replicas run. All 1 outside a canary step."""
    stage = _canary_stage(state, s)
    if stage is None:
        return 1, 1
    pct, n = stage[0], canary_count(stage[0], s.replicas)
    if pct >= 100 or n >= s.replicas:
        return 1, 1
    w_new, w_old = pct * (s.replicas - n), (100 - pct) * n
    g = gcd(w_new, w_old)
    return w_new // g, w_old // g


def _fail(state: RolloutState, s: Strategy, why: str, now: float) -> StepResult:
    failed = MarkFailed(state.revision, why)
    if state.phase == REVERTING:
        st = replace(state, phase=PAUSED, paused_from=REVERTING,
                     reason=f"revert to {state.revision} failed: {why}; paused (a revert is not reverted)")
        return StepResult((failed,), st)
    if s.auto_revert and state.revert_to and state.revert_to != state.revision:
        st = RolloutState(state.service, state.revert_to, REVERTING, now, now,
                          reverted_from=state.revision,
                          reason=f"reverting: {state.revision} failed: {why}")
        return StepResult((failed, Revert(state.revert_to, why)), st, now)
    tail = ("auto_revert is off" if not s.auto_revert
            else "no complete revision to revert to")
    return StepResult((failed,), replace(state, phase=FAILED, reason=f"{why}; stopped ({tail})"))


def _slots_free(v: _View, replicas: int, one_writer: bool = False) -> list[int]:
    """Slots a new replica may start in: none of the target runs there, and with
    ``one_writer`` nothing of another revision runs or stops there either."""
    taken = {r.slot for r in v.new}
    if one_writer:
        taken |= {r.slot for r in v.old} | {r.slot for r in v.terminating}
    return [i for i in range(replicas) if i not in taken]


def _old_order(v: _View, replicas: int) -> list[ObservedReplica]:
    """Old replicas in the order they go: slots beyond replicas, then slots whose new
    replica is available (the pair is complete), then slots with a new one (lowest first,
    as new ones are started), then the rest, highest slot first."""
    new_avail = {r.slot for r in v.new_available}
    new_any = {r.slot for r in v.new}
    return sorted(v.old, key=lambda r: (r.slot < replicas, r.slot not in new_avail,
                                        r.slot not in new_any,
                                        r.slot if r.slot in new_any else -r.slot, r.instance_id))


def _surplus_new(v: _View, replicas: int, now: float, s: Strategy) -> list[ObservedReplica]:
    """New replicas beyond one per slot 0..replicas-1 (after a scale-down mid-rollout)."""
    keep: dict[int, ObservedReplica] = {}
    out = []
    ranked = sorted(v.new, key=lambda r: (not is_available(r, now, s.min_ready), r.instance_id))
    for r in ranked:
        if r.slot < replicas and r.slot not in keep:
            keep[r.slot] = r
        else:
            out.append(r)
    return out


def _rolling(state: RolloutState, v: _View, s: Strategy, now: float) -> tuple[list[Action], RolloutState]:
    R = s.replicas
    stage = _canary_stage(state, s)
    # a canary step runs canary_count new replicas beside the old ones it keeps. If old ones
    # are missing (lost, or replicas raised mid-rollout), new ones fill up to replicas; if
    # more new ones run than the step wants (replicas lowered), they stay: a step never
    # takes traffic back
    cap = min(R, max(canary_count(stage[0], R), R - len(v.old), len(v.new))) if stage else R
    w_new, w_old = _weights(state, s)
    # 5. weights: once a new replica runs (it registers with its weight when ready, so the
    # old ones get theirs first), and back to 1 after the last canary step
    sets: list[Action] = []
    if not stage or v.new:
        why = f"canary {stage[0]}% to {state.revision}" if stage else "canary over: equal weights"
        sets = [SetWeight(r.instance_id, w_new, why) for r in v.new if r.weight != w_new]
        sets += [SetWeight(r.instance_id, w_old, why) for r in v.old if r.weight != w_old]
    if sets:
        return sets, state
    # 6. scale up
    max_total = R + s.surge
    if v.total < max_total and len(v.new) < cap:
        n = min(max_total - v.total, cap - len(v.new))
        why = (f"canary {stage[0]}%: {cap} of {R} new" if stage
               else f"rolling: up to {max_total} replicas ({R} + surge {s.surge})")
        free = _slots_free(v, R, s.one_writer)
        if free:
            return [StartReplica(slot, state.revision, w_new, why) for slot in free[:n]], state
    # 7. scale down old
    min_available = R - s.unavailable
    new_unavailable = len(v.new) - len(v.new_available)
    max_scaled_down = len(v.new) + len(v.old) - min_available - new_unavailable
    budget = len(v.old) - (R - cap if stage else 0)     # a canary step keeps R - cap old ones
    if max_scaled_down > 0 and budget > 0:
        order = _old_order(v, R)
        avail_ids = {r.instance_id for r in v.old_available}
        unhealthy = [r for r in order if r.instance_id not in avail_ids]
        out: list[Action] = [RetireReplica(r.instance_id, RETIRE_UNHEALTHY)
                             for r in unhealthy[:min(max_scaled_down, budget)]]
        budget -= len(out)
        n = min(v.available - min_available, budget)
        out += [RetireReplica(r.instance_id, RETIRE_REPLACED)
                for r in [r for r in order if r.instance_id in avail_ids][:max(n, 0)]]
        if out:
            return out, state
    # 8. cleanup
    out = [RetireReplica(r.instance_id, RETIRE_EXITED) for r in v.exited_old]
    spare = v.available - min_available
    for r in _surplus_new(v, R, now, s):
        if not is_available(r, now, s.min_ready):
            out.append(RetireReplica(r.instance_id, RETIRE_SURPLUS))
        elif spare > 0:
            spare -= 1
            out.append(RetireReplica(r.instance_id, RETIRE_SURPLUS))
    if out:
        return out, state
    # 9. canary pause, then the next step
    if stage and len(v.new) == cap and len(v.new_available) == cap \
            and len(v.old) + cap == R and not v.terminating:
        if state.step_ready_at is None:
            return [], replace(state, step_ready_at=now)
        if now >= state.step_ready_at + stage[1]:
            return [], replace(state, canary_step=state.canary_step + 1, step_ready_at=None,
                               last_progress_at=now)
    return [], state


def _recreate(state: RolloutState, v: _View, s: Strategy, now: float) -> tuple[list[Action], RolloutState]:
    if v.old:
        return [RetireReplica(r.instance_id, RETIRE_RECREATE) for r in v.old], state
    if v.exited_old:
        return [RetireReplica(r.instance_id, RETIRE_EXITED) for r in v.exited_old], state
    if any(r.revision != state.revision for r in v.terminating):
        return [], state
    if len(v.new) < s.replicas and (free := _slots_free(v, s.replicas, s.one_writer)):
        return [StartReplica(slot, state.revision, 1, "recreate: old replicas are gone") for slot in free], state
    surplus = _surplus_new(v, s.replicas, now, s)
    return [RetireReplica(r.instance_id, RETIRE_SURPLUS) for r in surplus], state


def _is_done(v: _View, s: Strategy) -> bool:
    return (len(v.new) == s.replicas and len(v.new_available) == s.replicas and not v.old
            and not v.terminating and not v.exited_old and not v.exited_new
            and all(r.weight == 1 for r in v.new))


def _followup(state: RolloutState, v: _View, s: Strategy, now: float) -> float | None:
    if state.phase not in (PROGRESSING, REVERTING):
        return None
    times = [r.ready_since + s.min_ready for r in v.new + v.old
             if r.phase == READY and r.ready_since is not None and r.ready_since + s.min_ready > now]
    stage = _canary_stage(state, s)
    if stage and state.step_ready_at is not None:
        times.append(state.step_ready_at + stage[1])
    else:
        times.append(state.last_progress_at + s.progress_deadline)
    return min(times)


def rollout_step(state: RolloutState, observed: ObservedReplicas, strategy: Strategy,
                 now: float, refused: SlotRefusals = _NO_REFUSALS) -> StepResult:
    """The next step of a rollout: actions for the supervisor, the new state, and when to
    look again. ``observed``: every replica of ``state.service`` the supervisor knows of,
    including terminating and exited ones; ``refused``: slots whose start of the target
    the runtime refused (no replica there to observe)."""
    s = strategy
    if state.phase not in (PROGRESSING, REVERTING):
        return StepResult((), state)
    v = _classify(state, observed, s, now)
    state = _progress(state, v, now)
    crash = _crash(state, v, s, refused, now)
    if crash is not None:
        return _fail(state, s, crash, now)
    stage = _canary_stage(state, s)
    if stage is None and _is_done(v, s):
        done = replace(state, phase=COMPLETE, reason=(
            f"reverted to {state.revision} ({state.reason.removeprefix('reverting: ')})"
            if state.phase == REVERTING else f"rolled out {state.revision}"))
        return StepResult((MarkComplete(state.revision),), done)
    pausing = stage is not None and state.step_ready_at is not None
    if not pausing and now - state.last_progress_at > s.progress_deadline:
        return _fail(state, s, f"no progress for {s.progress_deadline:g}s (progress_deadline): "
                               f"{_summary(state, v, s)}", now)
    before = state.canary_step
    actions, state = (_recreate if s.kind == "recreate" else _rolling)(state, v, s, now)
    # promoted to the next canary step: look again at once to start its replicas
    follow = now if state.canary_step != before else _followup(state, v, s, now)
    return StepResult(tuple(actions), state, follow)


# ---------------------------------------------------------------- readable state

def _summary(state: RolloutState, v: _View, s: Strategy | None) -> str:
    want = s.replicas if s is not None else len(v.new) + len(v.old)
    return f"{len(v.new)} of {want} updated, {v.available} available"


def describe(state: RolloutState, observed: ObservedReplicas, strategy: Strategy | None = None,
             now: float | None = None, refused: SlotRefusals = _NO_REFUSALS) -> str:
    """One line for ``meshlet rollout status``, e.g. ``web: 2 of 3 updated, 3 available,
    waiting for web-2 to be available (min_ready 5s)``."""
    s = strategy or Strategy(len({r.slot for r in observed}), 0, 1)
    t = now if now is not None else float("inf")
    v = _classify(state, observed, s, t)
    head = f"{state.service}: {_summary(state, v, strategy)}"
    if state.phase == COMPLETE:
        return f"{head}, complete: {state.reason or state.revision}"
    if state.phase == FAILED:
        return f"{head}, failed: {state.reason}"
    if state.phase == PAUSED:
        return f"{head}, paused: {state.reason}"
    prefix = f"{head}, reverting from {state.reverted_from}" if state.phase == REVERTING else head
    stage = _canary_stage(state, s)
    if stage is not None:
        prefix += f", canary step {state.canary_step + 1} of {len(s.canary)} ({stage[0]}%)"
        if state.step_ready_at is not None:
            return f"{prefix}, pausing {stage[1]:g}s since {state.step_ready_at:g}"
    taken = {r.slot for r in v.new}
    for slot, refusal in sorted(refused.items()):
        if slot not in taken:
            return (f"{prefix}, {state.service}-{slot} could not be started ({refusal.attempts} "
                    f"attempt{'s' if refusal.attempts != 1 else ''}): {refusal.problem}")
    for r in v.new:
        if r.phase == STARTING:
            return f"{prefix}, waiting for {_name(state, r)} to be ready"
    for r in v.new:
        if r not in v.new_available:
            return f"{prefix}, waiting for {_name(state, r)} to be available (min_ready {s.min_ready:g}s)"
    if v.terminating:
        return f"{prefix}, waiting for {_name(state, v.terminating[0])} to stop"
    if v.old:
        return f"{prefix}, {len(v.old)} old replica(s) left"
    return prefix
