"""Every replica the supervisor runs, and everything done to one: start, probe, register,
keep its TTL check in step with readiness, re-weigh, kill, retire.

``Replicas`` owns what is known of each replica (``Tracked``: the runtime's report, probe
health, what the catalog acknowledged) and the catalog registrations. It decides nothing:
the supervisor's sync (``daemon/supervisor.py``) calls it to carry out the pure core's
actions. What it may ask of the supervisor is ``ReplicaHost``: a replica's spec, the
revision to register in Meta, and two notifications (a service changed; an event).

One way to stop a replica (``retire``), used by every action that stops one (scale-down,
a rollout's old replica, an orphan, an exited one cleaned up, ``meshlet down``), always in
the background so no service's sync waits for it::

    mark terminating -> deregister (out of the catalog FIRST) -> if it was serving: wait
    max(MIN_DRAIN, update.drain_delay) for proxies and DNS to drop it, then until no proxy
    the supervisor knows of lists it in GET /routes "draining" (at most IN_FLIGHT_LIMIT)
    -> stop (stop signal, grace period, SIGKILL) -> remove -> forget

The proxy admin JSON read here is a contract (config/README.md, "The proxy's /routes"):
``{"draining": [{"instance": <instance id>, "active": <requests in flight>}, ...]}``.
``kill`` (a failed liveness/startup probe) deregisters and stops but keeps the exited
replica, whose exit then goes through the restart policy.

A started replica is registered at once with its TTL check critical (proxies and DNS treat
it as absent) and turns passing when its readiness does; readiness flips are pushed to
the check at once, not through a sync.

Errors: a runtime refusal at start raises ``WorkloadError`` to the caller (the supervisor
backs the slot off); catalog failures are logged and retried by the next sync or TTL/3
push; a runtime that refuses to stop a replica is asked again with back-off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import random
import secrets
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

import config

from ..core.events import redact
from ..core.model import Replica
from ..runtime import InstanceNotFound, InstanceSpec, Runtime, WorkloadError
from ..runtime import Observed as RuntimeObserved
from .deliveries import Deliveries
from .probes import Health, ProbeScheduler, initial_health
from .volumes import VolumeHomes, attachments

__all__ = ["Replicas", "ReplicaHost", "Tracked", "LastExit", "PORT_RANGE", "MIN_DRAIN", "IN_FLIGHT_LIMIT",
           "port_is_free", "draining_requests", "KEPT_EXITS", "LAST_LINES", "exit_reason"]

log = logging.getLogger("supervisor.replicas")

PORT_RANGE = (20000, 29999)
# The least wait between deregistering a serving replica and SIGTERM: proxies and DNS see
# the change through blocking queries within milliseconds; 0.5 s covers a busy machine.
MIN_DRAIN = 0.5
# The longest a retired replica waits for requests in flight on it (as the proxies report
# them) before SIGTERM; its grace period follows.
IN_FLIGHT_LIMIT = 30.0
# What is kept of a replica that exited: its last output lines (at most LAST_BYTES), for
# the last KEPT_EXITS exits of each slot (in memory: an app's output is not the catalog's).
LAST_LINES = 20
LAST_BYTES = 8192
KEPT_EXITS = 3


@dataclass(frozen=True)
class LastExit:
    """A replica that exited: its exit code and the last lines it wrote."""
    instance_id: str
    service: str
    slot: int
    revision: str
    code: int | None
    at: float
    lines: tuple[str, ...]

    @property
    def last_line(self) -> str | None:
        return next((line for line in reversed(self.lines) if line.strip()), None)

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance_id, "slot": self.slot, "revision": self.revision, "code": self.code,
                "at": self.at, "lines": list(self.lines)}


class ReplicaHost(Protocol):
    """What ``Replicas`` may ask of the supervisor that owns it."""

    def spec_for(self, service: str, revision: str) -> config.ServiceSpec | None:
        """The spec replicas of ``revision`` run (None: the service is not desired)."""

    def meta_revision(self, service: str, revision: str) -> str:
        """The revision to register in Meta for a replica of ``revision``."""

    def changed(self, service: str) -> None:
        """Something about ``service``'s replicas changed: look at it again."""

    def note(self, text: str, *, kind: str | None = None, service: str | None = None,
             instance: str | None = None, node: str | None = None) -> None:
        """An event for ``meshlet events`` and ``status`` ("started web-0-...: new replica"),
        of ``kind`` (core/events.py) about ``service``/``instance``/``node``."""


@dataclass(eq=False)
class Tracked:
    """One replica the supervisor knows of: what its runtime reports plus probe state."""

    obs: RuntimeObserved
    health: Health = field(default_factory=Health)
    prober: ProbeScheduler | None = None
    killed: bool = False
    stale: bool = False                 # it ran on its node while the node was lost
    ready_since: float | None = None    # when readiness last turned passing
    noticed_exit: float | None = None
    pushing: bool = False              # a status push is in flight (pushes are serialised)
    pushed: str | None = None          # the last status the catalog acknowledged

    def close_probes(self) -> None:
        if self.prober is not None:
            self.prober.close()
            self.prober = None


def exit_reason(code: int | None, *, killed: bool, stopping: bool) -> str:
    """Why a replica exited, for events and metrics: stopped (by the supervisor, retiring
    it), killed (a failed liveness/startup probe), completed (code 0) or crashed."""
    if stopping:
        return "stopped"
    if killed:
        return "killed"
    return "completed" if code == 0 else "crashed"


def port_is_free(host: str, port: int) -> bool:
    """False when ``port`` is taken on ``host``, an address of this machine. An address
    that is not this machine's (a node on another host) cannot be tried by binding: its
    ports are the supervisor's own bookkeeping (``Replicas._assign_ports``), as Nomad's
    scheduler keeps them, and a port something else holds there fails the replica, whose
    restart draws another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRNOTAVAIL
    return True


def draining_requests(doc: Any, instance_id: str) -> int | None:
    """Requests a proxy's ``GET /routes`` document says are still in flight on
    ``instance_id`` after it left the table; None when the proxy lists it nowhere."""
    draining = doc.get("draining") if isinstance(doc, dict) else None
    found = [d.get("active") for d in draining or () if isinstance(d, dict)
             and instance_id in (d.get("instance"), d.get("id"))]
    if not found:
        return None
    return sum(a for a in found if isinstance(a, int))


class Replicas:
    """The replicas on every node and their catalog registrations (see the module)."""

    def __init__(self, host: ReplicaHost, *, runtimes: Mapping[str, Runtime],
                 nodes: Mapping[str, config.NodeSpec], catalog: Any, session: aiohttp.ClientSession,
                 clock: Any, check_ttl: float, dns: str | None = None,
                 proxy_admins: Sequence[str] = (), deliveries: Deliveries | None = None,
                 volumes: VolumeHomes | None = None, metrics: Any = None) -> None:
        self.host = host
        self.metrics = metrics          # SupervisorMetrics: exits by reason, probe results
        self.deliveries = deliveries
        self.volumes = volumes
        self.runtimes = runtimes
        self.nodes = nodes
        self.catalog = catalog                      # py-consul's aio client
        self.session = session
        self.clock = clock
        self.check_ttl = check_ttl
        self.dns = dns
        self.proxy_admins = tuple(proxy_admins)
        self.instances: dict[str, Tracked] = {}
        self.registered: dict[str, str] = {}        # instance id -> service
        self.registered_rev: dict[str, str] = {}    # instance id -> Meta revision registered
        self.weights: dict[str, int] = {}           # instance id -> Meta weight (1 when absent)
        self.terminating: set[str] = set()          # being retired
        # node -> the ports its replicas hold or a start under way took (a port is chosen
        # for the host the replica runs on, never by what is free on the supervisor's)
        self._ports_taken: dict[str, set[int]] = {}
        # Instances removed here: a re-list that began before the removal must not adopt
        # them again (insertion-ordered, the last 1000 kept).
        self._removed: dict[str, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_status: set[asyncio.Task[Any]] = set()
        self.exits: dict[tuple[str, int], deque[LastExit]] = {}     # (service, slot) -> last exits
        self._captures: dict[str, asyncio.Task[None]] = {}          # instance id -> reading its last lines

    # --- facts ------------------------------------------------------------------------------

    def last_output(self) -> dict[tuple[str, int, str], str]:
        """(service, slot, revision) -> the last line written by the newest exit of that
        revision in that slot (for a rollout's failure reason)."""
        out: dict[tuple[str, int, str], str] = {}
        for (service, slot), kept in self.exits.items():
            for e in kept:
                if e.last_line is not None:
                    out[(service, slot, e.revision)] = e.last_line
        return out

    def _capture(self, t: Tracked) -> None:
        """Keep the last lines of a replica that exited, before it is removed (a retire
        waits for this)."""
        o = t.obs
        if o.instance_id in self._captures:
            return

        async def read() -> None:
            rt = self.runtimes.get(o.node)
            data = b""
            try:
                if rt is not None:
                    async for chunk in rt.logs(o.instance_id, tail=LAST_LINES):
                        data = (data + chunk)[-LAST_BYTES:]
            except (WorkloadError, OSError) as exc:
                log.debug("cannot read the last lines of %s: %s", o.instance_id, exc)
            lines = tuple(data.decode("utf-8", "replace").splitlines()[-LAST_LINES:])
            kept = self.exits.setdefault((o.service, o.slot), deque(maxlen=KEPT_EXITS))
            kept.append(LastExit(o.instance_id, o.service, o.slot, o.revision, o.exit_code,
                                 o.finished_at or t.noticed_exit or self.clock(), lines))
            self.host.changed(o.service)

        self._captures[o.instance_id] = asyncio.create_task(read(), name=f"last lines {o.instance_id}")

    async def _captured(self, iid: str) -> None:
        task = self._captures.pop(iid, None)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 10.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - only the lines are at stake
                pass

    def fact(self, t: Tracked) -> Replica:
        o = t.obs
        running = o.state != "exited"
        iid = o.instance_id
        return Replica(iid, o.service, o.slot, o.revision, o.node, running,
                       ready=running and t.health.ready, alive=t.health.alive, started_at=o.started_at,
                       finished_at=o.finished_at if o.finished_at is not None else t.noticed_exit,
                       exit_code=o.exit_code, killed=t.killed,
                       serving=running and t.health.ready and not t.killed and t.pushed == "passing",
                       ready_since=t.ready_since, weight=self.weights.get(iid, 1),
                       terminating=iid in self.terminating, stale=t.stale)

    def facts(self, service: str | None = None) -> tuple[Replica, ...]:
        return tuple(self.fact(t) for t in self.instances.values()
                     if service is None or t.obs.service == service)

    def mark_stale(self, node: str) -> int:
        """``node`` is lost: what ran there is replaced, and stopped if it comes back."""
        marked = 0
        for t in self.instances.values():
            if t.obs.node == node and not t.stale:
                t.stale = True
                marked += 1
        return marked

    def of(self, service: str) -> list[Tracked]:
        return [t for t in self.instances.values() if t.obs.service == service]

    def was_removed(self, iid: str) -> bool:
        return iid in self._removed

    # --- adopting and noticing ---------------------------------------------------------------

    def adopt(self, observed: RuntimeObserved, *, passing: bool = False) -> Tracked:
        """A replica found running (or exited) that this supervisor did not start."""
        now = self.clock()
        t = Tracked(observed, noticed_exit=None if observed.is_running else now)
        self.instances[observed.instance_id] = t
        self._ports_taken.setdefault(observed.node, set()).update(observed.ports.values())
        if not observed.is_running:
            self._capture(t)
        if observed.is_running:
            self._start_probes(t, adopted_ready=passing)
            if passing:
                t.ready_since, t.pushed = now, "passing"
        return t

    def adopt_registrations(self, services: Mapping[str, Any]) -> dict[str, str]:
        """Of the catalog's agent services, those that are meshlet's replicas on our nodes
        (Meta node/slot/revision): instance id -> service. Their Meta revision and weight
        are taken as registered."""
        ours = {}
        for sid, svc in (services or {}).items():
            meta = svc.get("Meta") or {}
            if meta.get("node") in self.nodes and "slot" in meta and "revision" in meta:
                ours[sid] = svc.get("Service", "")
                self.registered_rev[sid] = meta["revision"]
                if str(meta.get("weight", "1")).isdigit() and meta.get("weight") != "1":
                    self.weights.setdefault(sid, int(meta["weight"]))
        return ours

    def exited(self, observed: RuntimeObserved) -> Tracked | None:
        """The runtime reports ``observed`` exited; None if it is not ours."""
        t = self.instances.get(observed.instance_id)
        if t is None:
            return None
        t.obs = observed
        t.noticed_exit = self.clock()
        t.close_probes()
        t.health = dataclasses.replace(t.health, ready=False)
        log.info("%s exited (code %s)", observed.instance_id, observed.exit_code)
        reason = exit_reason(observed.exit_code, killed=t.killed, stopping=observed.instance_id in self.terminating)
        code = "unknown" if observed.exit_code is None else str(observed.exit_code)
        self.host.note(f"{observed.instance_id} exited with code {code} ({reason})", kind="exited",
                       service=observed.service, instance=observed.instance_id, node=observed.node)
        if self.metrics is not None:
            self.metrics.exit(observed.service, reason)
        self._capture(t)
        self.push_status(t)
        return t

    # --- starting ------------------------------------------------------------------------------

    def _assign_ports(self, spec: config.ServiceSpec, node: str, host: str) -> dict[str, int]:
        taken = self._ports_taken.get(node, set())
        ports: dict[str, int] = {}
        lo, hi = PORT_RANGE
        for p in spec.ports:
            if p.port:
                ports[p.name] = p.port
                continue
            start = random.randint(lo, hi)
            for i in range(hi - lo + 1):
                cand = lo + (start - lo + i) % (hi - lo + 1)
                if cand not in taken and cand not in ports.values() and port_is_free(host, cand):
                    ports[p.name] = cand
                    break
            else:
                raise WorkloadError(f"no free port in {lo}-{hi} on {host}")
        return ports

    async def start(self, spec: config.ServiceSpec, slot: int, revision: str, node_name: str,
                    reason: str, *, weight: int = 1, restart: bool = False) -> Tracked:
        """Start a replica of ``revision`` (its own ``spec``) in ``slot`` on ``node_name``,
        with the secrets and configs its spec names (``deliveries``) and its volumes (their
        homes recorded first: ``volumes``), and register it (check critical until its
        readiness passes) with Meta ``weight``. Raises WorkloadError when its secrets cannot
        be delivered, a volume lives elsewhere or the runtime refused (nothing was started)."""
        service = spec.name
        node = self.nodes[node_name]
        rt = self.runtimes[node_name]
        files, secret_env = (), {}
        if self.deliveries is not None and (spec.secrets or spec.configs):
            files, secret_env = await self.deliveries.resolve(spec)
        mounts = attachments(spec, slot)
        ports = self._assign_ports(spec, node_name, node.address)
        iid = f"{service}-{slot}-{revision[:8]}-{secrets.token_hex(3)}"
        env = dict(spec.env)
        env.setdefault("HOST", node.address)
        ispec = InstanceSpec(
            instance_id=iid, service=service, slot=slot, revision=revision, node=node_name,
            image=spec.image, command=spec.command, args=spec.args, workdir=spec.workdir,
            env=env, ports=ports, cpu=spec.resources.limits.cpu, memory=spec.resources.limits.memory,
            stop_signal=spec.stop_signal, stop_grace_period=spec.stop_grace_period,
            dns=self.dns if node.runtime == "docker" else None, files=files, secret_env=secret_env,
            volumes=mounts)
        claimed = await self.volumes.claim(spec, slot, node_name) if self.volumes is not None else []
        self._ports_taken.setdefault(node_name, set()).update(ports.values())
        try:
            observed = await rt.start(ispec)
        except WorkloadError as exc:
            self._ports_taken[node_name].difference_update(ports.values())
            text = str(exc)
            clean = redact(text, secret_env.values())   # a runtime may echo what it was given
            if clean != text:
                raise WorkloadError(clean) from None
            raise
        except BaseException:
            self._ports_taken[node_name].difference_update(ports.values())
            if claimed and self.volumes is not None:
                await self.volumes.release(claimed)     # nothing was made there
            raise
        log.info("started %s (%s slot %d on %s, ports %s): %s", iid, service, slot, node_name, ports, reason)
        # "started" either way (the reason says a restart and its back-off); the kind tells
        self.host.note(f"started {iid} on {node_name}: {reason}",
                       kind="restarted" if restart else "started", service=service, instance=iid, node=node_name)
        t = Tracked(observed)
        self.instances[iid] = t
        if weight != 1:
            self.weights[iid] = weight
        if not observed.is_running:   # exited before we looked
            t.noticed_exit = self.clock()
            self._capture(t)
        else:
            self._start_probes(t)
        await self.register(t)
        return t

    def _start_probes(self, t: Tracked, adopted_ready: bool = False) -> None:
        spec = self.host.spec_for(t.obs.service, t.obs.revision)
        if spec is None:
            # Not desired: it will be stopped; no probes, not ready.
            t.health = Health(ready=False)
            return
        t.health = initial_health(spec.probes)
        if adopted_ready:
            t.health = dataclasses.replace(t.health, started=True, ready=True)
        rt = self.runtimes[t.obs.node]
        iid = t.obs.instance_id

        async def exec_(argv: list[str], timeout: float) -> tuple[int, bytes]:
            return await rt.exec(iid, argv, timeout=timeout)

        def changed(health: Health) -> None:
            before = t.health
            t.health = health
            if before.ready != health.ready:
                last = prober.last.get("readiness") or prober.last.get("startup") or ""
                self.host.note(f"{iid} {'ready' if health.ready else 'not ready'}" + (f": {last}" if last else ""),
                               kind="ready" if health.ready else "unready", service=t.obs.service,
                               instance=iid, node=t.obs.node)
                if health.ready:
                    t.ready_since = self.clock()
                self.push_status(t)
                self.host.changed(t.obs.service)    # a rollout step may wait for it
            elif not health.alive:
                self.host.changed(t.obs.service)

        def result(kind: str, ok: bool) -> None:
            if self.metrics is not None:
                self.metrics.probe(t.obs.service, kind, ok)

        prober = ProbeScheduler(spec, address=t.obs.address, ports=t.obs.ports, exec_=exec_,
                                session=self.session, started_at=t.obs.started_at or self.clock(),
                                on_change=changed, clock=self.clock, on_result=result)
        prober.health = t.health
        t.prober = prober
        prober.start()

    # --- the catalog ---------------------------------------------------------------------------

    def _status_of(self, t: Tracked) -> str:
        return "passing" if t.obs.is_running and t.health.ready and not t.killed else "critical"

    async def register(self, t: Tracked) -> None:
        o = t.obs
        spec = self.host.spec_for(o.service, o.revision)
        tags = list(spec.tags) if spec else []
        node = self.nodes.get(o.node)
        # revision: the applied document's for replicas of its target (DNS serves its tags
        # for those); template: the replica's own revision (what rollout status counts)
        meta = {"revision": self.host.meta_revision(o.service, o.revision), "template": o.revision,
                "node": o.node, "slot": str(o.slot), "weight": str(self.weights.get(o.instance_id, 1))}
        meta.update({f"port_{name}": str(port) for name, port in o.ports.items()})
        first = next(iter(o.ports.values()), 0)
        status = self._status_of(t)
        check = {"TTL": f"{self.check_ttl:g}s", "Status": status}
        await self.catalog.agent.service.register(
            o.service, service_id=o.instance_id, address=node.address if node else o.address,
            port=first, tags=tags, meta=meta, check=check)
        self.registered[o.instance_id] = o.service
        self.registered_rev[o.instance_id] = meta["revision"]
        t.pushed = status
        # The status may have changed while the registration was in flight.
        self.push_status(t)

    async def register_id(self, iid: str) -> None:
        t = self.instances.get(iid)
        if t is not None:
            await self.register(t)

    async def refresh_meta(self, service: str) -> None:
        """Re-register running replicas whose Meta revision is not the one to register now
        (a change that keeps the template keeps the replicas; DNS serves the applied
        document's tags for the revision named in Meta)."""
        for t in self.of(service):
            o = t.obs
            iid = o.instance_id
            if iid in self.registered and o.is_running and iid not in self.terminating \
                    and self.registered_rev.get(iid) != self.host.meta_revision(service, o.revision):
                await self.register(t)

    async def set_weight(self, iid: str, weight: int) -> None:
        self.weights[iid] = weight
        t = self.instances.get(iid)
        if t is not None and iid in self.registered:
            await self.register(t)

    def push_status(self, t: Tracked, *, force: bool = False) -> None:
        """Send the replica's readiness to its TTL check now (not through a sync).

        One push per replica at a time; the pusher re-reads the wanted status after each
        request, so quick flips end at the latest state, never at an older one."""
        iid = t.obs.instance_id
        if iid not in self.registered or t.pushing:
            return

        async def push() -> None:
            t.pushing = True
            again = force     # re-assert the TTL even if unchanged (``pushed`` stays valid)
            try:
                while iid in self.registered and (again or t.pushed != self._status_of(t)):
                    again = False
                    status = self._status_of(t)
                    changed = t.pushed != status
                    try:
                        if status == "passing":
                            await self.catalog.agent.check.ttl_pass(f"service:{iid}")
                        else:
                            await self.catalog.agent.check.ttl_fail(f"service:{iid}")
                        t.pushed = status
                        if status == "passing" and changed:
                            self.host.changed(t.obs.service)   # a rollout may wait for it
                    except Exception as exc:  # noqa: BLE001 - re-asserted every TTL/3 anyway
                        log.warning("cannot update the check of %s: %s", iid, exc)
                        return
            finally:
                t.pushing = False

        task = asyncio.create_task(push())
        self._pending_status.add(task)
        task.add_done_callback(self._pending_status.discard)

    def push_all(self) -> None:
        """Re-assert every replica's check (every TTL/3, and at once after adopting)."""
        for t in list(self.instances.values()):
            self.push_status(t, force=True)

    async def deregister(self, iid: str) -> None:
        if iid not in self.registered:
            return
        try:
            await self.catalog.agent.service.deregister(iid)
        except Exception as exc:  # noqa: BLE001 - retried by the next sync
            log.warning("cannot deregister %s: %s", iid, exc)
            return
        self.registered.pop(iid, None)
        self.registered_rev.pop(iid, None)

    # --- stopping --------------------------------------------------------------------------------

    def _background(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def kill(self, iid: str, reason: str) -> None:
        """A failed liveness/startup probe: deregister and stop it in the background,
        keeping the exited replica for the restart policy. Idempotent."""
        t = self.instances.get(iid)
        if t is None or t.killed or iid in self.terminating:
            return
        t.killed = True
        t.close_probes()
        self.host.note(f"killed {iid}: {reason}", kind="killed", service=t.obs.service, instance=iid,
                       node=t.obs.node)
        log.warning("killing %s: %s", iid, reason)

        async def kill() -> None:
            await self.deregister(iid)
            spec = self.host.spec_for(t.obs.service, t.obs.revision)
            try:
                await self.runtimes[t.obs.node].stop(iid, grace=spec.stop_grace_period if spec else 10.0)
            except InstanceNotFound:
                pass
            except WorkloadError as exc:
                log.error("cannot stop %s: %s", iid, exc)
            self.host.changed(t.obs.service)

        self._background(kill(), f"kill {iid}")

    def retire(self, iid: str, reason: str) -> bool:
        """Stop and remove ``iid`` the one way (see the module), in the background. False
        when it is unknown or being retired already."""
        t = self.instances.get(iid)
        if t is None or iid in self.terminating:
            return False
        self.terminating.add(iid)       # reported terminating from now on
        self._background(self._retire(t, reason), f"retire {iid}")
        return True

    async def _retire(self, t: Tracked, reason: str) -> None:
        iid, service = t.obs.instance_id, t.obs.service
        spec = self.host.spec_for(service, t.obs.revision)
        try:
            for attempt in range(30):
                serving = iid in self.registered and t.obs.is_running and t.health.ready
                t.close_probes()
                await self.deregister(iid)          # out of the catalog FIRST
                if serving:
                    drain = max(MIN_DRAIN, spec.update.drain_delay if spec else 0.0)
                    await asyncio.sleep(drain)      # proxies and DNS drop it
                    await self._wait_in_flight(iid, IN_FLIGHT_LIMIT)
                if await self._stop_and_remove(t, reason, spec):
                    break
                await asyncio.sleep(min(1.0 + attempt, 10.0))   # the runtime refused: again
            else:
                log.error("could not retire %s", iid)
        finally:
            if iid not in self.instances:
                self.terminating.discard(iid)
                self.weights.pop(iid, None)
            self.host.changed(service)

    async def _stop_and_remove(self, t: Tracked, reason: str, spec: config.ServiceSpec | None) -> bool:
        iid = t.obs.instance_id
        rt = self.runtimes.get(t.obs.node)
        if rt is not None:
            try:
                await rt.stop(iid, grace=spec.stop_grace_period if spec else 10.0)
                await self._captured(iid)       # its last lines, before its log goes
                await rt.remove(iid)
            except InstanceNotFound:
                pass   # gone already: nothing left to stop
            except WorkloadError as exc:
                log.error("cannot stop %s: %s", iid, exc)
                return False
        self.instances.pop(iid, None)
        self._removed[iid] = None
        if len(self._removed) > 1000:
            del self._removed[next(iter(self._removed))]
        self._ports_taken.get(t.obs.node, set()).difference_update(t.obs.ports.values())
        if t.obs.is_running:
            self.host.note(f"stopped {iid}: {reason}", kind="stopped", service=t.obs.service, instance=iid,
                           node=t.obs.node)
            log.info("stopped %s: %s", iid, reason)
        return True

    async def _wait_in_flight(self, iid: str, limit: float) -> None:
        """Until no proxy the supervisor knows of (``proxy_admins``) lists ``iid`` among its
        draining endpoints (``GET /routes``: left the table, requests still in flight), at
        most ``limit`` seconds. A proxy that does not answer is not waited for."""
        if not self.proxy_admins:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            busy = []
            for admin in self.proxy_admins:
                try:
                    async with self.session.get(f"http://{admin}/routes",
                                                timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                        doc = await r.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue
                active = draining_requests(doc, iid)
                if active is not None:
                    busy.append(active)
            if not busy:
                return
            if loop.time() >= deadline:
                log.warning("%s still has %d request(s) in flight after %gs; stopping it", iid, sum(busy), limit)
                return
            await asyncio.sleep(0.05)

    async def retire_all(self, reason: str) -> None:
        """Retire every replica and wait until each is gone (``close(stop=True)``)."""
        for iid in list(self.instances):
            self.retire(iid, reason)
        await self.settle()

    async def settle(self) -> None:
        """Wait for every background retirement and kill under way."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop probing and cancel what runs in the background (workloads keep running)."""
        for task in [*self._tasks, *self._captures.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._captures.values(), return_exceptions=True)
        for t in self.instances.values():
            t.close_probes()
        if self._pending_status:
            await asyncio.gather(*self._pending_status, return_exceptions=True)
