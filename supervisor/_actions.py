"""The supervisor's actions on one replica: start (ports, env, probes), register and keep
its TTL check in step with readiness, deregister, kill (liveness) and stop.

``ReplicaActions`` is a part of ``agent.Supervisor`` (a mixin over its state: instances,
registrations, runtimes, the catalog client); ``_Inst`` is what it knows of one replica.
The spec of a replica is the one of its own revision (``rolling.spec_for``): during a
rollout two revisions run side by side, each probed and stopped by its own spec.

Errors: a runtime refusal at start is recorded as the service's problem and backs off;
catalog failures are logged and retried by the next sync or TTL/2 push.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import config

from .backoff import BackoffState, delay_for
from .probes import Health, ProbeScheduler, initial_health
from .reconcile import Kill, Replica
from .rolling import MIN_DRAIN
from .runtime import InstanceNotFound, InstanceSpec, WorkloadError
from .runtime import Observed as RuntimeObserved

if TYPE_CHECKING:
    from .agent import Supervisor

__all__ = ["ReplicaActions", "PORT_RANGE", "port_is_free"]

log = logging.getLogger("supervisor.agent")

PORT_RANGE = (20000, 29999)


@dataclass(eq=False)
class _Inst:
    """One replica the supervisor knows of: what its runtime reports plus probe state."""

    obs: RuntimeObserved
    health: Health = field(default_factory=Health)
    prober: ProbeScheduler | None = None
    killed: bool = False
    ready_since: float | None = None    # when readiness last turned passing
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



@dataclass(frozen=True, slots=True)
class _StartArgs:
    service: str
    slot: int
    node: str
    backoff: BackoffState
    reason: str


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True



class ReplicaActions:
    """Start, register, push status, deregister, kill and stop replicas (see the module)."""

    def _assign_ports(self: Supervisor, spec: config.ServiceSpec, host: str) -> dict[str, int]:
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

    async def _start_instance(self: Supervisor, service: str, slot: int, revision: str, node_name: str,
                              backoff: BackoffState, reason: str, *, weight: int = 1) -> bool:
        """Start a replica of ``revision`` (its own spec) in ``slot`` on ``node_name`` and
        register it (check critical until its readiness passes) with Meta ``weight``.
        False when the runtime refused (the slot is held back, the problem recorded)."""
        spec = self.rolling.spec_for(service, revision)
        if spec is None:
            return False
        a = _StartArgs(service, slot, node_name, backoff, reason)
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
            self.start_errors[(a.service, a.slot)] = str(exc)
            # An engine that refuses is retried with back-off, like a crash (at least 1 s).
            # The hold is set before the back-off is stored (an await), so nothing sees the
            # new failure count with the old hold.
            st = BackoffState(a.backoff.failures + 1, a.backoff.restarts)
            delay = max(delay_for(spec.restart.backoff, st.failures), 1.0)
            self._start_hold[(a.service, a.slot)] = self.clock() + delay
            self._follow_up(a.service, a.slot, delay)
            await self._save_backoff(a.service, a.slot, st)
            return False
        self._start_hold.pop((a.service, a.slot), None)
        self.problems.pop(a.service, None)
        self.start_errors.pop((a.service, a.slot), None)
        log.info("started %s (%s slot %d on %s, ports %s): %s", iid, a.service, a.slot, a.node,
                 ports, a.reason)
        self._note(f"started {iid}: {a.reason}")
        inst = _Inst(observed)
        self.instances[iid] = inst
        if weight != 1:
            self.rolling.weights[iid] = weight
        if not observed.is_running:   # exited before we looked
            inst.noticed_exit = self.clock()
            self.rolling.note_exit(inst)
        else:
            self._start_probes(inst)
        await self._register(inst)
        return True

    def _start_probes(self: Supervisor, inst: _Inst, adopted_ready: bool = False) -> None:
        spec = self.rolling.spec_for(inst.obs.service, inst.obs.revision)
        if spec is None:
            # Not desired: it will be stopped; no probes, not ready.
            inst.health = Health(ready=False)
            return
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
                if health.ready:
                    inst.ready_since = self.clock()
                self._push_status(inst)
                self.enqueue(inst.obs.service)    # a rollout step may wait for it
            elif not health.alive:
                self.enqueue(inst.obs.service)

        assert self._session is not None
        prober = ProbeScheduler(spec, address=inst.obs.address, ports=inst.obs.ports, exec_=exec_,
                                session=self._session, started_at=inst.obs.started_at or self.clock(),
                                on_change=changed, clock=self.clock)
        prober.health = inst.health
        inst.prober = prober
        prober.start()

    def _status_of(self: Supervisor, inst: _Inst) -> str:
        return "passing" if inst.obs.is_running and inst.health.ready and not inst.killed else "critical"

    def _meta_revision(self: Supervisor, o: RuntimeObserved) -> str:
        """Meta revision: the applied document's for replicas of its target revision (DNS
        serves the document's tags for those), else the replica's own revision."""
        if o.revision == self.rolling.doc_target(o.service):
            return self.doc_revision.get(o.service, o.revision)
        return o.revision

    async def _register(self: Supervisor, inst: _Inst) -> None:
        o = inst.obs
        spec = self.rolling.spec_for(o.service, o.revision)
        tags = list(spec.tags) if spec else []
        node = self.nodes.get(o.node)
        meta = {"revision": self._meta_revision(o), "node": o.node, "slot": str(o.slot),
                "weight": str(self.rolling.weights.get(o.instance_id, 1))}
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

    def _push_status(self: Supervisor, inst: _Inst, *, force: bool = False) -> None:
        """Send the instance's readiness to its TTL check now (not through a sync).

        One push per instance at a time; the pusher re-reads the wanted status after each
        request, so quick flips end at the latest state, never at an older one."""
        iid = inst.obs.instance_id
        if iid not in self.registered or self._client is None:
            return
        if inst.pushing:
            return

        async def push() -> None:
            inst.pushing = True
            again = force     # re-assert the TTL even if unchanged (``pushed`` stays valid)
            try:
                while iid in self.registered and (again or inst.pushed != (status := self._status_of(inst))):
                    again = False
                    status = self._status_of(inst)
                    changed = inst.pushed != status
                    try:
                        if status == "passing":
                            await self._client.agent.check.ttl_pass(f"service:{iid}")
                        else:
                            await self._client.agent.check.ttl_fail(f"service:{iid}")
                        inst.pushed = status
                        if status == "passing" and changed:
                            self.enqueue(inst.obs.service)   # a rollout may wait for it
                    except Exception as exc:  # noqa: BLE001 - re-asserted every TTL/2 anyway
                        log.warning("cannot update the check of %s: %s", iid, exc)
                        return
            finally:
                inst.pushing = False

        task = asyncio.create_task(push())
        self._pending_status.add(task)
        task.add_done_callback(self._pending_status.discard)

    async def _deregister(self: Supervisor, iid: str) -> None:
        if iid not in self.registered:
            return
        try:
            await self._client.agent.service.deregister(iid)
        except Exception as exc:  # noqa: BLE001 - retried by the next sync
            log.warning("cannot deregister %s: %s", iid, exc)
            return
        self.registered.pop(iid, None)
        self.registered_rev.pop(iid, None)

    async def _kill_instance(self: Supervisor, a: Kill) -> None:
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
        spec = self.rolling.spec_for(a.service, inst.obs.revision)
        grace = spec.stop_grace_period if spec else 10.0
        await self.runtimes[a.node].stop(a.instance_id, grace=grace)

    async def _stop_instance(self: Supervisor, iid: str, reason: str) -> None:
        inst = self.instances.get(iid)
        if inst is None:
            await self._deregister(iid)
            return
        if inst.prober is not None:
            inst.prober.close()
            inst.prober = None
        was_serving = iid in self.registered and inst.health.ready and inst.obs.is_running
        await self._deregister(iid)
        spec = self.rolling.spec_for(inst.obs.service, inst.obs.revision)
        if was_serving and spec is not None:
            # let DNS and proxies catch up (and requests in flight end) before SIGTERM
            await asyncio.sleep(max(MIN_DRAIN, spec.update.drain_delay))
        grace = spec.stop_grace_period if spec else 10.0
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

    def _note(self: Supervisor, text: str) -> None:
        kind, _, rest = text.partition(" ")
        self.history.append((self.clock(), kind, rest.split(":")[0].split(" ")[0]))
        del self.history[:-1000]
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-100]

