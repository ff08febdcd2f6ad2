"""The Supervisor: observe (runtimes, catalog) -> reconcile (pure) -> act, level-triggered.

Flow::

    KV meshlet/services/ --watch--+
    KV meshlet/rollout/ ----------+
    runtime events (exits) -------+--> enqueue(service) --> _sync(service):
    probe state changes ----------+        rolling.begin: a new desired revision starts a rollout
    timer (resync, follow-ups) ---+        observed = runtimes + registrations + probes
                                           actions  = reconcile_service(...)   (pure)
                                           execute actions (start/stop/register...)
                                           rolling.step: rollout_step (pure) and its actions

Handlers only record what they saw and enqueue the service's name; one sync per service
runs at a time and re-reads everything (a delete is a sync that finds no desired spec).
The one exception is readiness: a probe flip is pushed to the instance's TTL check at once
(a few ms) so DNS and the proxy drop or take the instance without waiting for a sync.

Start-up order (act on a full view): subscribe to runtime events, list every runtime and
the catalog's registrations, read the desired specs, adopt what runs by identity
(service, slot, revision, instance id from labels / state files), and only then run the
first reconcile. A supervisor restarted after ``kill -9`` therefore restarts no healthy
replica and starts no duplicate.

Each replica: ports assigned from ``PORT_RANGE`` (checked free with a bind), env ``PORT``,
``PORT_<NAME>``, ``MESHLET_*``, ``HOST``; a catalog instance (ID = instance id, Meta
revision/node/slot/weight/port_<name>) with one TTL check ``service:<ID>`` that starts
critical and follows readiness; deregistered before it is stopped.

Revisions: replicas run ``rollout_keys.target_revision(spec, restart token)``. A change
of it with replicas of another revision running is a rollout, driven by ``rolling.py``;
reconcile leaves that service's revisions to it (``Observed.rolling``). The actions on a
single replica (start, register, status pushes, stop) are in ``_actions.py``.

Errors: runtime and catalog failures during a sync are logged and the sync is retried on
the next resync tick; nothing here raises into the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

import config
from config import SERVICES_PREFIX
from discovery.consul import connect, kv_delete, kv_put, watch_kv_prefix

from ._actions import PORT_RANGE, ReplicaActions, _Inst, port_is_free
from .backoff import BackoffState
from .place import NodeInfo
from .reconcile import (Action, Deregister, Kill, Observed, Register, Start, Stop, Unplaceable, Wait,
                        reconcile_service, summary)
from .rollout_keys import ROLLOUT_PREFIX, template_revision
from .rolling import RolloutDriver
from .runtime import RUNTIMES, Runtime, RuntimeEvent, WorkloadError

__all__ = ["Supervisor", "make_runtime", "PORT_RANGE", "DEFAULT_ENGINE", "main",
           "port_is_free"]

log = logging.getLogger(__name__)

# The TTL of every instance check. Status is pushed on every probe change and re-asserted
# every TTL/2; a generous TTL only matters if the supervisor dies (the check then goes
# critical after at most 30 s, while the workload may still be serving).
CHECK_TTL = 30.0
# Level-triggered safety net: re-list the runtimes and sync every service this often.
RESYNC = 5.0
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# Restart counts and back-off per slot survive a supervisor restart here:
# meshlet/backoff/<service>/<slot> = {"failures": N, "restarts": N}
BACKOFF_PREFIX = "meshlet/backoff/"


# --------------------------------------------------------------------------- nodes


def make_runtime(node: config.NodeSpec, data_dir: Path) -> Runtime:
    if node.runtime == "docker":
        engine = node.engine or DEFAULT_ENGINE
        # A local engine mounts the workloads' resolv.conf read-only from a file we write
        # (an absolute host path); a remote one writes it itself.
        local = engine.startswith("unix://")
        return RUNTIMES["docker"](engine, node=node.name, address=node.address,
                                  data_dir=(data_dir / "nodes" / node.name).resolve() if local else None)
    return RUNTIMES["process"](data_dir / "nodes" / node.name, node=node.name, address=node.address)



# --------------------------------------------------------------------------- supervisor


class Supervisor(ReplicaActions):
    """Runs the desired services on ``nodes`` and keeps the catalog in step.

    ``start()`` observes in full and adopts before the first reconcile; ``close(stop=True)``
    deregisters and stops every workload, ``close(stop=False)`` leaves them running for the
    next supervisor to adopt.

    ``dns``: the resolver address (port 53) of meshlet's DNS; containers started on docker
    nodes get a resolv.conf naming it, so ``<service>.service.<domain>`` resolves in them
    without app changes. Processes keep the host's resolver (no per-process resolv.conf
    without a mount namespace).

    ``proxy_admins``: admin addresses ("host:port") of proxies whose ``/routes`` says which
    retired replicas still carry requests; a rollout waits for those before SIGTERM."""

    def __init__(self, url: str, nodes: list[config.NodeSpec], data_dir: str | os.PathLike[str], *,
                 runtimes: Mapping[str, Runtime] | None = None, resync: float = RESYNC,
                 check_ttl: float = CHECK_TTL, clock: Any = time.time, dns: str | None = None,
                 proxy_admins: Sequence[str] = ()) -> None:
        self.url = url
        self.dns = dns
        self.proxy_admins = tuple(proxy_admins)    # proxies a retired replica drains from
        self.nodes = {n.name: n for n in nodes}
        self.data_dir = Path(data_dir)
        self.runtimes: dict[str, Runtime] = dict(runtimes or {})
        self.resync = resync
        self.check_ttl = check_ttl
        self.clock = clock
        self.desired: dict[str, tuple[config.ServiceSpec, str]] = {}
        self.instances: dict[str, _Inst] = {}
        self.registered: dict[str, str] = {}         # instance id -> service
        self.registered_rev: dict[str, str] = {}     # instance id -> Meta revision registered
        self.doc_revision: dict[str, str] = {}       # service -> revision of the KV document
        self.doc_raw: dict[str, bytes] = {}          # the documents as last read
        self.backoff: dict[tuple[str, int], BackoffState] = {}
        self.problems: dict[str, str] = {}           # service -> why a slot cannot run
        self.start_errors: dict[tuple[str, int], str] = {}   # (service, slot) -> the runtime's last refusal
        # (service, slot) -> when to try a start the runtime refused again (missing image,
        # engine error): refusals back off like crashes instead of retrying every sync.
        self._start_hold: dict[tuple[str, int], float] = {}
        # Instances this supervisor removed: a re-list that began before the removal must
        # not adopt them again (insertion-ordered, the last 1000 kept).
        self._removed: dict[str, None] = {}
        self.events: list[str] = []                  # recent actions, for status
        self.history: list[tuple[float, str, str]] = []   # (time, "start"/"kill"/..., instance)
        self._dirty: set[str] = set()
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._followups: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._pending_status: set[asyncio.Task[Any]] = set()
        self._ports_taken: set[int] = set()
        self._client: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._kv_loaded = asyncio.Event()
        self._closed = False
        self._adopted = False   # no sync before the full view is observed and adopted
        self.rolling = RolloutDriver(self)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        self._client = connect(self.url, timeout=40.0)
        self._session = aiohttp.ClientSession()
        for node in self.nodes.values():
            if node.name not in self.runtimes:
                self.runtimes[node.name] = make_runtime(node, self.data_dir)
        # Subscribe before the first list() so no exit falls between them.
        for rt in self.runtimes.values():
            self._tasks.append(asyncio.create_task(self._consume(rt), name=f"events {rt.node}"))
        listed = await asyncio.gather(*(rt.list() for rt in self.runtimes.values()))
        registrations, checks = await self._list_registrations()
        await self._load_backoff()
        _, entries = await self._client.kv.get(ROLLOUT_PREFIX, recurse=True)
        self.rolling.load({e["Key"]: e.get("Value") or b"" for e in entries or ()})
        self._tasks.append(asyncio.create_task(self._watch_desired(), name="watch desired"))
        self._tasks.append(asyncio.create_task(self._watch_rollouts(), name="watch rollouts"))
        await asyncio.wait_for(self._kv_loaded.wait(), timeout)
        now = self.clock()
        for observed in (o for group in listed for o in group):
            inst = _Inst(observed, noticed_exit=None if observed.is_running else now)
            self.instances[observed.instance_id] = inst
            self._ports_taken.update(observed.ports.values())
            if observed.is_running:
                passing = checks.get(f"service:{observed.instance_id}") == "passing"
                self._start_probes(inst, adopted_ready=passing)
                if passing:
                    inst.ready_since, inst.pushed = now, "passing"
            else:
                # exited while no supervisor watched (or before it last stored): a crash of
                # a rollout's target counts once (the stored counts name those counted)
                self.rolling.note_exit(inst)
        self.registered = registrations
        log.info("adopted %d instances (%d running), %d registrations; %d services desired",
                 len(self.instances), sum(i.obs.is_running for i in self.instances.values()),
                 len(registrations), len(self.desired))
        self._tasks.append(asyncio.create_task(self._tick(), name="resync"))
        self._adopted = True
        for name in self._service_names():
            self.enqueue(name)

    async def close(self, *, stop: bool) -> None:
        """Stop the loop; with ``stop`` deregister and stop every workload first."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for handle in self._followups.values():
            handle.cancel()
        syncs = list(self._syncing.values())
        for task in syncs:
            task.cancel()
        await asyncio.gather(*self._tasks, *syncs, return_exceptions=True)
        await self.rolling.close()
        for inst in self.instances.values():
            if inst.prober is not None:
                inst.prober.close()
        if stop:
            await asyncio.gather(*(self._stop_instance(i.obs.instance_id, "meshlet is stopping")
                                   for i in list(self.instances.values())), return_exceptions=True)
            # A start cancelled above may have left an instance we never recorded: list
            # every node once more and stop whatever meshlet still owns there.
            for rt in self.runtimes.values():
                try:
                    leftovers = await rt.list()
                except WorkloadError as exc:
                    log.warning("cannot list node %s while stopping: %s", rt.node, exc)
                    continue
                for o in leftovers:
                    await self._deregister(o.instance_id)
                    try:
                        await rt.stop(o.instance_id, grace=0 if not o.is_running else 5.0)
                        await rt.remove(o.instance_id)
                    except WorkloadError as exc:
                        log.warning("cannot stop %s: %s", o.instance_id, exc)
            # Likewise a registration whose request was cut off: nothing of ours runs now.
            try:
                self.registered, _ = await self._list_registrations()
                for iid in list(self.registered):
                    await self._deregister(iid)
            except Exception as exc:  # noqa: BLE001 - the catalog may be gone already
                log.warning("cannot clear registrations while stopping: %s", exc)
        for rt in self.runtimes.values():
            try:
                await rt.close()
            except Exception:  # noqa: BLE001 - closing continues with the rest
                log.warning("closing runtime %s failed", rt, exc_info=True)
        if self._pending_status:
            await asyncio.gather(*self._pending_status, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()

    # --- observation ---------------------------------------------------------------------

    async def _list_registrations(self) -> tuple[dict[str, str], dict[str, str]]:
        services = await self._client.agent.services()
        checks = await self._client.agent.checks()
        ours = {}
        for sid, svc in (services or {}).items():
            meta = svc.get("Meta") or {}
            if meta.get("node") in self.nodes and "slot" in meta and "revision" in meta:
                ours[sid] = svc.get("Service", "")
                self.registered_rev[sid] = meta["revision"]
                if str(meta.get("weight", "1")).isdigit() and meta.get("weight") != "1":
                    self.rolling.weights.setdefault(sid, int(meta["weight"]))
        return ours, {cid: c.get("Status", "") for cid, c in (checks or {}).items()}

    async def _load_backoff(self) -> None:
        _, entries = await self._client.kv.get(BACKOFF_PREFIX, recurse=True)
        for e in entries or ():
            try:
                service, slot = e["Key"][len(BACKOFF_PREFIX):].rsplit("/", 1)
                d = json.loads(e.get("Value") or b"{}")
                self.backoff[(service, int(slot))] = BackoffState(int(d["failures"]), int(d["restarts"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable back-off state %s", e.get("Key"))

    async def _save_backoff(self, service: str, slot: int, state: BackoffState) -> None:
        if self.backoff.get((service, slot)) == state:
            return
        self.backoff[(service, slot)] = state
        try:
            await kv_put(self._client, f"{BACKOFF_PREFIX}{service}/{slot}",
                         json.dumps({"failures": state.failures, "restarts": state.restarts}))
        except Exception as exc:  # noqa: BLE001 - only the restart count is at stake
            log.warning("cannot store the back-off of %s slot %d: %s", service, slot, exc)

    async def _forget_backoff(self, service: str) -> None:
        for key in [k for k in self._start_hold if k[0] == service]:
            del self._start_hold[key]
        if not any(k[0] == service for k in self.backoff):
            return
        for key in [k for k in self.backoff if k[0] == service]:
            del self.backoff[key]
        try:
            await kv_delete(self._client, f"{BACKOFF_PREFIX}{service}/", recurse=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot delete the back-off of %s: %s", service, exc)

    async def _watch_desired(self) -> None:
        async for docs in watch_kv_prefix(self._client, SERVICES_PREFIX):
            changed = self._apply_docs(docs)
            if changed and self._kv_loaded.is_set():
                # `meshlet rollback` writes the document and the restart key in one
                # transaction: read the other half now, so no sync sees one without the
                # other (which would start a rollout to a revision nobody asked for).
                changed |= await self._reread(ROLLOUT_PREFIX, self.rolling.on_control)
            self._kv_loaded.set()
            for name in sorted(changed):
                # A new spec (a fixed image, say) is tried at once, not after the hold.
                for key in [k for k in self._start_hold if k[0] == name]:
                    del self._start_hold[key]
                self.enqueue(name)

    def _apply_docs(self, docs: Mapping[str, bytes]) -> set[str]:
        desired: dict[str, tuple[config.ServiceSpec, str]] = {}
        for key, raw in docs.items():
            name = key[len(SERVICES_PREFIX):]
            try:
                spec, _vip, revision = config.parse_service_document(raw, source=key)
            except (config.ConfigError, ValueError, TypeError, KeyError) as exc:
                # Keep the last good spec of that service rather than stopping it.
                if self.doc_raw.get(key) != raw:
                    log.error("ignoring unreadable %s: %s", key, exc)
                if name in self.desired:
                    desired[name] = self.desired[name]
                continue
            desired[spec.name] = (spec, template_revision(spec))
            self.doc_revision[spec.name] = revision
        self.doc_raw = dict(docs)
        changed = {n for n in set(desired) | set(self.desired) if desired.get(n) != self.desired.get(n)}
        self.desired = desired
        return changed

    async def _reread(self, prefix: str, apply: Any) -> set[str]:
        try:
            _, entries = await self._client.kv.get(prefix, recurse=True)
        except Exception as exc:  # noqa: BLE001 - the watch delivers it a moment later
            log.warning("cannot read %s: %s", prefix, exc)
            return set()
        return set(apply({e["Key"]: e.get("Value") or b"" for e in entries or ()}))

    async def _watch_rollouts(self) -> None:
        # The CLI's pause/resume and restart keys act at once (state and history under the
        # same prefix are ours: read once at start).
        async for docs in watch_kv_prefix(self._client, ROLLOUT_PREFIX):
            changed = self.rolling.on_control(docs)
            if changed:
                changed |= await self._reread(SERVICES_PREFIX, self._apply_docs)
            for name in sorted(changed):
                self.enqueue(name)

    async def _consume(self, rt: Runtime) -> None:
        # Exits arrive here at once; if the stream breaks, the resync tick's re-list still
        # notices every exit (at most RESYNC late) while we subscribe again.
        while True:
            try:
                async for event in rt.events():
                    self._on_event(event)
                return   # the runtime closed its stream: it is shutting down
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("runtime events of node %s failed; subscribing again", rt.node)
                await asyncio.sleep(1.0)

    def _on_event(self, event: RuntimeEvent) -> None:
        if event.kind == "resync":
            self._tasks.append(asyncio.create_task(self._relist()))
            return
        inst = self.instances.get(event.instance_id or "")
        if inst is None or event.observed is None:
            return
        inst.obs = event.observed
        inst.noticed_exit = self.clock()
        if inst.prober is not None:
            inst.prober.close()
            inst.prober = None
        inst.health = dataclasses.replace(inst.health, ready=False)
        log.info("%s exited (code %s)", event.instance_id, event.observed.exit_code)
        self.rolling.note_exit(inst)
        self._push_status(inst)
        self.enqueue(inst.obs.service)

    async def _relist(self) -> None:
        now = self.clock()
        for rt in list(self.runtimes.values()):
            try:
                listed = await rt.list()
            except WorkloadError as exc:
                log.warning("cannot list node %s: %s", rt.node, exc)
                continue
            for o in listed:
                if o.instance_id in self._removed:
                    continue   # listed before we removed it
                inst = self.instances.get(o.instance_id)
                if inst is None:
                    # Not started by us in this life and not seen at start: adopt it; the
                    # sync decides whether it is wanted.
                    inst = self.instances[o.instance_id] = _Inst(o, noticed_exit=None if o.is_running else now)
                    if o.is_running:
                        self._start_probes(inst)
                    self.enqueue(o.service)
                elif inst.obs.is_running and not o.is_running:
                    self._on_event(RuntimeEvent("exit", o.instance_id, o, now))

    async def _tick(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(self.resync)
            try:
                await self._relist()
                # The catalog is the truth for registrations: one restarted without its
                # state (or edited by hand) gets our instances registered again.
                regs, _ = await self._list_registrations()
                if regs != self.registered:
                    log.info("catalog registrations changed behind our back: %d -> %d",
                             len(self.registered), len(regs))
                    self.registered = regs
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                log.warning("resync: %s", exc)
            for name in self._service_names():
                self.enqueue(name)
            if time.monotonic() - last_status >= self.check_ttl / 2 - self.resync:
                last_status = time.monotonic()
                for inst in list(self.instances.values()):
                    self._push_status(inst, force=True)

    def _service_names(self) -> set[str]:
        return (set(self.desired) | {i.obs.service for i in self.instances.values()}
                | set(self.registered.values()))

    # --- the loop -------------------------------------------------------------------------

    def enqueue(self, service: str) -> None:
        if self._closed or not self._adopted:
            return
        self._dirty.add(service)
        if service not in self._syncing:
            self._syncing[service] = asyncio.create_task(self._sync_loop(service),
                                                         name=f"sync {service}")

    async def _sync_loop(self, service: str) -> None:
        try:
            while service in self._dirty and not self._closed:
                self._dirty.discard(service)
                try:
                    await self._sync(service)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - retried on the next tick
                    log.exception("sync of %s failed; retrying on the next resync", service)
        finally:
            self._syncing.pop(service, None)

    def observed(self) -> Observed:
        # Replicas being retired are the rollout's: reconcile neither keeps nor restarts them.
        gone = self.rolling.terminating
        return Observed(
            replicas=tuple(i.replica() for i in self.instances.values() if i.obs.instance_id not in gone),
            registered={k: v for k, v in self.registered.items() if k not in gone},
            nodes=tuple(NodeInfo(n.name, n.runtime or "process", n.address, n.capacity.cpu,
                                 n.capacity.memory, dict(n.labels)) for n in self.nodes.values()),
            backoff=dict(self.backoff), rolling=self.rolling.rolling())

    async def _sync(self, service: str) -> None:
        now = self.clock()
        await self.rolling.begin(service, now)
        actions = reconcile_service(service, self.rolling.effective(), self.observed(), now)
        await self._act(service, actions, now)
        await self.rolling.step(service, self.clock())

    async def _act(self, service: str, actions: list[Action], now: float) -> None:
        if not actions:
            await self._refresh_meta(service)
            return
        acting = [a for a in actions if not isinstance(a, Wait)]
        if acting:
            log.info("sync %s: %s", service, summary(acting))
        # Stops first (they free slots and ports), then the rest in order.
        stops = [a for a in actions if isinstance(a, Stop)]
        if stops:
            await asyncio.gather(*(self._stop_instance(a.instance_id, a.reason) for a in stops))
        for action in actions:
            if not isinstance(action, Stop):
                await self._execute(action, now)
        await self._refresh_meta(service)
        if service not in self.desired and not any(
                i.obs.service == service for i in self.instances.values()):
            await self._forget_backoff(service)

    async def _refresh_meta(self, service: str) -> None:
        # A change that keeps the template (replicas) keeps the replicas, but the catalog
        # names the applied revision in Meta (DNS serves spec tags for that revision only).
        if self.doc_revision.get(service) is None:
            return
        for inst in list(self.instances.values()):
            iid = inst.obs.instance_id
            if inst.obs.service == service and iid in self.registered and inst.obs.is_running \
                    and self.registered_rev.get(iid) != self._meta_revision(inst.obs) \
                    and iid not in self.rolling.terminating:
                await self._register(inst)

    async def _execute(self, action: Action, now: float) -> None:
        if isinstance(action, Start):
            hold = self._start_hold.get((action.service, action.slot))
            if hold is not None and now < hold:
                self._follow_up(action.service, action.slot, hold - now)
                return
            await self._start_instance(action.service, action.slot, action.revision, action.node,
                                       action.backoff, action.reason)
        elif isinstance(action, Kill):
            await self._kill_instance(action)
        elif isinstance(action, Register):
            inst = self.instances.get(action.instance_id)
            if inst is not None:
                await self._register(inst)
        elif isinstance(action, Deregister):
            await self._deregister(action.instance_id)
        elif isinstance(action, Wait):
            self._follow_up(action.service, action.slot, action.at - now)
        elif isinstance(action, Unplaceable):
            if self.problems.get(action.service) != action.reason:
                log.warning("%s slot %d: %s", action.service, action.slot, action.reason)
            self.problems[action.service] = f"slot {action.slot}: {action.reason}"

    def _follow_up(self, service: str, slot: int, delay: float) -> None:
        key = (service, slot)
        old = self._followups.pop(key, None)
        if old is not None:
            old.cancel()
        self._followups[key] = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self.enqueue, service)

    # --- actions --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m supervisor.agent --consul URL --data-dir DIR [--admin HOST:PORT]
    [--runtime R | --engine URL]``: the supervisor alone against a running catalog (see
    supervisor.up.run_standalone)."""
    from .up import standalone_main
    return standalone_main(argv)


if __name__ == "__main__":
    sys.exit(main())
