"""Rolling updates in the supervisor: the I/O shell over the pure engine (``rollout.py``).

Per service the driver keeps the rollout state and revision history (both mirrored in KV,
``rollout_keys``), the CLI's control (pause) and restart token, and per replica what the
engine needs to know (terminating, weight, restarts of the target revision; the restarts
are mirrored in KV too, so a supervisor restart neither resets them nor misses an exit
that happened while it was down). Each sync of a service (``agent.Supervisor._sync``)
calls, in this order:

    begin(service)    desired revision = target_revision(spec, restart token); a change
                      records the history and starts a rollout (``start_rollout``), unless
                      nothing of another revision runs (a first deploy: reconcile starts
                      it, and the revision is marked complete once all replicas are ready)
    effective()       (spec, revision) per service for reconcile: the rollout's target,
                      with the spec of its history entry (an auto-revert target)
    rolling()         services reconcile leaves to the engine (progressing/paused/failed)
    step(service)     ObservedReplicas from the runtimes and probes -> ``rollout_step`` ->
                      start / retire / weights / history; state and history stored in KV
                      after acting; a follow-up at ``followup_at``

Retiring runs in the background (never in the sync): mark terminating, deregister, wait
``max(MIN_DRAIN, update.drain_delay)`` so every proxy and DNS server has dropped it (their
blocking queries return within milliseconds of the change; the floor covers a slow
scheduler), then until no proxy it knows of (``Supervisor.proxy_admins``: ``meshlet up``
passes its proxy's admin address) lists it in ``GET /routes`` "draining" (an endpoint
that left the table with requests still in flight), at most ``IN_FLIGHT_LIMIT``; then
SIGTERM, grace period, SIGKILL. Proxies the supervisor does not know of (other hosts) are
covered by the drain delay only; a request of theirs still running after SIGTERM is the
workload's to finish in its grace period. (A ``--workers N`` proxy answers /routes for all
its workers.)

A started replica is registered at once with its TTL check critical (as every replica
is), which proxies and DNS treat as absent; it turns passing when its readiness probe
does. The engine counts a replica ready only once the catalog acknowledged that passing
status, so an old replica is never retired before its replacement is routable.

Auto-revert does not rewrite ``meshlet/services/<name>``: that document stays what the
user applied, the state says ``reverted_from`` and why, and a document whose revision is
the one reverted from starts no rollout again. A new apply, ``meshlet rollback`` or
``meshlet restart`` does. (Rewriting it would race with ``meshlet apply`` and the CLI's
rollback transaction, and lose the record of what was applied.)

Errors: KV failures are logged; the state is stored again after the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import aiohttp
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import config
from discovery.consul import kv_op, kv_txn

from .backoff import BackoffState, decide
from .place import Request, place
from .reconcile import allocations
from ._rollout_history import change_summary
from .rollout import (COMPLETE, EXITED, FAILED, PAUSED, PROGRESSING, READY, REVERTING,
                      STARTING, TERMINATING, MarkComplete, MarkFailed, ObservedReplica, RetireReplica,
                      Revert, RolloutError, RolloutState, SetWeight, StartReplica, Strategy, describe,
                      mark_revision, pause, record_revision, restart_revision, resume, rollout_step,
                      start_rollout)
from .rollout_keys import ROLLOUT_PREFIX, crashes_key, history_key, restart_token, state_key

if TYPE_CHECKING:
    from ._actions import _Inst
    from .agent import Supervisor

__all__ = ["RolloutDriver", "MIN_DRAIN", "FOLLOWUP_SLOT"]

log = logging.getLogger(__name__)

# The least wait between deregistering a retired replica and SIGTERM: proxies and DNS see
# the change through blocking queries within milliseconds; 0.5 s covers a busy machine.
MIN_DRAIN = 0.5
# The longest a retired replica waits for requests in flight on it (as the proxies report
# them) before SIGTERM; its grace period follows.
IN_FLIGHT_LIMIT = 30.0
FOLLOWUP_SLOT = -1          # the agent's follow-up key (service, slot) for rollout steps
_ENGINE_OWNS = (PROGRESSING, PAUSED, FAILED, REVERTING)


def _valid_history(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, dict) and isinstance(e.get("number"), int) and isinstance(e.get("revision"), str)
        and e.get("status") in ("active", "complete", "failed", "superseded") for e in value)


def crash_doc(revision: str, crashes: Mapping[int, int], refused: Mapping[int, int],
              counted: set[str] | frozenset[str]) -> dict[str, Any] | None:
    """The ``crashes`` key's value for a rollout to ``revision`` (None: nothing to keep)."""
    if not (crashes or refused or counted):
        return None
    return {"revision": revision, "crashes": {str(k): v for k, v in sorted(crashes.items())},
            "refused": {str(k): v for k, v in sorted(refused.items())}, "counted": sorted(counted)}


def read_crash_doc(value: Any, revision: str) -> tuple[dict[int, int], dict[int, int], set[str]] | None:
    """(crashes, refused, counted) from a ``crashes`` value, if it is about ``revision``;
    None when it is about another revision (an older rollout). ValueError if malformed."""
    if not isinstance(value, dict) or not isinstance(value.get("revision"), str):
        raise ValueError(f"expected an object with a revision, got {str(value)[:80]!r}")
    if value["revision"] != revision:
        return None
    counts = []
    for field in ("crashes", "refused"):
        d = value.get(field) or {}
        if not isinstance(d, dict) or not all(k.isdigit() and isinstance(v, int) and v >= 0
                                              for k, v in d.items()):
            raise ValueError(f"{field}: expected {{slot: count}}, got {str(d)[:80]!r}")
        counts.append({int(k): v for k, v in d.items()})
    counted = value.get("counted") or []
    if not isinstance(counted, list) or not all(isinstance(i, str) for i in counted):
        raise ValueError(f"counted: expected a list of instance ids, got {str(counted)[:80]!r}")
    return counts[0], counts[1], set(counted)


class RolloutDriver:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.states: dict[str, RolloutState] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.controls: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str | None] = {}
        self.terminating: set[str] = set()
        self.weights: dict[str, int] = {}
        self.crashes: dict[tuple[str, int], int] = {}       # restarts of the target, per slot
        self.refused: dict[tuple[str, int], int] = {}       # refused starts of the target, per slot
        self.last_exit: dict[tuple[str, int], int] = {}     # exit code of the target's last crash, per slot
        self.counted: dict[str, set[str]] = {}              # exits already counted, per service
        self._stored: dict[str, tuple[Any, Any, Any]] = {}
        self._specs: dict[tuple[str, str], config.ServiceSpec] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- KV ----------------------------------------------------------------------------

    def load(self, entries: Mapping[str, bytes]) -> None:
        """Everything under ``meshlet/rollout/`` as read at start (state, history, crash
        counts, control, restart); unreadable values are logged and ignored."""
        crash_docs: dict[str, Any] = {}
        for key, raw in entries.items():
            service, _, kind = key[len(ROLLOUT_PREFIX):].rpartition("/")
            try:
                value = json.loads(raw or b"null")
                if kind == "state" and value is not None:
                    self.states[service] = RolloutState.from_dict(value)
                elif kind == "history":
                    if not _valid_history(value):
                        raise RolloutError(f"expected a list of history entries, got {raw[:80]!r}")
                    self.histories[service] = value
                elif kind == "crashes" and value is not None:
                    crash_docs[service] = value
            except (ValueError, RolloutError) as exc:
                log.error("ignoring unreadable %s: %s", key, exc)
        for service, value in crash_docs.items():
            st = self.states.get(service)
            try:
                counts = read_crash_doc(value, st.revision) if st and st.phase in _ENGINE_OWNS else None
            except ValueError as exc:
                log.error("ignoring unreadable %s: %s", crashes_key(service), exc)
                counts = None
            if counts is not None:
                crashes, refused, self.counted[service] = counts
                self.crashes.update(((service, slot), n) for slot, n in crashes.items())
                self.refused.update(((service, slot), n) for slot, n in refused.items())
        for service in set(self.states) | set(self.histories) | set(crash_docs):
            st = self.states.get(service)
            # what KV holds: a stale or unreadable crash document is replaced at the next store
            self._stored[service] = (st.to_dict() if st else None, self.histories.get(service),
                                     crash_docs.get(service))
        self.on_control(entries, initial=True)

    def on_control(self, entries: Mapping[str, bytes], initial: bool = False) -> set[str]:
        """The control and restart keys (from the watch): returns the services they changed."""
        controls: dict[str, dict[str, Any]] = {}
        tokens: dict[str, str | None] = {}
        for key, raw in entries.items():
            service, _, kind = key[len(ROLLOUT_PREFIX):].rpartition("/")
            if kind not in ("control", "restart"):
                continue
            try:
                value = json.loads(raw or b"null")
            except ValueError:
                log.error("ignoring unreadable %s", key)
                continue
            if not isinstance(value, dict):
                continue
            if kind == "control":
                controls[service] = value
            elif token := restart_token(value):
                tokens[service] = token
        changed = {s for s in set(controls) | set(self.controls) if controls.get(s) != self.controls.get(s)}
        changed |= {s for s in set(tokens) | set(self.tokens) if tokens.get(s) != self.tokens.get(s)}
        self.controls, self.tokens = controls, tokens
        for service in changed:
            self._apply_control(service, initial)
        return changed

    def _apply_control(self, service: str, initial: bool) -> None:
        st = self.states.get(service)
        if st is None:
            return
        control = self.controls.get(service) or {}
        now = self.sup.clock()
        if control.get("paused"):
            self.states[service] = pause(st, str(control.get("reason") or "paused by the user"))
        elif st.phase == PAUSED and not (initial and st.reason.startswith("revert to ")):
            # at start a failed revert stays paused; a resume seen live resumes anything
            self.states[service] = resume(st, now)

    def _crash_doc(self, service: str) -> dict[str, Any] | None:
        st = self.states.get(service)
        if st is None or st.phase not in _ENGINE_OWNS:
            return None
        counted = self.counted.get(service)
        if counted:
            counted &= self.sup.instances.keys()  # one gone is never observed (nor counted) again
        return crash_doc(st.revision, {slot: n for (name, slot), n in self.crashes.items() if name == service},
                         {slot: n for (name, slot), n in self.refused.items() if name == service},
                         counted or set())

    async def store(self, service: str) -> None:
        st = self.states.get(service)
        want = (st.to_dict() if st else None, self.histories.get(service), self._crash_doc(service))
        if self._stored.get(service) == want:
            return
        client = self.sup._client
        stored = self._stored.get(service, (None, None, None))
        # only what changed (a step that moves the state leaves the history as it was), and
        # in one transaction: a crash between two writes would leave a state naming a
        # revision that the history does not have, or crash counts of another rollout
        ops = []
        if want[1] is not None and want[1] != stored[1]:
            ops.append(kv_op("set", history_key(service), value=json.dumps(want[1])))
        if want[0] != stored[0] or service not in self._stored:
            ops.append(kv_op("set", state_key(service), value=json.dumps(want[0])) if want[0] is not None
                       else kv_op("delete", state_key(service)))
        if want[2] != stored[2]:
            ops.append(kv_op("set", crashes_key(service), value=json.dumps(want[2])) if want[2] is not None
                       else kv_op("delete", crashes_key(service)))
        try:
            if ops:
                await kv_txn(client, ops)
            self._stored[service] = want
        except Exception as exc:  # noqa: BLE001 - stored again after the next step
            log.warning("cannot store the rollout of %s: %s", service, exc)

    # --- what should run -------------------------------------------------------------------

    def doc_target(self, service: str) -> str | None:
        entry = self.sup.desired.get(service)
        return restart_revision(entry[1], self.tokens.get(service)) if entry else None

    def spec_for(self, service: str, revision: str) -> config.ServiceSpec | None:
        """The spec replicas of ``revision`` run: the applied one, or its history entry's
        (with the applied ``replicas``: a revert goes back on the template, not the scale).
        Unknown revisions (adopted from before any history) get the applied spec."""
        entry = self.sup.desired.get(service)
        if entry is None:
            return None
        if revision == self.doc_target(service):
            return entry[0]
        spec = self._specs.get((service, revision))
        if spec is None:
            for e in reversed(self.histories.get(service, ())):
                if e.get("revision") == revision and isinstance(e.get("spec"), dict):
                    try:
                        spec = config.ServiceSpec.from_dict(e["spec"], source=f"history of {service}")
                    except (config.ConfigError, ValueError, TypeError) as exc:
                        log.error("history entry %s of %s: %s", e.get("number"), service, exc)
                        continue
                    self._specs[(service, revision)] = spec
                    break
        if spec is None:
            return entry[0]
        return dataclasses.replace(spec, replicas=entry[0].replicas)

    def effective(self) -> dict[str, tuple[config.ServiceSpec, str]]:
        out = {}
        for name, (spec, _) in self.sup.desired.items():
            st = self.states.get(name)
            revision = st.revision if st is not None else self.doc_target(name)
            assert revision is not None
            out[name] = (self.spec_for(name, revision) or spec, revision)
        return out

    def rolling(self) -> frozenset[str]:
        return frozenset(n for n, st in self.states.items()
                         if st.phase in _ENGINE_OWNS and n in self.sup.desired)

    # --- starting a rollout ------------------------------------------------------------------

    def _record(self, service: str, revision: str, spec_doc: Any, token: str | None,
                limit: int, now: float) -> None:
        before = self.histories.get(service, [])
        try:
            history = record_revision(before, revision, spec_doc, now, limit)
        except RolloutError as exc:      # a corrupt history in KV: start a new one
            log.error("history of %s: %s; starting a new one", service, exc)
            history = record_revision([], revision, spec_doc, now, limit)
        entry = history[-1]
        entry["restart_token"] = token
        if before and before[-1].get("revision") != revision:   # (re-recording the active one: as it was)
            entry["change"] = change_summary(before[-1], entry)
        self.histories[service] = history

    async def begin(self, service: str, now: float) -> None:
        entry = self.sup.desired.get(service)
        if entry is None:
            return
        spec = entry[0]
        want = self.doc_target(service)
        assert want is not None
        token = self.tokens.get(service)
        st = self.states.get(service)
        if st is not None and want in (st.revision, st.reverted_from):
            await self._first_complete(service, spec, now)
            return
        others = [i for i in self._instances(service)
                  if i.obs.is_running and i.obs.revision != want and i.obs.instance_id not in self.terminating]
        history = self.histories.get(service, [])
        if not others:
            # A first deploy (or all on it already): reconcile starts it; no rollout.
            if not history or not isinstance(history[-1], dict) or history[-1].get("revision") != want:
                self._record(service, want, spec.to_dict(), token, spec.update.history, now)
            self.states.pop(service, None)
            await self.store(service)
            await self._first_complete(service, spec, now)
            return
        self._record(service, want, spec.to_dict(), token, spec.update.history, now)
        st = start_rollout(service, want, self.histories[service], now, restart_token=token)
        if (self.controls.get(service) or {}).get("paused"):
            st = pause(st, str(self.controls[service].get("reason") or "paused by the user"))
        self._reset_crashes(service)
        self.states[service] = st
        log.info("rollout of %s to %s started (revert target %s)", service, want, st.revert_to)
        self.sup._note(f"rollout {service}: to {want}")
        await self.store(service)

    async def _first_complete(self, service: str, spec: config.ServiceSpec, now: float) -> None:
        """No rollout state yet: once every replica of the active revision is ready it is
        marked complete (a later auto-revert target) and the state says so."""
        history = self.histories.get(service)
        want = self.doc_target(service)
        if service in self.states or not history or spec.replicas == 0:
            return
        last = history[-1]
        if last["revision"] != want or last["status"] != "active":
            return
        ready = sum(1 for i in self._instances(service)
                    if i.obs.revision == want and i.obs.is_running and i.health.ready)
        if ready < spec.replicas:
            return
        self.histories[service] = mark_revision(history, want, "complete")
        self.states[service] = RolloutState(service, want, COMPLETE, now, now,
                                            restart_token=self.tokens.get(service),
                                            reason=f"deployed {want}: {ready} ready")
        await self.store(service)

    # --- observing -------------------------------------------------------------------------

    def _instances(self, service: str) -> list[_Inst]:
        return [i for i in self.sup.instances.values() if i.obs.service == service]

    def _reset_crashes(self, service: str) -> None:
        for counts in (self.crashes, self.refused, self.last_exit):
            for key in [k for k in counts if k[0] == service]:
                del counts[key]
        self.counted.pop(service, None)

    def note_exit(self, inst: _Inst) -> None:
        """An instance exited (crash, kill; or found exited at start): a restart of the
        rollout's target counts, once per instance, across supervisor restarts (stored with
        the state at the next step)."""
        o = inst.obs
        st = self.states.get(o.service)
        counted = self.counted.setdefault(o.service, set())
        if o.instance_id in counted or o.instance_id in self.terminating or st is None \
                or st.phase not in _ENGINE_OWNS or o.revision != st.revision:
            return
        counted.add(o.instance_id)
        self.crashes[(o.service, o.slot)] = self.crashes.get((o.service, o.slot), 0) + 1
        if o.exit_code is not None:
            self.last_exit[(o.service, o.slot)] = o.exit_code
        else:   # not witnessed (adopted): an older code would be taken for this exit's
            self.last_exit.pop((o.service, o.slot), None)

    def observe(self, service: str, st: RolloutState, spec: config.ServiceSpec,
                now: float) -> list[ObservedReplica]:
        insts = self._instances(service)
        running_new = {i.obs.slot for i in insts if i.obs.is_running and i.obs.revision == st.revision
                       and i.obs.instance_id not in self.terminating}
        out = []
        latest_exit: dict[int, _Inst] = {}
        for i in insts:
            o = i.obs
            if not o.is_running and o.revision == st.revision and o.instance_id not in self.terminating:
                # one exited replica of the target per slot stands for the slot (the newest)
                prev = latest_exit.get(o.slot)
                if o.slot in running_new or (prev is not None and (prev.obs.finished_at or 0) >= (o.finished_at or 0)):
                    continue
                latest_exit[o.slot] = i
        for i in insts:
            o = i.obs
            iid = o.instance_id
            restarts = self.crashes.get((service, o.slot), 0) if o.revision == st.revision else 0
            ready_since = None
            if iid in self.terminating:
                phase = TERMINATING
            elif not o.is_running:
                if o.revision == st.revision:
                    if latest_exit.get(o.slot) is not i:
                        continue
                    phase = STARTING if self._restarts(i, spec, now) else EXITED
                else:
                    phase = EXITED
            elif i.health.ready and not i.killed and i.pushed == "passing":
                # ready once the catalog says so: an old replica is never retired before
                # its replacement is passing where proxies and DNS read it
                phase, ready_since = READY, i.ready_since if i.ready_since is not None else now
            else:
                phase = STARTING
            last_exit = None
            if o.revision == st.revision:   # its own exit, or the slot's last crash before it
                last_exit = o.exit_code if not o.is_running else self.last_exit.get((service, o.slot))
            out.append(ObservedReplica(iid, o.slot, o.revision, phase, ready_since, restarts,
                                       self.weights.get(iid, 1), last_exit=last_exit))
        # A slot whose start the runtime refused twice stands as a crash-looping replica of
        # the target (once: the start is retried after its hold, as a crash would be).
        taken = {r.slot for r in out if r.revision == st.revision and r.phase != TERMINATING}
        for (name, slot), n in sorted(self.refused.items()):
            if name == service and n >= 2 and slot not in taken and slot < spec.replicas:
                out.append(ObservedReplica(f"{service}-{slot}-refused", slot, st.revision, STARTING,
                                           restarts=n, problem=self.sup.start_errors.get((service, slot), "")
                                           or "the runtime refused to start it"))
        return out

    def _restarts(self, inst: _Inst, spec: config.ServiceSpec, now: float) -> bool:
        o = inst.obs
        if o.slot >= spec.replicas:
            return False
        d = decide(spec.restart, self.sup.backoff.get((o.service, o.slot), BackoffState()),
                   exit_code=o.exit_code, started_at=o.started_at,
                   finished_at=o.finished_at if o.finished_at is not None else (inst.noticed_exit or now),
                   failed=inst.killed)
        return d.restart

    # --- stepping ---------------------------------------------------------------------------

    async def step(self, service: str, now: float) -> None:
        st = self.states.get(service)
        if st is None or st.phase not in (PROGRESSING, REVERTING) or service not in self.sup.desired:
            if st is not None and st.phase in _ENGINE_OWNS:
                await self.store(service)   # crash counts taken while paused or failed
            return
        spec = self.spec_for(service, st.revision) or self.sup.desired[service][0]
        strategy = Strategy.from_spec(spec.replicas, spec.update)
        observed = self.observe(service, st, spec, now)
        result = rollout_step(st, observed, strategy, now)
        self.states[service] = result.state
        if result.actions:
            log.info("rollout %s: %s", service, result.fields())
        acted = False
        for action in result.actions:
            acted |= await self._execute(service, action, now)
        if result.state.phase != st.phase:
            log.info("rollout of %s: %s (%s)", service, result.state.phase, result.state.reason)
            self.sup._note(f"rollout {service}: {result.state.phase}: {result.state.reason}")
        await self.store(service)
        if result.followup_at is not None:
            self.sup._follow_up(service, FOLLOWUP_SLOT, result.followup_at - now)
        if acted:
            self.sup.enqueue(service)    # level-triggered: look again with the new view

    async def _execute(self, service: str, a: Any, now: float) -> bool:
        history = self.histories.get(service, [])
        if isinstance(a, StartReplica):
            return await self._start(service, a, now)
        if isinstance(a, RetireReplica):
            return self.retire(a.instance_id, a.reason)
        if isinstance(a, SetWeight):
            self.weights[a.instance_id] = a.weight
            inst = self.sup.instances.get(a.instance_id)
            if inst is not None and a.instance_id in self.sup.registered:
                await self.sup._register(inst)
            return True
        if isinstance(a, MarkFailed):
            log.error("rollout of %s: revision %s failed: %s", service, a.revision, a.reason)
            self.histories[service] = mark_revision(history, a.revision, FAILED)
        elif isinstance(a, MarkComplete):
            self.histories[service] = mark_revision(history, a.revision, COMPLETE)
        elif isinstance(a, Revert):
            entry = next((e for e in reversed(history) if e.get("revision") == a.to_revision), None)
            spec = self.sup.desired[service][0]
            token = entry.get("restart_token") if entry else None
            self._record(service, a.to_revision, entry.get("spec") if entry else None, token,
                         spec.update.history, now)
            self.states[service] = dataclasses.replace(self.states[service], restart_token=token)
            self._reset_crashes(service)
            for key in [k for k in self.sup._start_hold if k[0] == service]:
                del self.sup._start_hold[key]      # held for the failed revision's starts
            self.sup.problems.pop(service, None)
            log.warning("rollout of %s: reverting to %s: %s", service, a.to_revision, a.reason)
            return True
        return False

    async def _start(self, service: str, a: StartReplica, now: float) -> bool:
        sup = self.sup
        hold = sup._start_hold.get((service, a.slot))
        if hold is not None and now < hold:
            sup._follow_up(service, a.slot, hold - now)
            return False
        spec = self.spec_for(service, a.revision)
        if spec is None:
            return False
        beside = [i.obs.node for i in self._instances(service)
                  if i.obs.slot == a.slot and i.obs.node in sup.nodes]
        node = beside[0] if beside else None
        if node is None:
            observed = sup.observed()
            result = place([Request(spec, a.slot)], observed.nodes,
                           allocations(self.effective(), observed.replicas))
            if not result.placed:
                reason = result.failed[0][1] if result.failed else "no node"
                sup.problems[service] = f"slot {a.slot}: {reason}"
                return False
            node = result.placed[0][1]
        started = await sup._start_instance(service, a.slot, a.revision, node, BackoffState(), a.reason,
                                            weight=a.weight)
        key = (service, a.slot)
        if started:
            self.refused.pop(key, None)
        else:
            # A refused start (image missing, engine error) is a crash the engine cannot
            # see: counted here, and shown to it as a replica of the slot (see observe)
            self.refused[key] = self.refused.get(key, 0) + 1
        return started

    # --- retiring ----------------------------------------------------------------------------

    def retire(self, iid: str, reason: str) -> bool:
        inst = self.sup.instances.get(iid)
        if inst is None or iid in self.terminating:
            return False
        self.terminating.add(iid)       # reported terminating from now on
        task = asyncio.create_task(self._retire(inst, reason), name=f"retire {iid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _retire(self, inst: _Inst, reason: str) -> None:
        sup = self.sup
        iid, service = inst.obs.instance_id, inst.obs.service
        spec = self.spec_for(service, inst.obs.revision)
        try:
            for attempt in range(30):
                serving = iid in sup.registered and inst.obs.is_running and inst.health.ready
                if inst.prober is not None:
                    inst.prober.close()
                    inst.prober = None
                await sup._deregister(iid)          # out of the catalog FIRST
                if serving:
                    drain = max(MIN_DRAIN, spec.update.drain_delay if spec else 0.0)
                    await asyncio.sleep(drain)      # proxies and DNS drop it
                    await self._wait_in_flight(iid, IN_FLIGHT_LIMIT)
                await sup._stop_instance(iid, f"retired: {reason}")
                if iid not in sup.instances:
                    break
                await asyncio.sleep(min(1.0 + attempt, 10.0))   # the runtime refused: again
            else:
                log.error("could not retire %s", iid)
        finally:
            if iid not in sup.instances:
                self.terminating.discard(iid)
                self.weights.pop(iid, None)
            sup.enqueue(service)

    async def _wait_in_flight(self, iid: str, limit: float) -> None:
        """Until no proxy the supervisor knows of (``Supervisor.proxy_admins``) lists ``iid``
        among its draining endpoints (``GET /routes``: left the table, requests still in
        flight), at most ``limit`` seconds. A proxy that does not answer is not waited for."""
        session = self.sup._session
        if not self.sup.proxy_admins or session is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            busy = []
            for admin in self.sup.proxy_admins:
                try:
                    async with session.get(f"http://{admin}/routes",
                                           timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                        doc = await r.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue
                draining = doc.get("draining") if isinstance(doc, dict) else None
                busy += [d.get("active") for d in draining or () if isinstance(d, dict)
                         and iid in (d.get("instance"), d.get("id"))]
            if not busy:
                return
            if loop.time() >= deadline:
                log.warning("%s still has %s request(s) in flight after %gs; stopping it",
                            iid, sum(b for b in busy if isinstance(b, int)), limit)
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- status --------------------------------------------------------------------------------

    def status(self, service: str) -> dict[str, Any] | None:
        st = self.states.get(service)
        history = self.histories.get(service) or []
        if st is None:
            if not history:
                return None
            return {"phase": "deploying", "revision": history[-1]["revision"],
                    "number": history[-1]["number"], "summary": "first deploy", "reason": ""}
        number = next((e["number"] for e in reversed(history) if e.get("revision") == st.revision), None)
        insts = [i for i in self._instances(service) if i.obs.is_running
                 and i.obs.instance_id not in self.terminating]
        spec = self.spec_for(service, st.revision)
        replicas = spec.replicas if spec else len({i.obs.slot for i in insts})
        updated = sum(1 for i in insts if i.obs.revision == st.revision)
        old = len(insts) - updated
        progress = f"{min(updated, replicas)}/{replicas} updated" + (f", {old} old" if old else "")
        strategy = Strategy.from_spec(replicas, spec.update) if spec else None
        now = self.sup.clock()
        line = describe(st, self.observe(service, st, spec, now) if spec else [], strategy, now)
        return {"phase": st.phase, "revision": st.revision, "number": number, "progress": progress,
                "reason": st.reason, "reverted_from": st.reverted_from, "summary": line,
                "terminating": sum(1 for i in self._instances(service)
                                   if i.obs.instance_id in self.terminating)}

    def attention(self, service: str) -> str | None:
        """What ``meshlet status`` should say of a rollout that needs a human: failed,
        paused, or reverted (the applied document is not what runs)."""
        st = self.states.get(service)
        if st is None:
            return None
        if st.phase in (FAILED, PAUSED):
            return f"rollout {st.phase}: {st.reason}"
        if st.phase == REVERTING:
            return f"rollout: {st.reason}"
        if st.phase == COMPLETE and st.reverted_from and st.reverted_from == self.doc_target(service):
            return f"rollout: {st.reason}; the applied revision {st.reverted_from} is not running"
        return None

