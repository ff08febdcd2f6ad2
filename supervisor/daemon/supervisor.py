"""The Supervisor: observe (runtimes, catalog) -> decide (pure core) -> act, level-triggered.

Flow::

    KV meshlet/services/ --watch--+
    KV meshlet/rollout/ ----------+
    runtime events (exits) -------+--> enqueue(service) --> _sync(service):
    probe state changes ----------+        rollouts.begin: a new desired revision starts a rollout
    timer (resync, follow-ups) ---+        actions = reconcile_service(...)        (core, pure)
                                           execute(actions)
                                           plan = rollouts.step(...)                (core, pure)
                                           execute(plan.actions); store the rollout

Handlers only record what they saw and enqueue the service's name; one sync per service
runs at a time and re-reads everything (a delete is a sync that finds no desired spec).
The one exception is readiness: a probe flip is pushed to the instance's TTL check at once
(a few ms) so DNS and the proxy drop or take the instance without waiting for a sync.
``execute`` is the only place actions are carried out, whoever decided them; stopping a
replica (``Stop``) and killing one (``Kill``) run in the background (``Replicas``), so no
sync waits for a drain or a grace period.

Start-up order (act on a full view): subscribe to runtime events, list every runtime and
the catalog's registrations, read the desired specs, adopt what runs by identity
(service, slot, revision, instance id from labels / state files), and only then run the
first reconcile. A supervisor restarted after ``kill -9`` therefore restarts no healthy
replica and starts no duplicate.

Parts: ``Replicas`` (daemon/replicas.py) carries out what happens to one replica and asks
back only through ``ReplicaHost`` (implemented here); ``Rollouts`` (daemon/rollouts.py)
keeps the rollout bookkeeping and ``Slots`` (daemon/slots.py) the back-off per slot, and
neither knows this class; ``status.py`` reads its state for ``/v1/status``.

Errors: runtime and catalog failures during a sync are logged and the sync is retried on
the next resync tick; nothing here raises into the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

import config
from discovery.consul import CatalogAccess, connect, watch_kv_prefix

from ..core.explain import explain_service
from ..core.backoff import BackoffState, delay_for
from ..core.model import (Action, Deregister, Kill, Observed, Register, SetWeight, Start, Stop, Unplaceable,
                          Wait, summary)
from ..core.joint import joint_hints, waiting_slots
from ..core.nodes import DEFAULT_GRACE, NodeControl, NodeHealth
from ..core.placement import Allocation
from ..core.reconcile import reconcile_service
from ..core.revisions import template_revision
from ..runtime.docker import engine_tls
from ..runtime import RUNTIMES, InstanceNotFound, Runtime, RuntimeEvent, WorkloadError
from ..secrets import KeySource
from .deliveries import Deliveries
from .events import EventLog
from .metrics import SupervisorMetrics
from .nodes import PROBE_EVERY, NodeMonitor
from .rebalance import Rebalancer
from .replicas import Replicas, Tracked
from .rollouts import Rollouts
from .slots import Slots
from .status import status_document
from .volumes import VolumeHomes, list_volumes, remove_volume, users_index

__all__ = ["Supervisor", "make_runtime", "FOLLOWUP_SLOT"]

log = logging.getLogger("supervisor")

# The TTL of every instance check. Status is pushed on every probe change and re-asserted
# every TTL/3; the TTL covers a supervisor's death: a standby takes over within about 11 s
# (21 s against a Consul with a 10 s session_ttl_min) and re-asserts every check it adopts
# at once, so checks pushed up to TTL/3 before the death outlive the leaderless time.
# Without a standby a dead supervisor's checks go critical after at most 45 s.
CHECK_TTL = 45.0
# Level-triggered safety net: re-list the runtimes and sync every service this often.
RESYNC = 5.0
FOLLOWUP_SLOT = -1          # the follow-up key (service, slot) of rollout steps
# how a rollout step's fields (core.rollout_types.StepResult.fields) read in an event
STEP_WORDS = {"startreplica": "start {} new", "retirereplica": "retire {} old", "setweight": "weigh {}"}


def make_runtime(node: config.NodeSpec, data_dir: Path) -> Runtime:
    if node.runtime == "docker":
        engine = node.engine or config.DEFAULT_DOCKER_ENGINE
        # A local engine mounts the workloads' resolv.conf read-only from a file we write
        # (an absolute host path); a remote one writes it itself.
        local = engine.startswith("unix://")
        tls = engine_tls(node.tls.ca_file, node.tls.cert_file, node.tls.key_file) if node.tls else None
        return RUNTIMES["docker"](engine, node=node.name, address=node.address,
                                  data_dir=(data_dir / "nodes" / node.name).resolve() if local else None, tls=tls)
    return RUNTIMES["process"](data_dir / "nodes" / node.name, node=node.name, address=node.address)


class Supervisor:
    """Runs the desired services on ``nodes`` and keeps the catalog in step.

    ``start()`` observes in full and adopts before the first reconcile; ``close(stop=True)``
    deregisters and stops every workload, ``close(stop=False)`` leaves them running for the
    next supervisor to adopt.

    ``dns``: the resolver address (port 53) of meshlet's DNS; containers started on docker
    nodes get a resolv.conf naming it, so ``<service>.service.<domain>`` resolves in them
    without app changes. Processes keep the host's resolver (no per-process resolv.conf
    without a mount namespace).

    ``proxy_admins``: admin addresses ("host:port") of proxies whose ``/routes`` says which
    retired replicas still carry requests; a replica being retired waits for those before
    SIGTERM.

    ``secrets_key``: where the key-encryption key of the mesh's secrets is (None: none;
    a replica with secrets is then refused, saying so)."""

    def __init__(self, url: str | CatalogAccess, nodes: list[config.NodeSpec], data_dir: str | os.PathLike[str], *,
                 runtimes: Mapping[str, Runtime] | None = None, resync: float = RESYNC,
                 check_ttl: float = CHECK_TTL, clock: Any = time.time, dns: str | None = None,
                 proxy_admins: Sequence[str] = (), secrets_key: KeySource | None = None,
                 node_grace: float = DEFAULT_GRACE, node_probe: float = PROBE_EVERY,
                 fence: Callable[[], bool] | None = None) -> None:
        self.url = url
        # the leader lock's freshness (daemon/leader.py); None: this supervisor is alone
        self.fence = fence
        self.fenced = asyncio.Event()
        self.node_grace, self.node_probe = node_grace, node_probe
        self.dns = dns
        self.secrets_key = secrets_key
        self.proxy_admins = tuple(proxy_admins)
        self.nodes = {n.name: n for n in nodes}
        self.data_dir = Path(data_dir)
        self.runtimes: dict[str, Runtime] = dict(runtimes or {})
        self.resync = resync
        self.check_ttl = check_ttl
        self.clock = clock
        self.desired: dict[str, tuple[config.ServiceSpec, str]] = {}
        self.doc_revision: dict[str, str] = {}       # service -> revision of the KV document
        self.doc_raw: dict[str, bytes] = {}          # the documents as last read
        self.problems: dict[str, str] = {}           # service -> why a slot cannot run
        self.unplaced: set[str] = set()              # services with a replica no node can hold now
        self._hints: dict[tuple[str, int], str] = {}  # (service, slot) -> node: the joint placement
        # (service, slot, node) -> the room of a start decided and under way: concurrent
        # syncs of other services place around it (else two could take one node's last room)
        self._starting: dict[tuple[str, int, str], Allocation] = {}
        self.vip_problems: dict[str, str] = {}       # service -> its VIP that a proxy could not listen on
        # back-off, start holds (a start the runtime refused is tried again after a back-off,
        # like a crash, not on every sync) and the runtime's last refusal, per slot
        self.slots = Slots(None)
        self.events: list[str] = []                  # recent events, for status
        # structured events (GET /v1/events, `meshlet events`), stored in the catalog in
        # batches from start(); counted in the metrics as they come
        self.metrics = SupervisorMetrics()
        self.event_log = EventLog(None, clock=clock, on_event=self.metrics.event)
        self._waits_noted: dict[tuple[str, int], float] = {}
        self.history: list[tuple[float, str, str]] = []   # (time, "started"/"killed"/..., instance)
        self._dirty: set[str] = set()
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._followups: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._client: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._kv_loaded = asyncio.Event()
        self._closed = False
        self._adopted = False   # no sync before the full view is observed and adopted
        self.rollouts: Rollouts
        self.replicas: Replicas
        self.monitor: NodeMonitor
        self.rebalancer: Rebalancer

    @property
    def instances(self) -> dict[str, Tracked]:
        return self.replicas.instances

    @property
    def registered(self) -> dict[str, str]:
        return self.replicas.registered

    @property
    def backoff(self) -> dict[tuple[str, int], BackoffState]:
        return self.slots.backoff

    @property
    def start_holds(self) -> dict[tuple[str, int], float]:
        return self.slots.holds

    def busy(self) -> bool:
        """Is any sync running or queued?"""
        return bool(self._syncing)

    # --- ReplicaHost --------------------------------------------------------------------

    def spec_for(self, service: str, revision: str) -> config.ServiceSpec | None:
        return self.rollouts.spec_for(service, revision, self.desired)

    def meta_revision(self, service: str, revision: str) -> str:
        """Meta revision: the applied document's for replicas of its target revision (DNS
        serves the document's tags for those), else the replica's own revision."""
        if revision == self.rollouts.doc_target(service, self.desired):
            return self.doc_revision.get(service, revision)
        return revision

    def changed(self, service: str) -> None:
        """A replica of ``service`` is gone: its room is free, so the services with a
        replica no node could hold are placed again now, not at the next resync."""
        self.enqueue(service)
        for waiting in list(self.unplaced):
            self.enqueue(waiting)

    def note(self, text: str, *, kind: str | None = None, service: str | None = None,
             instance: str | None = None, node: str | None = None) -> None:
        """An event: ``text`` is what ``meshlet events`` prints; ``kind`` (core/events.py
        KINDS; default: the text's first word) and what it is about, for filtering."""
        first, _, rest = text.partition(" ")
        self.history.append((self.clock(), first, rest.split(":")[0].split(" ")[0]))
        del self.history[:-1000]
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-100]
        self.event_log.add(kind or first, text, service=service, instance=instance, node=node)

    @property
    def catalog(self) -> Any:
        """The catalog client (py-consul aio) the supervisor uses; None before start()."""
        return self._client

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        self._client = connect(self.url, timeout=40.0)
        self._session = aiohttp.ClientSession()
        self.slots.kv = self._client
        self.event_log.kv = self._client
        self.event_log.may_write = self.may_act
        await self.event_log.load()
        self.event_log.start()
        for node in self.nodes.values():
            if node.name not in self.runtimes:
                self.runtimes[node.name] = make_runtime(node, self.data_dir)
        self.rollouts = Rollouts(self._client)
        self.volumes = VolumeHomes(self._client, self.clock)
        self.replicas = Replicas(self, runtimes=self.runtimes, nodes=self.nodes, catalog=self._client,
                                 session=self._session, clock=self.clock, check_ttl=self.check_ttl,
                                 dns=self.dns, proxy_admins=self.proxy_admins,
                                 deliveries=Deliveries(self._client, self.secrets_key), volumes=self.volumes,
                                 metrics=self.metrics)
        self.monitor = NodeMonitor(self.nodes, self.runtimes, self._client, grace=self.node_grace,
                                   on_change=self._node_changed, on_control=self._node_control,
                                   on_sides=self._sides_changed, clock=self.clock, every=self.node_probe)
        # Subscribe before the first list() so no exit falls between them.
        for rt in self.runtimes.values():
            self._tasks.append(asyncio.create_task(self._consume(rt), name=f"events {rt.node}"))
        await self.monitor.load()
        await self.monitor.check_all()
        self.rebalancer = Rebalancer(self._client)
        await self.rebalancer.load()
        listed = await asyncio.gather(*(self._list_or_nothing(rt) for rt in self.runtimes.values()))
        services = await self._client.agent.services()
        checks = await self._client.agent.checks()
        await self.slots.load()
        await self.volumes.load()
        _, entries = await self._client.kv.get(config.ROLLOUT_PREFIX, recurse=True)
        self.rollouts.load({e["Key"]: e.get("Value") or b"" for e in entries or ()}, self.clock())
        self._tasks.append(asyncio.create_task(self._watch_desired(), name="watch desired"))
        self._tasks.append(asyncio.create_task(self._watch_rollouts(), name="watch rollouts"))
        await asyncio.wait_for(self._kv_loaded.wait(), timeout)
        status = {cid: c.get("Status", "") for cid, c in (checks or {}).items()}
        for observed in (o for group in listed for o in group):
            t = self.replicas.adopt(observed, passing=observed.is_running
                                    and status.get(f"service:{observed.instance_id}") == "passing")
            if not observed.is_running:
                # exited while no supervisor watched (or before it last stored): a crash of
                # a rollout's target counts once (the stored counts name those counted)
                self.rollouts.note_exit(self.replicas.fact(t))
        self.replicas.registered.update(self.replicas.adopt_registrations(services))
        log.info("adopted %d instances (%d running), %d registrations; %d services desired",
                 len(self.instances), sum(t.obs.is_running for t in self.instances.values()),
                 len(self.registered), len(self.desired))
        self._tasks.append(asyncio.create_task(self._tick(), name="resync"))
        self.monitor.start()
        self._adopted = True
        # the checks of what was adopted were last pushed by the supervisor before us, up
        # to TTL/3 before it stopped: push them now, not at our first tick
        self.replicas.push_all()
        for name in self.service_names():
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
        if hasattr(self, "monitor"):
            await self.monitor.close()
        if not hasattr(self, "replicas"):
            await self.event_log.close()
            await self._close_clients()
            return
        if stop:
            await self.replicas.retire_all("meshlet is stopping")
            await self._stop_leftovers()
        await self.replicas.close()
        for rt in self.runtimes.values():
            try:
                await rt.close()
            except Exception:  # noqa: BLE001 - closing continues with the rest
                log.warning("closing runtime %s failed", rt, exc_info=True)
        await self.event_log.close()
        await self._close_clients()

    async def _stop_leftovers(self) -> None:
        # A start cancelled above may have left an instance we never recorded: list every
        # node once more and stop whatever meshlet still owns there.
        for rt in self.runtimes.values():
            try:
                leftovers = await rt.list()
            except WorkloadError as exc:
                log.warning("cannot list node %s while stopping: %s", rt.node, exc)
                continue
            for o in leftovers:
                await self.replicas.deregister(o.instance_id)
                try:
                    await rt.stop(o.instance_id, grace=0 if not o.is_running else 5.0)
                    await rt.remove(o.instance_id)
                except InstanceNotFound:
                    pass
                except WorkloadError as exc:
                    log.warning("cannot stop %s: %s", o.instance_id, exc)
        # Likewise a registration whose request was cut off: nothing of ours runs now.
        try:
            services = await self._client.agent.services()
            for iid in self.replicas.adopt_registrations(services):
                self.replicas.registered[iid] = services[iid].get("Service", "")
                await self.replicas.deregister(iid)
        except Exception as exc:  # noqa: BLE001 - the catalog may be gone already
            log.warning("cannot clear registrations while stopping: %s", exc)

    async def _close_clients(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()

    # --- observation ---------------------------------------------------------------------

    async def _watch_desired(self) -> None:
        async for docs in watch_kv_prefix(self._client, config.SERVICES_PREFIX):
            changed = self._apply_docs(docs)
            if changed and self._kv_loaded.is_set():
                # `meshlet rollback` writes the document and the restart key in one
                # transaction: read the other half now, so no sync sees one without the
                # other (which would start a rollout to a revision nobody asked for).
                changed |= await self._reread(config.ROLLOUT_PREFIX,
                                              lambda e: self.rollouts.on_control(e, self.clock()))
            self._kv_loaded.set()
            for name in sorted(changed):
                self.slots.clear_holds(name)   # a new spec (a fixed image, say) is tried at once
                self.enqueue(name)

    def _apply_docs(self, docs: Mapping[str, bytes]) -> set[str]:
        desired: dict[str, tuple[config.ServiceSpec, str]] = {}
        for key, raw in docs.items():
            name = config.key_name(key, config.SERVICES_PREFIX)
            if name is None:
                continue
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
        async for docs in watch_kv_prefix(self._client, config.ROLLOUT_PREFIX):
            changed = self.rollouts.on_control(docs, self.clock())
            if changed:
                changed |= await self._reread(config.SERVICES_PREFIX, self._apply_docs)
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
        if event.observed is None:
            return
        t = self.replicas.exited(event.observed)
        if t is None:
            return
        self.rollouts.note_exit(self.replicas.fact(t))
        self.enqueue(t.obs.service)

    async def _relist(self) -> None:
        for rt in list(self.runtimes.values()):
            try:
                listed = await rt.list()
            except WorkloadError as exc:
                log.warning("cannot list node %s: %s", rt.node, exc)
                continue
            for o in listed:
                if self.replicas.was_removed(o.instance_id):
                    continue   # listed before we removed it
                t = self.instances.get(o.instance_id)
                if t is None:
                    # Not started by us in this life and not seen at start: adopt it; the
                    # sync decides whether it is wanted.
                    self.replicas.adopt(o)
                    self.enqueue(o.service)
                elif t.obs.is_running and not o.is_running:
                    self._on_event(RuntimeEvent("exit", o.instance_id, o, self.clock()))

    async def _tick(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(self.resync)
            if not self.may_act():
                continue
            try:
                await self._relist()
                # The catalog is the truth for registrations: one restarted without its
                # state (or edited by hand) gets our instances registered again.
                regs = self.replicas.adopt_registrations(await self._client.agent.services())
                if regs != self.registered:
                    log.info("catalog registrations changed behind our back: %d -> %d",
                             len(self.registered), len(regs))
                    self.registered.clear()
                    self.registered.update(regs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                log.warning("resync: %s", exc)
            await self._poll_proxies()
            for name in self.service_names():
                self.enqueue(name)
            if time.monotonic() - last_status >= self.check_ttl / 3 - self.resync:
                last_status = time.monotonic()
                self.replicas.push_all()

    async def _list_or_nothing(self, rt: Runtime) -> list[Any]:
        """A node's instances at start; an engine that does not answer lists nothing now
        (its node is unreachable; what it runs is adopted when it answers again)."""
        try:
            return await rt.list()
        except WorkloadError as exc:
            log.warning("cannot list node %s at start: %s", rt.node, exc)
            return []

    # --- nodes ------------------------------------------------------------------------------

    def _node_changed(self, name: str, before: NodeHealth, after: NodeHealth) -> None:
        if after.lost:
            marked = self.replicas.mark_stale(name)
            self.note(f"node {name} lost: not answering for {self.node_grace:g}s; its {marked} "
                      "replica(s) are placed elsewhere", kind="node", node=name)
        elif not after.reachable:
            self.note(f"node {name} unreachable: {after.error}; it takes no new replica", kind="node", node=name)
        else:
            self.note(f"node {name} is back" + (": what still runs there of a replaced slot is stopped"
                                                 if before.lost else ""), kind="node", node=name)
            # what it runs now (an engine restarted meanwhile may have stopped it all)
            self._tasks.append(asyncio.create_task(self._relist()))
        for service in self.service_names():
            self.enqueue(service)

    def _node_control(self, name: str) -> None:
        c = self.monitor.control[name]
        self.note(f"node {name} " + ("draining" if c.draining else "cordoned" if c.cordoned else "uncordoned"),
                  kind="node", node=name)
        for service in self.service_names():
            self.enqueue(service)

    def _sides_changed(self) -> None:
        self.replicas.proxy_admins = self.all_proxy_admins()

    def all_proxy_admins(self) -> tuple[str, ...]:
        """The proxies a retired replica waits on: this host's and every node side's."""
        return tuple(dict.fromkeys((*self.proxy_admins, *self.monitor.proxy_admins())))

    async def set_node(self, name: str, *, cordon: bool | None = None, drain: bool | None = None) -> dict[str, Any]:
        """Cordon, drain or uncordon ``name`` (stored in the catalog); its new state.
        KeyError for an unknown node."""
        if name not in self.nodes:
            raise KeyError(name)
        c = self.monitor.control[name]
        if drain is not None:
            c = NodeControl(cordoned=drain or (c.cordoned if cordon is None else cordon), draining=drain)
        elif cordon is not None:
            c = NodeControl(cordoned=cordon, draining=c.draining and cordon)
        await self.monitor.set_control(name, c)
        return self.monitor.state(name)

    async def rebalance(self, *, dry_run: bool) -> dict[str, Any]:
        """``meshlet rebalance``: the moves placement would make now; started unless
        ``dry_run`` (each replacement ready before its predecessor stops)."""
        moves = self.rebalancer.plan(self.rollouts.effective(self.desired), self.observed())
        if not dry_run and moves and self.may_act():
            await self.rebalancer.start(moves)
            self.note(f"rebalance: {len(moves)} move(s): " + "; ".join(m.describe() for m in moves))
            for service in {m.service for m in moves}:
                self.enqueue(service)
        return {"planned": [m.describe() for m in moves], **self.rebalancer.to_json()}

    async def _poll_proxies(self) -> None:
        """Which VIPs the proxies this supervisor knows of could not listen on (a port
        below 1024 without root, an address taken): a problem of the service, in status."""
        problems: dict[str, str] = {}
        for admin in self.all_proxy_admins():
            try:
                assert self._session is not None
                async with self._session.get(f"http://{admin}/routes", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    doc = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AssertionError):
                continue
            for f in (doc.get("vip_failures") or []) if isinstance(doc, dict) else []:
                if isinstance(f, dict) and f.get("service"):
                    why = f.get("error") or "cannot listen"
                    if "ermission" in why:
                        why += " (ports below 1024 need root: use a vip_port >= 1024, or run as root)"
                    problems[f["service"]] = f"VIP {f.get('listen')} refuses connections: the proxy cannot listen there: {why}"
        self.vip_problems = problems

    def service_names(self) -> set[str]:
        return (set(self.desired) | {t.obs.service for t in self.instances.values()}
                | set(self.registered.values()))

    # --- the loop -------------------------------------------------------------------------

    def enqueue(self, service: str) -> None:
        if self._closed or not self._adopted:
            return
        self._dirty.add(service)
        if service not in self._syncing:
            self._syncing[service] = asyncio.create_task(self._sync_loop(service), name=f"sync {service}")

    async def _sync_loop(self, service: str) -> None:
        try:
            while service in self._dirty and not self._closed:
                self._dirty.discard(service)
                began = time.perf_counter()
                try:
                    await self._sync(service)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - retried on the next tick
                    log.exception("sync of %s failed; retrying on the next resync", service)
                self.metrics.sync_done(time.perf_counter() - began)
        finally:
            self._syncing.pop(service, None)

    def observed(self) -> Observed:
        return Observed(
            replicas=self.replicas.facts(),
            registered={k: v for k, v in self.registered.items() if k not in self.replicas.terminating},
            nodes=self.monitor.infos(),
            backoff=dict(self.backoff), rolling=self.rollouts.engine_owns(self.desired),
            holds=dict(self.slots.holds), last_output=self.replicas.last_output(),
            starting=tuple(self._starting.values()), volume_homes=self.volumes.nodes(),
            moves=self.rebalancer.targets(), hints=self._hints)

    def _joint_hints(self) -> None:
        """Where one placement of every replica waiting now (of every service) puts each
        (``core.joint``): kept while every waiting slot has its hint, made again when a
        slot appears that has none (an apply, a scale-up)."""
        effective = self.rollouts.effective(self.desired)
        observed = self.observed()
        waiting = waiting_slots(effective, observed)
        if waiting and not set(waiting) <= set(self._hints):
            self._hints = joint_hints(effective, observed)
        elif not waiting:
            self._hints = {}

    async def _sync(self, service: str) -> None:
        if not self.may_act():
            return
        now = self.clock()
        begun = self.rollouts.begin(service, self.desired, self.replicas.facts(service), now)
        if begun is not None:
            if begun.started:
                self.note(f"rollout {service}: to {begun.state.revision if begun.state else '?'}",
                          kind="rollout", service=service)
            await self._store_rollout(service)
        self._joint_hints()
        actions = reconcile_service(service, self.rollouts.effective(self.desired), self.observed(), now)
        if any(isinstance(a, Unplaceable) for a in actions):
            self.unplaced.add(service)
        else:
            self.unplaced.discard(service)
        await self.execute(service, actions, now)
        if self.rebalancer.moves and self.may_act():
            for line in await self.rebalancer.settle(service, self.desired, self.observed(), actions):
                self.note(line)
        await self.replicas.refresh_meta(service)
        if service not in self.desired and not self.replicas.of(service):
            await self.slots.forget(service)
        await self._step_rollout(service, self.clock())

    async def _step_rollout(self, service: str, now: float) -> None:
        before = self.rollouts.states.get(service)
        plan = self.rollouts.step(service, self.desired, self.observed(), self.slots.errors_of(service), now)
        if plan is None:
            if before is not None:
                await self._store_rollout(service)   # crash counts taken while paused or failed
            return
        if plan.reverted:
            self.slots.clear_holds(service)               # held for the failed revision's starts
            self.problems.pop(service, None)
        acted = plan.reverted or any(isinstance(a, SetWeight) for a in plan.actions)
        acted |= await self.execute(service, plan.actions, now, rollout=True)
        steps = [STEP_WORDS.get(k, f"{k} {{}}").format(v) for k, v in sorted(plan.fields.items())
                 if k not in ("phase", "markcomplete", "markfailed", "revert")]     # those get their own
        if steps:
            self.note(f"rollout {service} to {plan.state.revision[:12]}: " + ", ".join(steps), kind="rollout",
                      service=service)
        if plan.reverted:
            self.note(f"rollout {service}: reverting to {plan.state.revision[:12]}: {plan.state.reason}",
                      kind="revert", service=service)
        elif before is not None and plan.state.phase != before.phase:
            self.note(f"rollout {service}: {plan.state.phase}: {plan.state.reason}", kind="rollout", service=service)
        await self._store_rollout(service)
        if plan.followup_at is not None:
            self._follow_up(service, FOLLOWUP_SLOT, plan.followup_at - now)
        if acted:
            self.enqueue(service)    # level-triggered: look again with the new view

    async def _store_rollout(self, service: str) -> None:
        if self.may_act():
            await self.rollouts.store(service, live=self.instances.keys())

    def may_act(self) -> bool:
        """False once the leader lock is stale (``fence``): ``fenced`` is set and every
        action, write and sync stops until this supervisor is closed."""
        if self.fence is None or self.fenced.is_set():
            return not self.fenced.is_set()
        if self.fence():
            return True
        log.warning("the leader lock is no longer fresh: this supervisor stops acting")
        self.fenced.set()
        return False

    # --- carrying out ---------------------------------------------------------------------------

    async def execute(self, service: str, actions: Sequence[Action], now: float, *,
                      rollout: bool = False) -> bool:
        """Carry out ``actions`` (the pure core's, for ``service``); True when something
        was started or a retirement began. ``rollout``: they come from a rollout step
        (a refused start then counts against the new revision). Nothing is done once the
        leader lock is no longer fresh (``fence``): another supervisor may lead by now."""
        if not self.may_act():
            return False
        # reserve the room of every start now, before the first await lets another
        # service's sync decide on the same view
        reserved = []
        for a in actions:
            spec = self.spec_for(a.service, a.revision) if isinstance(a, Start) else None
            if isinstance(a, Start) and spec is not None:
                key = (a.service, a.slot, a.node)
                req = spec.resources.requests
                self._starting[key] = Allocation(a.node, a.service, req.cpu or 0.0, req.memory or 0)
                reserved.append(key)
        try:
            return await self._execute(service, actions, now, rollout=rollout)
        finally:
            for key in reserved:
                self._starting.pop(key, None)

    async def _execute(self, service: str, actions: Sequence[Action], now: float, *, rollout: bool) -> bool:
        acting = [a for a in actions if not isinstance(a, Wait)]
        if acting:
            log.info("sync %s: %s", service, summary(acting))
        acted = False
        for a in actions:
            if isinstance(a, Stop):
                acted |= self.replicas.retire(a.instance_id, a.reason)
            elif isinstance(a, Kill):
                self.replicas.kill(a.instance_id, a.reason)
        for a in actions:
            if isinstance(a, Start):
                started = await self._start(a)
                if rollout:
                    self.rollouts.note_start(service, a.slot, started)
                acted |= started
            elif isinstance(a, Register):
                await self.replicas.register_id(a.instance_id)
            elif isinstance(a, Deregister):
                await self.replicas.deregister(a.instance_id)
            elif isinstance(a, SetWeight):
                await self.replicas.set_weight(a.instance_id, a.weight)
            elif isinstance(a, Wait):
                self._follow_up(a.service, a.slot, a.at - now)
                if self._waits_noted.get((a.service, a.slot)) != a.at and a.at > now:
                    self._waits_noted[(a.service, a.slot)] = a.at       # said once per back-off
                    self.note(f"{a.service} slot {a.slot}: {a.reason} (in {a.at - now:.0f}s)", kind="backoff",
                              service=a.service)
            elif isinstance(a, Unplaceable):
                if self.problems.get(a.service) != f"slot {a.slot}: {a.reason}":
                    log.warning("%s slot %d: %s", a.service, a.slot, a.reason)
                    self.note(f"{a.service} slot {a.slot} pending: {a.reason}", kind="pending", service=a.service)
                self.problems[a.service] = f"slot {a.slot}: {a.reason}"
        return acted

    async def _start(self, a: Start) -> bool:
        """Start one replica; a refusal is the service's problem and holds the slot back
        like a crash (at least 1 s, doubling)."""
        spec = self.spec_for(a.service, a.revision)
        if spec is None:
            return False
        restart = a.backoff.restarts > self.backoff.get((a.service, a.slot), BackoffState()).restarts
        await self.slots.save(a.service, a.slot, a.backoff)
        try:
            t = await self.replicas.start(spec, a.slot, a.revision, a.node, a.reason, weight=a.weight,
                                          restart=restart)
        except WorkloadError as exc:
            self._release(a)
            problem = f"slot {a.slot}: {exc}"
            # Said once per new reason, not on every retry.
            if self.problems.get(a.service) != problem:
                self.note(f"cannot start {a.service} slot {a.slot} on {a.node}: {exc}", kind="start-failed",
                          service=a.service, node=a.node)
            (log.debug if self.problems.get(a.service) == problem else log.error)(
                "cannot start %s slot %d on %s: %s", a.service, a.slot, a.node, exc)
            self.problems[a.service] = problem
            self.slots.start_errors[(a.service, a.slot)] = str(exc)
            # The hold is set before the back-off is stored (an await), so nothing sees the
            # new failure count with the old hold.
            st = BackoffState(a.backoff.failures + 1, a.backoff.restarts)
            delay = max(delay_for(spec.restart.backoff, st.failures), 1.0)
            self.slots.holds[(a.service, a.slot)] = self.clock() + delay
            self._follow_up(a.service, a.slot, delay)
            await self.slots.save(a.service, a.slot, st)
            return False
        self._release(a)                     # a replica now: counted as one
        self.slots.holds.pop((a.service, a.slot), None)
        self.problems.pop(a.service, None)
        self.slots.start_errors.pop((a.service, a.slot), None)
        if not t.obs.is_running:   # exited before we looked
            self.rollouts.note_exit(self.replicas.fact(t))
        return True

    def _release(self, a: Start) -> None:
        """The room reserved for start ``a`` is a replica's now, or free again (the start
        failed). Either way the services waiting for room look again: while
        the new replica registered, it and its reservation both counted, which may have
        left another service pending for room that is there."""
        if self._starting.pop((a.service, a.slot, a.node), None) is not None:
            for waiting in list(self.unplaced):
                if waiting != a.service:
                    self.enqueue(waiting)

    def _follow_up(self, service: str, slot: int, delay: float) -> None:
        key = (service, slot)
        old = self._followups.pop(key, None)
        if old is not None:
            old.cancel()
        self._followups[key] = asyncio.get_running_loop().call_later(max(delay, 0.0), self.enqueue, service)

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The admin API's ``/v1/status`` and ``meshlet up``'s progress lines (status.py)."""
        return status_document(self, self.clock())

    def explain(self, service: str) -> dict[str, Any] | None:
        """``meshlet explain``: per slot, every node with its filter reason or score
        (core.explain); None when the service is not desired."""
        return explain_service(service, self.desired, self.observed())

    def _volume_users(self) -> dict[str, list[str]]:
        return users_index((t.obs.instance_id, self.spec_for(t.obs.service, t.obs.revision), t.obs.slot)
                           for t in self.instances.values())

    async def list_volumes(self) -> list[dict[str, Any]]:
        """``meshlet volume ls``: every volume meshlet keeps, where, its size and users."""
        users = self._volume_users()
        return await list_volumes(self.runtimes, self.volumes, lambda name: users.get(name, []))

    async def remove_volume(self, name: str) -> dict[str, Any]:
        """``meshlet volume rm``: the only way a volume is deleted; VolumeInUse while a
        replica (running or exited) mounts it."""
        users = self._volume_users()
        return await remove_volume(name, self.runtimes, self.volumes, lambda n: users.get(n, []))

    def previous_logs(self, service: str, instance: str | None = None) -> list[Any]:
        kept = [e for (svc, _), exits in sorted(self.replicas.exits.items()) if svc == service for e in exits]
        if instance is not None:
            return [e for e in kept if e.instance_id == instance]
        newest: dict[int, Any] = {}
        for e in kept:
            newest[e.slot] = e
        return [newest[slot] for slot in sorted(newest)]

    def log_sources(self, service: str, instance: str | None = None) -> list[tuple[str, Runtime]]:
        """(instance id, its runtime) of the service's instances (or just ``instance``), by
        slot: what ``GET /v1/logs/<service>`` streams."""
        found = sorted((t.obs for t in self.replicas.of(service)
                        if instance is None or t.obs.instance_id == instance), key=lambda o: (o.slot, o.instance_id))
        return [(o.instance_id, self.runtimes[o.node]) for o in found if o.node in self.runtimes]
