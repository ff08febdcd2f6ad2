"""Probes: a pure state machine per instance (results in, state out) and the I/O runners.

Kubernetes semantics (config defaults: initial_delay 0s, period 10s, timeout 1s,
success_threshold 1, failure_threshold 3):

- A probe first runs ``initial_delay`` after the instance started, then every ``period``;
  one attempt that does not answer within ``timeout`` is a failure.
- ``success_threshold`` consecutive successes make it succeed, ``failure_threshold``
  consecutive failures make it fail; anything in between keeps the previous verdict.
- startup: while it has not succeeded, liveness and readiness do not run and the instance
  is not ready. ``failure_threshold`` failures -> the instance is killed (like liveness).
- readiness: not ready until it succeeds; no readiness probe = ready once started.
- liveness: alive until it fails; then the supervisor kills and restarts the instance.

Runners (``RUNNERS`` by kind): http GET to ``<address>:<port><path>`` (200-399 passes),
tcp connect, exec through the runtime (exit 0 passes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

import config

__all__ = ["Counter", "Health", "initial_health", "observe", "on_result", "due_kinds",
           "resolve_port", "run_probe", "ProbeScheduler", "STARTUP", "LIVENESS", "READINESS"]

log = logging.getLogger(__name__)

STARTUP, LIVENESS, READINESS = "startup", "liveness", "readiness"
UNKNOWN, SUCCESS, FAILURE = "unknown", "success", "failure"


@dataclass(frozen=True, slots=True)
class Counter:
    successes: int = 0
    failures: int = 0
    verdict: str = UNKNOWN


def observe(probe: config.Probe, counter: Counter, ok: bool) -> Counter:
    """One result of ``probe``: consecutive counts and the thresholds' verdict."""
    if ok:
        successes = counter.successes + 1
        verdict = SUCCESS if successes >= probe.success_threshold else counter.verdict
        return Counter(successes, 0, verdict)
    failures = counter.failures + 1
    verdict = FAILURE if failures >= probe.failure_threshold else counter.verdict
    return Counter(0, failures, verdict)


@dataclass(frozen=True, slots=True)
class Health:
    """The probe state of one instance."""

    started: bool = True      # startup probe succeeded (or there is none)
    ready: bool = True        # may receive traffic
    alive: bool = True        # False: kill and restart (liveness or startup failed)
    startup: Counter = Counter()
    liveness: Counter = Counter()
    readiness: Counter = Counter()

    def describe(self) -> str:
        if not self.alive:
            return "failed"
        if not self.started:
            return "starting"
        return "ready" if self.ready else "not-ready"


def initial_health(probes: config.Probes) -> Health:
    started = probes.startup is None
    return Health(started=started, ready=started and probes.readiness is None)


def on_result(probes: config.Probes, health: Health, kind: str, ok: bool) -> Health:
    """The instance's state after one result of its ``kind`` probe."""
    probe = getattr(probes, kind)
    if probe is None or not health.alive:
        return health
    if kind == STARTUP:
        if health.started:
            return health
        counter = observe(probe, health.startup, ok)
        if counter.verdict == SUCCESS:
            return replace(health, startup=counter, started=True,
                           ready=probes.readiness is None)
        if counter.verdict == FAILURE:
            return replace(health, startup=counter, alive=False, ready=False)
        return replace(health, startup=counter)
    if not health.started:
        return health   # startup holds the others off
    if kind == LIVENESS:
        counter = observe(probe, health.liveness, ok)
        if counter.verdict == FAILURE:
            return replace(health, liveness=counter, alive=False, ready=False)
        return replace(health, liveness=counter)
    counter = observe(probe, health.readiness, ok)
    ready = health.ready
    if counter.verdict == SUCCESS and ok:
        ready = True
    elif counter.verdict == FAILURE and not ok:
        ready = False
    return replace(health, readiness=counter, ready=ready)


def due_kinds(probes: config.Probes, health: Health) -> tuple[str, ...]:
    """The probes that run in this state."""
    if not health.alive:
        return ()
    if not health.started:
        return (STARTUP,)
    return tuple(k for k in (LIVENESS, READINESS) if getattr(probes, k) is not None)


# --------------------------------------------------------------------------- runners


def resolve_port(ref: str | int | None, spec: config.ServiceSpec, ports: Mapping[str, int]) -> int:
    """A probe's port reference -> the instance's host port. A name is looked up in the
    instance's assigned ports; a number that is a declared port of the service maps to the
    port assigned for it; None is the first port. ValueError when there is none."""
    if ref is None:
        if not ports:
            raise ValueError("the service has no ports to probe")
        return next(iter(ports.values()))
    if isinstance(ref, str):
        if ref in ports:
            return ports[ref]
        raise ValueError(f"no port named {ref!r}")
    for p in spec.ports:
        if p.port == ref and p.name in ports:
            return ports[p.name]
    return int(ref)


Exec = Callable[[list[str], float], Awaitable[tuple[int, bytes]]]


async def run_probe(probe: config.Probe, spec: config.ServiceSpec, *, address: str,
                    ports: Mapping[str, int], exec_: Exec,
                    session: aiohttp.ClientSession) -> tuple[bool, str]:
    """Run one attempt of ``probe`` -> (passed, what happened). Never raises for a
    failing workload; a timeout is a failure."""
    try:
        if probe.http is not None:
            port = resolve_port(probe.http.port, spec, ports)
            url = f"http://{address}:{port}{probe.http.path}"
            timeout = aiohttp.ClientTimeout(total=probe.timeout)
            async with session.get(url, headers=dict(probe.http.headers), timeout=timeout,
                                   allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 400, f"GET {probe.http.path}: {resp.status}"
        if probe.tcp is not None:
            port = resolve_port(probe.tcp.port, spec, ports)
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                               probe.timeout)
            writer.close()
            return True, f"tcp {port}: connected"
        if probe.exec is not None:
            code, output = await exec_(list(probe.exec.command), probe.timeout)
            text = output[-200:].decode("utf-8", "replace").strip()
            return code == 0, f"exec exit {code}" + (f": {text}" if text else "")
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        return False, f"timed out after {probe.timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure of the workload is a failed probe
        return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return False, "probe has no http, tcp or exec"


class ProbeScheduler:
    """Runs the probes of one instance on loop timers and reports every state change.

    ``on_change(health)`` is called (synchronously, in the loop) whenever the Health
    changes; it must only record and enqueue. ``close()`` cancels everything."""

    def __init__(self, spec: config.ServiceSpec, *, address: str, ports: Mapping[str, int],
                 exec_: Exec, session: aiohttp.ClientSession, started_at: float,
                 on_change: Callable[[Health], Any], clock: Callable[[], float],
                 on_result: Callable[[str, bool], Any] | None = None) -> None:
        self.spec = spec
        self.health = initial_health(spec.probes)
        self._address, self._ports, self._exec, self._session = address, ports, exec_, session
        self._on_change = on_change
        self._on_result = on_result      # every attempt (kind, passed): metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started_at = started_at
        self._clock = clock
        self._closed = False
        self.last: dict[str, str] = {}

    def start(self) -> None:
        for kind in (STARTUP, LIVENESS, READINESS):
            probe = getattr(self.spec.probes, kind)
            if probe is not None:
                self._tasks[kind] = asyncio.get_running_loop().create_task(
                    self._run(kind, probe), name=f"probe {kind}")

    async def _run(self, kind: str, probe: config.Probe) -> None:
        # initial_delay counts from the instance's start (an adopted instance is past it).
        first = self._started_at + probe.initial_delay - self._clock()
        if first > 0:
            await asyncio.sleep(first)
        while not self._closed:
            if kind in due_kinds(self.spec.probes, self.health):
                ok, what = await run_probe(probe, self.spec, address=self._address,
                                           ports=self._ports, exec_=self._exec,
                                           session=self._session)
                if self._closed:
                    return
                self.last[kind] = what
                if self._on_result is not None:
                    self._on_result(kind, ok)
                before = self.health
                self.health = on_result(self.spec.probes, before, kind, ok)
                if self.health != before and (before.ready, before.alive, before.started) != (
                        self.health.ready, self.health.alive, self.health.started):
                    log.info("%s probe: %s -> %s (%s)", kind, before.describe(),
                             self.health.describe(), what)
                    self._on_change(self.health)
                if not self.health.alive:
                    return
            await asyncio.sleep(probe.period)

    def close(self) -> None:
        self._closed = True
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
