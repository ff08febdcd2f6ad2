"""Rolling updates in the supervisor: each service's rollout state, history and counts,
kept in memory and mirrored in KV. Decisions are the pure core's (``core/rollout_plan.py``
around ``core/rollout.py``); this holds their inputs and outputs and stores them.

Per service: the ``RolloutState`` and revision history (``meshlet/rollout/<svc>/state``,
``.../history``), the target's crash counts (``.../crashes``, so a supervisor restart
neither resets them nor misses an exit that happened while it was down), and what the CLI
asks (``.../control``: pause; ``.../restart``: the rolling-restart token). Each sync of a
service (``Supervisor._sync``) calls, in this order:

    begin(...)      a new desired revision records the history and starts a rollout (or
                    marks a first deploy complete once all its replicas are ready)
    effective(...)  (spec, revision) per service for reconcile: the rollout's target,
                    with the spec of its history entry (an auto-revert target)
    engine_owns()   services reconcile leaves to the engine (progressing/paused/failed)
    step(...)       the engine's next step as replica actions for the supervisor to carry
                    out; state and history updated
    store(service)  what changed, in one KV transaction

Auto-revert does not rewrite ``meshlet/services/<name>``: that document stays what the
user applied, the state says ``reverted_from`` and why, and a document whose revision is
the one reverted from starts no rollout again. A new apply, ``meshlet rollback`` or
``meshlet restart`` does. (Rewriting it would race with ``meshlet apply`` and the CLI's
rollback transaction, and lose the record of what was applied.)

Errors: unreadable KV values are logged and ignored; a failed store is logged and stored
again after the next step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import config
from discovery.consul import kv_op, kv_txn

from ..core.model import Observed, Replica
from ..core.revisions import read_restart_token
from ..core.rollout import (COMPLETE, FAILED, PAUSED, REVERTING, RolloutError, RolloutState, Strategy,
                            describe, pause, resume)
from ..core.rollout_history import is_history
from ..core.rollout_plan import (ENGINE_OWNS, Begun, Counts, StepPlan, begin, count_exit, count_start,
                                 crash_doc, observe, plan_step, read_crash_doc, spec_of_revision)
from ..core.rollout_types import SlotRefusal

__all__ = ["Rollouts"]

log = logging.getLogger("supervisor.rollouts")

Desired = Mapping[str, tuple[config.ServiceSpec, str]]


class Rollouts:
    """The rollout bookkeeping of every service (see the module). ``kv``: py-consul's aio
    client (for ``store``)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.states: dict[str, RolloutState] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.controls: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str | None] = {}
        self.counts: dict[str, Counts] = {}
        self._stored: dict[str, tuple[Any, Any, Any]] = {}
        self._specs: dict[tuple[str, str], config.ServiceSpec] = {}

    # --- KV ------------------------------------------------------------------------------

    def load(self, entries: Mapping[str, bytes], now: float) -> None:
        """Everything under ``meshlet/rollout/`` as read at start (state, history, crash
        counts, control, restart); unreadable values are logged and ignored."""
        crash_docs: dict[str, Any] = {}
        for key, raw in entries.items():
            parts = config.split_rollout_key(key)
            if parts is None:
                continue
            service, kind = parts
            try:
                value = json.loads(raw or b"null")
                if kind == "state" and value is not None:
                    self.states[service] = RolloutState.from_dict(value)
                elif kind == "history":
                    if not is_history(value):
                        raise RolloutError(f"expected a list of history entries, got {raw[:80]!r}")
                    self.histories[service] = value
                elif kind == "crashes" and value is not None:
                    crash_docs[service] = value
            except (ValueError, RolloutError) as exc:
                log.error("ignoring unreadable %s: %s", key, exc)
        for service, value in crash_docs.items():
            st = self.states.get(service)
            try:
                counts = read_crash_doc(value, st.revision) if st and st.phase in ENGINE_OWNS else None
            except ValueError as exc:
                log.error("ignoring unreadable %s: %s", config.rollout_key(service, "crashes"), exc)
                counts = None
            if counts is not None:
                self.counts[service] = counts
        for service in set(self.states) | set(self.histories) | set(crash_docs):
            st = self.states.get(service)
            # what KV holds: a stale or unreadable crash document is replaced at the next store
            self._stored[service] = (st.to_dict() if st else None, self.histories.get(service),
                                     crash_docs.get(service))
        self.on_control(entries, now, initial=True)

    def on_control(self, entries: Mapping[str, bytes], now: float, initial: bool = False) -> set[str]:
        """The control and restart keys (from the watch): returns the services they changed."""
        controls: dict[str, dict[str, Any]] = {}
        tokens: dict[str, str | None] = {}
        for key, raw in entries.items():
            parts = config.split_rollout_key(key)
            if parts is None or parts[1] not in ("control", "restart"):
                continue
            service, kind = parts
            try:
                value = json.loads(raw or b"null")
            except ValueError:
                log.error("ignoring unreadable %s", key)
                continue
            if not isinstance(value, dict):
                continue
            if kind == "control":
                controls[service] = value
            elif token := read_restart_token(value):
                tokens[service] = token
        changed = {s for s in set(controls) | set(self.controls) if controls.get(s) != self.controls.get(s)}
        changed |= {s for s in set(tokens) | set(self.tokens) if tokens.get(s) != self.tokens.get(s)}
        self.controls, self.tokens = controls, tokens
        for service in changed:
            self._apply_control(service, now, initial)
        return changed

    def _pause_reason(self, service: str) -> str | None:
        control = self.controls.get(service) or {}
        return str(control.get("reason") or "paused by the user") if control.get("paused") else None

    def _apply_control(self, service: str, now: float, initial: bool) -> None:
        st = self.states.get(service)
        if st is None:
            return
        reason = self._pause_reason(service)
        if reason is not None:
            self.states[service] = pause(st, reason)
        elif st.phase == PAUSED and not (initial and st.reason.startswith("revert to ")):
            # at start a failed revert stays paused; a resume seen live resumes anything
            self.states[service] = resume(st, now)

    def _crash_doc(self, service: str, live: Collection[str] | None) -> dict[str, Any] | None:
        st = self.states.get(service)
        if st is None or st.phase not in ENGINE_OWNS:
            return None
        return crash_doc(st.revision, self.counts.get(service, Counts()), live)

    async def store(self, service: str, live: Collection[str] | None = None) -> None:
        """State, history and crash counts of ``service`` in KV: only what changed, in one
        transaction (a crash between two writes would leave a state naming a revision the
        history does not have, or crash counts of another rollout). ``live``: the instance
        ids that still exist (counted exits of others are dropped)."""
        st = self.states.get(service)
        want = (st.to_dict() if st else None, self.histories.get(service), self._crash_doc(service, live))
        if self._stored.get(service) == want:
            return
        stored = self._stored.get(service, (None, None, None))
        ops = []
        if want[1] is not None and want[1] != stored[1]:
            ops.append(kv_op("set", config.rollout_key(service, "history"), value=json.dumps(want[1])))
        if want[0] != stored[0] or service not in self._stored:
            key = config.rollout_key(service, "state")
            ops.append(kv_op("set", key, value=json.dumps(want[0])) if want[0] is not None
                       else kv_op("delete", key))
        if want[2] != stored[2]:
            key = config.rollout_key(service, "crashes")
            ops.append(kv_op("set", key, value=json.dumps(want[2])) if want[2] is not None
                       else kv_op("delete", key))
        try:
            if ops:
                await kv_txn(self.kv, ops)
            self._stored[service] = want
        except Exception as exc:  # noqa: BLE001 - stored again after the next step
            log.warning("cannot store the rollout of %s: %s", service, exc)

    # --- what should run ---------------------------------------------------------------------

    def doc_target(self, service: str, desired: Desired) -> str | None:
        """The revision the applied document asks for (its template and restart token)."""
        from ..core.rollout_history import restart_revision
        entry = desired.get(service)
        return restart_revision(entry[1], self.tokens.get(service)) if entry else None

    def spec_for(self, service: str, revision: str, desired: Desired) -> config.ServiceSpec | None:
        """The spec replicas of ``revision`` run (``rollout_plan.spec_of_revision``)."""
        entry = desired.get(service)
        if entry is None:
            return None
        target = self.doc_target(service, desired)
        if revision == target:
            return entry[0]
        cached = self._specs.get((service, revision))
        if cached is not None:
            return dataclasses.replace(cached, replicas=entry[0].replicas)
        spec, problem = spec_of_revision(entry[0], target or "", self.histories.get(service, ()), revision)
        if problem:
            log.error("%s", problem)
        if spec is not entry[0]:
            self._specs[(service, revision)] = spec
        return spec

    def target(self, service: str, desired: Desired) -> str | None:
        st = self.states.get(service)
        return st.revision if st is not None else self.doc_target(service, desired)

    def effective(self, desired: Desired) -> dict[str, tuple[config.ServiceSpec, str]]:
        out = {}
        for name, (spec, _) in desired.items():
            revision = self.target(name, desired)
            assert revision is not None
            out[name] = (self.spec_for(name, revision, desired) or spec, revision)
        return out

    def engine_owns(self, desired: Desired) -> frozenset[str]:
        return frozenset(n for n, st in self.states.items() if st.phase in ENGINE_OWNS and n in desired)

    # --- counting -------------------------------------------------------------------------------

    def note_exit(self, r: Replica) -> None:
        """An exit of ``r`` (see ``rollout_plan.count_exit``); stored at the next store."""
        before = self.counts.get(r.service, Counts())
        after = count_exit(before, self.states.get(r.service), r)
        if after is not before:
            self.counts[r.service] = after

    def note_start(self, service: str, slot: int, started: bool) -> None:
        self.counts[service] = count_start(self.counts.get(service, Counts()), slot, started)

    def reset_counts(self, service: str) -> None:
        self.counts.pop(service, None)

    # --- a sync's steps ----------------------------------------------------------------------------

    def begin(self, service: str, desired: Desired, replicas: tuple[Replica, ...], now: float) -> Begun | None:
        """Start a rollout (or record a first deploy) when the desired revision changed;
        the Begun (None: nothing changed) says what happened."""
        entry = desired.get(service)
        if entry is None:
            return None
        want = self.doc_target(service, desired)
        assert want is not None
        begun = begin(service, entry[0], want, self.tokens.get(service), self.states.get(service),
                      self.histories.get(service, []), replicas, self._pause_reason(service), now)
        if begun is None:
            return None
        if begun.problem:
            log.error("history of %s: %s", service, begun.problem)
        self.histories[service] = begun.history
        if begun.state is None:
            self.states.pop(service, None)
        else:
            self.states[service] = begun.state
        if begun.started:
            self.reset_counts(service)
            log.info("rollout of %s to %s started (revert target %s)", service, want, begun.state.revert_to)
        return begun

    def step(self, service: str, desired: Desired, observed: Observed, start_errors: Mapping[int, str],
             now: float) -> StepPlan | None:
        """The next step of the rollout of ``service``, its state and history updated here;
        the plan's actions are the supervisor's to carry out."""
        st = self.states.get(service)
        entry = desired.get(service)
        if st is None or entry is None:
            return None
        spec = self.spec_for(service, st.revision, desired) or entry[0]
        plan = plan_step(service, st, self.histories.get(service, []), spec, entry[0], self.effective(desired),
                         observed, self.counts.get(service, Counts()), start_errors, now)
        if plan is None:
            return None
        if plan.problem:
            log.error("history of %s: %s", service, plan.problem)
        if plan.failed:
            log.error("rollout of %s: revision %s failed: %s", service, st.revision, plan.failed)
        self.states[service] = plan.state
        self.histories[service] = plan.history
        if plan.reverted:
            self.reset_counts(service)
            log.warning("rollout of %s: reverting to %s", service, plan.state.revision)
        if plan.actions:
            log.info("rollout %s: %s", service, dict(plan.fields))
        if plan.state.phase != st.phase:
            log.info("rollout of %s: %s (%s)", service, plan.state.phase, plan.state.reason)
        return plan

    # --- status ------------------------------------------------------------------------------------

    def status(self, service: str, desired: Desired, observed: Observed, start_errors: Mapping[int, str],
               now: float) -> dict[str, Any] | None:
        st = self.states.get(service)
        history = self.histories.get(service) or []
        if st is None:
            if not history:
                return None
            return {"phase": "deploying", "revision": history[-1]["revision"],
                    "number": history[-1]["number"], "summary": "first deploy", "reason": "",
                    "pause_requested": self._pause_reason(service) is not None}
        number = next((e["number"] for e in reversed(history) if e.get("revision") == st.revision), None)
        mine = [r for r in observed.replicas if r.service == service]
        alive = [r for r in mine if r.running and not r.terminating]
        spec = self.spec_for(service, st.revision, desired)
        replicas = spec.replicas if spec else len({r.slot for r in alive})
        updated = sum(1 for r in alive if r.revision == st.revision)
        old = len(alive) - updated
        progress = f"{min(updated, replicas)}/{replicas} updated" + (f", {old} old" if old else "")
        line = st.service
        if spec is not None:
            counts = self.counts.get(service, Counts())
            refused = {slot: SlotRefusal(n, start_errors.get(slot) or "the runtime refused to start it")
                       for slot, n in counts.refused.items()}
            line = describe(st, observe(st, mine, spec, counts, observed.backoff, now),
                            Strategy.from_spec(replicas, spec.update), now, refused)
        return {"phase": str(st.phase), "revision": st.revision, "number": number, "progress": progress,
                "updated": min(updated, replicas), "replicas": replicas, "old": old,
                "pause_requested": self._pause_reason(service) is not None,
                "reason": st.reason, "reverted_from": st.reverted_from, "summary": line,
                "terminating": sum(1 for r in mine if r.terminating)}

    def attention(self, service: str, desired: Desired) -> str | None:
        """What ``meshlet status`` should say of a rollout that needs a human: failed,
        paused, or reverted (the applied document is not what runs)."""
        st = self.states.get(service)
        if st is None:
            return None
        if st.phase in (FAILED, PAUSED):
            return f"rollout {st.phase}: {st.reason}"
        if st.phase == REVERTING:
            return f"rollout: {st.reason}"
        if st.phase == COMPLETE and st.reverted_from and st.reverted_from == self.doc_target(service, desired):
            return f"rollout: {st.reason}; the applied revision {st.reverted_from} is not running"
        return None
