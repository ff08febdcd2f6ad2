"""Several supervisors over one catalog: one leads (the leader lock), the others stand by.

kill -9 of the leader under load through the proxy: a standby takes over, adopts every
replica (same instances, same pids) and no request fails. A leader cut off from the
catalog (a partition: its only route to the catalog goes through a relay the test closes)
stops acting before its session can expire, so it steps down before the standby leads.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from _util import async_wait_for, cli_env, kill_leftovers, pid_alive, start_server, stop_process, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
READY = """\
    probes:
      readiness: {http: {path: /ready}, period: 0.2s}
    """


class Watched:
    """A supervisor process whose every output line is kept with the time it came."""

    def __init__(self, url: str, data: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "supervisor", "--consul", url, "--data-dir", str(data),
             "--admin", "127.0.0.1:0", "--runtime", "process"],
            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
        self.lines: list[tuple[float, str]] = []
        self.ready: "queue.Queue[dict]" = queue.Queue()
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if line.startswith("ready "):
                self.ready.put(json.loads(line[len("ready "):]))

    def when(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def admin(self, timeout: float) -> str:
        return self.ready.get(timeout=timeout)["admin"]


def rows(admin: str) -> list[dict]:
    with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=5) as r:
        doc = json.load(r)
    return next((s["instances"] for s in doc["services"] if s["name"] == "web"), [])


def ready_rows(admin: str) -> list[dict]:
    return [r for r in rows(admin) if r["ready"]]


class Load:
    """Requests through the proxy in a thread, one keep-alive connection, until stopped."""

    def __init__(self, port: int) -> None:
        self.port, self.ok, self.failed, self.errors = port, 0, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": "web.service.meshlet"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                self.failed += 1
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture
async def ha(short_session_mesh, tmp_path):
    procs: list[subprocess.Popen] = []
    try:
        yield short_session_mesh, short_session_mesh.catalog, procs
    finally:
        for p in procs:
            stop_process(p)
        kill_leftovers(tmp_path / "sup")


async def test_kill9_of_the_leader_hands_over_to_a_standby_under_load(ha):
    mesh, cat, procs = ha
    await mesh.apply(mesh.service_yaml(replicas=2, probes=READY))
    data = mesh.tmp / "sup"
    first = Watched(cat.url, data)
    procs.append(first.proc)
    admin = first.admin(30)
    await async_wait_for(lambda: len(ready_rows(admin)) == 2, timeout=30, what="web ready")
    second = Watched(cat.url, data)
    procs.append(second.proc)
    await async_wait_for(lambda: second.when("standing by") is not None, timeout=15, what="the standby")
    assert second.ready.empty()          # it does nothing while the other leads
    proxy, ready = start_server([sys.executable, "-m", "proxy", "--consul", cat.url, "--listen", "127.0.0.1:0"],
                                env=cli_env())
    procs.append(proxy)
    port = int(ready["http"][0].rpartition(":")[2])
    await async_wait_for(lambda: _passing(mesh, 2), timeout=15)
    before = {r["id"]: r["pid"] for r in rows(admin)}
    load = Load(port)
    try:
        await async_wait_for(lambda: load.ok > 20, timeout=15, what="load flowing")
        first.proc.kill()
        first.proc.wait(10)
        assert all(pid_alive(p) for p in before.values()), "workloads outlive their supervisor"
        admin2 = await asyncio.to_thread(second.admin, 60)
        await async_wait_for(lambda: len(ready_rows(admin2)) == 2, timeout=30, what="adopted and ready")
        after = {r["id"]: r["pid"] for r in rows(admin2)}
        assert after == before, "the new leader adopted every replica and restarted none"
        served = load.ok
        await async_wait_for(lambda: load.ok > served + 20, timeout=15, what="load still flowing")
    finally:
        load.stop()
    assert load.failed == 0, load.errors[:5]


async def _passing(mesh, n):
    return len(await mesh.passing("web")) == n


class Relay:
    """A TCP relay to the catalog that the test can cut: the leader's only route to it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.conns: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.conns):
            w.transport.abort()
        self.conns.clear()


async def test_a_leader_cut_off_from_the_catalog_steps_down_before_a_standby_leads(ha):
    mesh, cat, procs = ha
    await mesh.apply(mesh.service_yaml(replicas=2, probes=READY))
    data = mesh.tmp / "sup"
    relay = Relay(cat.port)
    relay_port = await relay.start()
    first = Watched(f"http://127.0.0.1:{relay_port}", data)
    procs.append(first.proc)
    admin = await asyncio.to_thread(first.admin, 30)
    await async_wait_for(lambda: len(ready_rows(admin)) == 2, timeout=30, what="web ready")
    before = {r["id"]: r["pid"] for r in rows(admin)}
    second = Watched(cat.url, data)
    procs.append(second.proc)
    await async_wait_for(lambda: second.when("standing by") is not None, timeout=15, what="the standby")
    await relay.cut()
    cut = time.monotonic()
    admin2 = await asyncio.to_thread(second.admin, 60)
    led = time.monotonic()
    stepped = first.when("stepping down")
    assert stepped is not None, first.lines[-10:]
    # the partitioned leader stopped acting before the standby could act
    assert cut < stepped < led, (cut, stepped, led)
    await async_wait_for(lambda: len(ready_rows(admin2)) == 2, timeout=30, what="adopted and ready")
    assert {r["id"]: r["pid"] for r in rows(admin2)} == before
    assert first.proc.poll() is None      # standing by again, not crashed
    await asyncio.to_thread(wait_for, lambda: any("standing by" in line for t, line in first.lines if t > stepped),
                            timeout=20, interval=0.1, what="the old leader waiting for the lock again")
