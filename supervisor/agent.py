"""The Supervisor: observe (runtimes, catalog) -> reconcile (pure) -> act, level-triggered.

Flow::

    KV meshlet/services/ --watch--+
    runtime events (exits) -------+--> enqueue(service) --> _sync(service):
    probe state changes ----------+        observed = runtimes + registrations + probes
    timer (resync) ---------------+        actions  = reconcile_service(...)   (pure)
                                           execute actions (start/stop/register...)

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

Errors: runtime and catalog failures during a sync are logged and the sync is retried on
the next resync tick; nothing here raises into the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import secrets
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import config
from discovery.consul import SERVICES_PREFIX, connect, kv_delete, kv_put, watch_kv_prefix

from .backoff import BackoffState, delay_for
from .place import NodeInfo
from .probes import Health, ProbeScheduler, initial_health
from .reconcile import (Action, Deregister, Kill, Observed, Register, Replica, Start, Stop,
                        Unplaceable, Wait, reconcile_service, summary)
from .runtime import RUNTIMES, InstanceNotFound, InstanceSpec, Runtime, RuntimeEvent, WorkloadError
from .runtime import Observed as RuntimeObserved

__all__ = ["Supervisor", "make_runtime", "template_revision", "PORT_RANGE", "DEFAULT_ENGINE", "main"]

log = logging.getLogger(__name__)

PORT_RANGE = (20000, 29999)
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


@dataclass(eq=False)
class _Inst:
    """One replica the supervisor knows of: what its runtime reports plus probe state."""

    obs: RuntimeObserved
    health: Health = field(default_factory=Health)
    prober: ProbeScheduler | None = None
    killed: bool = False
    noticed_exit: float | None = None
    pushing: bool = False              # a status push is in flight (pushes are serialised)
    pushed: str | None = None          # the last status the catalog acknowledged

    def replica(self) -> Replica:
        o = self.obs
        running = o.state != "exited"
        return Replica(o.instance_id, o.service, o.slot, o.revision, o.node, running,
                       ready=running and self.health.ready, alive=self.health.alive,
                       started_at=o.started_at,
                       finished_at=o.finished_at if o.finished_at is not None else self.noticed_exit,
                       exit_code=o.exit_code, killed=self.killed)


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


def template_revision(spec: config.ServiceSpec) -> str:
    """What a replica is compared by: the spec's revision without ``replicas`` (scaling
    keeps the running replicas, like Kubernetes' pod-template-hash)."""
    return config.service_revision(dataclasses.replace(spec, replicas=0))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    """Runs the desired services on ``nodes`` and keeps the catalog in step.

    ``start()`` observes in full and adopts before the first reconcile; ``close(stop=True)``
    deregisters and stops every workload, ``close(stop=False)`` leaves them running for the
    next supervisor to adopt.

    ``dns``: the resolver address (port 53) of meshlet's DNS; containers started on docker
    nodes get a resolv.conf naming it, so ``<service>.service.<domain>`` resolves in them
    without app changes. Processes keep the host's resolver (no per-process resolv.conf
    without a mount namespace)."""

    def __init__(self, url: str, nodes: list[config.NodeSpec], data_dir: str | os.PathLike[str], *,
                 runtimes: Mapping[str, Runtime] | None = None, resync: float = RESYNC,
                 check_ttl: float = CHECK_TTL, clock: Any = time.time, dns: str | None = None) -> None:
        self.url = url
        self.dns = dns
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
        self.backoff: dict[tuple[str, int], BackoffState] = {}
        self.problems: dict[str, str] = {}           # service -> why a slot cannot run
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
        self._tasks.append(asyncio.create_task(self._watch_desired(), name="watch desired"))
        await asyncio.wait_for(self._kv_loaded.wait(), timeout)
        now = self.clock()
        for observed in (o for group in listed for o in group):
            inst = _Inst(observed, noticed_exit=None if observed.is_running else now)
            self.instances[observed.instance_id] = inst
            self._ports_taken.update(observed.ports.values())
            if observed.is_running:
                passing = checks.get(f"service:{observed.instance_id}") == "passing"
                self._start_probes(inst, adopted_ready=passing)
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
            desired: dict[str, tuple[config.ServiceSpec, str]] = {}
            for key, raw in docs.items():
                name = key[len(SERVICES_PREFIX):]
                try:
                    spec, _vip, revision = config.parse_service_document(raw, source=key)
                except (config.ConfigError, ValueError, TypeError, KeyError) as exc:
                    # Keep the last good spec of that service rather than stopping it.
                    log.error("ignoring unreadable %s: %s", key, exc)
                    if name in self.desired:
                        desired[name] = self.desired[name]
                    continue
                desired[spec.name] = (spec, template_revision(spec))
                self.doc_revision[spec.name] = revision
            changed = {n for n in set(desired) | set(self.desired)
                       if desired.get(n) != self.desired.get(n)}
            self.desired = desired
            self._kv_loaded.set()
            for name in sorted(changed):
                # A new spec (a fixed image, say) is tried at once, not after the hold.
                for key in [k for k in self._start_hold if k[0] == name]:
                    del self._start_hold[key]
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
        return Observed(
            replicas=tuple(i.replica() for i in self.instances.values()),
            registered=dict(self.registered),
            nodes=tuple(NodeInfo(n.name, n.runtime or "process", n.address, n.capacity.cpu,
                                 n.capacity.memory, dict(n.labels)) for n in self.nodes.values()),
            backoff=dict(self.backoff))

    async def _sync(self, service: str) -> None:
        now = self.clock()
        actions = reconcile_service(service, self.desired, self.observed(), now)
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
        revision = self.doc_revision.get(service)
        if revision is None:
            return
        for inst in list(self.instances.values()):
            iid = inst.obs.instance_id
            if inst.obs.service == service and iid in self.registered and \
                    self.registered_rev.get(iid) != revision and inst.obs.is_running:
                await self._register(inst)

    async def _execute(self, action: Action, now: float) -> None:
        if isinstance(action, Start):
            hold = self._start_hold.get((action.service, action.slot))
            if hold is not None and now < hold:
                self._follow_up(action.service, action.slot, hold - now)
                return
            await self._start_instance(action)
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

    def _assign_ports(self, spec: config.ServiceSpec, host: str) -> dict[str, int]:
        ports: dict[str, int] = {}
        lo, hi = PORT_RANGE
        for p in spec.ports:
            if p.port:
                ports[p.name] = p.port
                continue
            start = random.randint(lo, hi)
            for i in range(hi - lo + 1):
                cand = lo + (start - lo + i) % (hi - lo + 1)
                if cand not in self._ports_taken and cand not in ports.values() and \
                        port_is_free(host, cand):
                    ports[p.name] = cand
                    break
            else:
                raise WorkloadError(f"no free port in {lo}-{hi} on {host}")
        return ports

    async def _start_instance(self, a: Start) -> None:
        spec, revision = self.desired[a.service]
        node = self.nodes[a.node]
        rt = self.runtimes[a.node]
        ports = self._assign_ports(spec, node.address)
        iid = f"{a.service}-{a.slot}-{revision[:8]}-{secrets.token_hex(3)}"
        env = dict(spec.env)
        env.setdefault("HOST", node.address)
        ispec = InstanceSpec(
            instance_id=iid, service=a.service, slot=a.slot, revision=revision, node=a.node,
            image=spec.image, command=spec.command, args=spec.args, workdir=spec.workdir,
            env=env, ports=ports, cpu=spec.resources.cpu, memory=spec.resources.memory,
            stop_signal=spec.stop_signal, stop_grace_period=spec.stop_grace_period,
            dns=self.dns if node.runtime == "docker" else None)
        self._ports_taken.update(ports.values())
        await self._save_backoff(a.service, a.slot, a.backoff)
        try:
            observed = await rt.start(ispec)
        except WorkloadError as exc:
            self._ports_taken.difference_update(ports.values())
            problem = f"slot {a.slot}: {exc}"
            # Said once per new reason, not on every retry.
            (log.debug if self.problems.get(a.service) == problem else log.error)(
                "cannot start %s slot %d on %s: %s", a.service, a.slot, a.node, exc)
            self.problems[a.service] = problem
            # An engine that refuses is retried with back-off, like a crash (at least 1 s).
            st = BackoffState(a.backoff.failures + 1, a.backoff.restarts)
            await self._save_backoff(a.service, a.slot, st)
            delay = max(delay_for(spec.restart.backoff, st.failures), 1.0)
            self._start_hold[(a.service, a.slot)] = self.clock() + delay
            self._follow_up(a.service, a.slot, delay)
            return
        self._start_hold.pop((a.service, a.slot), None)
        self.problems.pop(a.service, None)
        log.info("started %s (%s slot %d on %s, ports %s): %s", iid, a.service, a.slot, a.node,
                 ports, a.reason)
        self._note(f"started {iid}: {a.reason}")
        inst = _Inst(observed)
        self.instances[iid] = inst
        if not observed.is_running:   # exited before we looked
            inst.noticed_exit = self.clock()
        else:
            self._start_probes(inst)
        await self._register(inst)

    def _start_probes(self, inst: _Inst, adopted_ready: bool = False) -> None:
        entry = self.desired.get(inst.obs.service)
        if entry is None or entry[1] != inst.obs.revision:
            # Not desired as it is: it will be stopped; no probes, not ready.
            inst.health = Health(ready=False)
            return
        spec = entry[0]
        inst.health = initial_health(spec.probes)
        if adopted_ready:
            inst.health = dataclasses.replace(inst.health, started=True, ready=True)
        rt = self.runtimes[inst.obs.node]
        iid = inst.obs.instance_id

        async def exec_(argv: list[str], timeout: float) -> tuple[int, bytes]:
            return await rt.exec(iid, argv, timeout=timeout)

        def changed(health: Health) -> None:
            before = inst.health
            inst.health = health
            if before.ready != health.ready:
                self._note(f"{iid} {'ready' if health.ready else 'not ready'}")
                self._push_status(inst)
            if not health.alive:
                self.enqueue(inst.obs.service)

        assert self._session is not None
        prober = ProbeScheduler(spec, address=inst.obs.address, ports=inst.obs.ports, exec_=exec_,
                                session=self._session, started_at=inst.obs.started_at or self.clock(),
                                on_change=changed, clock=self.clock)
        prober.health = inst.health
        inst.prober = prober
        prober.start()

    def _status_of(self, inst: _Inst) -> str:
        return "passing" if inst.obs.is_running and inst.health.ready and not inst.killed else "critical"

    async def _register(self, inst: _Inst) -> None:
        o = inst.obs
        entry = self.desired.get(o.service)
        tags = list(entry[0].tags) if entry else []
        node = self.nodes.get(o.node)
        meta = {"revision": self.doc_revision.get(o.service, o.revision), "node": o.node, "slot": str(o.slot), "weight": "1"}
        meta.update({f"port_{name}": str(port) for name, port in o.ports.items()})
        first = next(iter(o.ports.values()), 0)
        status = self._status_of(inst)
        check = {"TTL": f"{self.check_ttl:g}s", "Status": status}
        await self._client.agent.service.register(
            o.service, service_id=o.instance_id, address=node.address if node else o.address,
            port=first, tags=tags, meta=meta, check=check)
        self.registered[o.instance_id] = o.service
        self.registered_rev[o.instance_id] = meta["revision"]
        inst.pushed = status
        # The status may have changed while the registration was in flight.
        self._push_status(inst)

    def _push_status(self, inst: _Inst, *, force: bool = False) -> None:
        """Send the instance's readiness to its TTL check now (not through a sync).

        One push per instance at a time; the pusher re-reads the wanted status after each
        request, so quick flips end at the latest state, never at an older one."""
        iid = inst.obs.instance_id
        if iid not in self.registered or self._client is None:
            return
        if force:
            inst.pushed = None
        if inst.pushing:
            return

        async def push() -> None:
            inst.pushing = True
            try:
                while iid in self.registered and inst.pushed != (status := self._status_of(inst)):
                    try:
                        if status == "passing":
                            await self._client.agent.check.ttl_pass(f"service:{iid}")
                        else:
                            await self._client.agent.check.ttl_fail(f"service:{iid}")
                        inst.pushed = status
                    except Exception as exc:  # noqa: BLE001 - re-asserted every TTL/2 anyway
                        log.warning("cannot update the check of %s: %s", iid, exc)
                        return
            finally:
                inst.pushing = False

        task = asyncio.create_task(push())
        self._pending_status.add(task)
        task.add_done_callback(self._pending_status.discard)

    async def _deregister(self, iid: str) -> None:
        if iid not in self.registered:
            return
        try:
            await self._client.agent.service.deregister(iid)
        except Exception as exc:  # noqa: BLE001 - retried by the next sync
            log.warning("cannot deregister %s: %s", iid, exc)
            return
        self.registered.pop(iid, None)
        self.registered_rev.pop(iid, None)

    async def _kill_instance(self, a: Kill) -> None:
        inst = self.instances.get(a.instance_id)
        if inst is None:
            return
        inst.killed = True
        if inst.prober is not None:
            inst.prober.close()
            inst.prober = None
        self._note(f"killed {a.instance_id}: {a.reason}")
        log.warning("killing %s: %s", a.instance_id, a.reason)
        await self._deregister(a.instance_id)
        entry = self.desired.get(a.service)
        grace = entry[0].stop_grace_period if entry else 10.0
        await self.runtimes[a.node].stop(a.instance_id, grace=grace)

    async def _stop_instance(self, iid: str, reason: str) -> None:
        inst = self.instances.get(iid)
        if inst is None:
            await self._deregister(iid)
            return
        if inst.prober is not None:
            inst.prober.close()
            inst.prober = None
        was_serving = iid in self.registered and inst.health.ready and inst.obs.is_running
        await self._deregister(iid)
        entry = self.desired.get(inst.obs.service)
        if was_serving and entry is not None:
            await asyncio.sleep(entry[0].update.drain_delay)   # let DNS and proxies catch up
        grace = entry[0].stop_grace_period if entry else 10.0
        rt = self.runtimes.get(inst.obs.node)
        if rt is not None:
            try:
                await rt.stop(iid, grace=grace)
                await rt.remove(iid)
            except InstanceNotFound:
                pass   # gone already: nothing left to stop
            except WorkloadError as exc:
                log.error("cannot stop %s: %s", iid, exc)
                return
        self.instances.pop(iid, None)
        self._removed[iid] = None
        if len(self._removed) > 1000:
            del self._removed[next(iter(self._removed))]
        self._ports_taken.difference_update(inst.obs.ports.values())
        if inst.obs.is_running:
            self._note(f"stopped {iid}: {reason}")
            log.info("stopped %s: %s", iid, reason)

    def _note(self, text: str) -> None:
        kind, _, rest = text.partition(" ")
        self.history.append((self.clock(), kind, rest.split(":")[0].split(" ")[0]))
        del self.history[:-1000]
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-100]


def main(argv: list[str] | None = None) -> int:
    """``python -m supervisor.agent --consul URL --data-dir DIR [--admin HOST:PORT]``: the
    supervisor alone against a running catalog (see supervisor.up.run_standalone)."""
    from .up import standalone_main
    return standalone_main(argv)


if __name__ == "__main__":
    sys.exit(main())
