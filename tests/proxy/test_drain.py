"""SIGTERM drains: in-flight requests finish, idle connections close, the process exits 0;
``--workers N`` shares the listeners between processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request

import aiohttp
import pytest

import config

from supervisor.daemon.replicas import draining_requests
from _util import pid_alive

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


@pytest.fixture
def one(mesh_catalog, backends, px):
    name = px.unique("drain")
    b = backends(name + "-b0")
    mesh_catalog.register(name, name + "-0", b.port)
    yield name, f"{name}.service.meshlet", b
    mesh_catalog.deregister(name + "-0")


def _backend_count(b) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{b.port}/count", timeout=5) as r:
        return json.loads(r.read())["count"]


def _refuses(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except OSError:
        return True


async def test_sigterm_finishes_in_flight_requests_and_exits_0(one, start_proxy, px):
    name, host, backend = one
    proxy = start_proxy()
    base = _backend_count(backend)
    async with aiohttp.ClientSession() as s:
        async def slow(i: int) -> tuple[int, str, str | None]:
            async with s.get(proxy.url(f"/slow?delay=1.5&i={i}"), headers={"Host": host}) as r:
                return r.status, await r.text(), r.headers.get("Connection")
        tasks = [asyncio.create_task(slow(i)) for i in range(5)]
        await px.async_wait_for(lambda: _backend_count(backend) >= base + 5 + 1, 10, interval=0.02,
                                what="five requests at the backend")
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        await px.async_wait_for(lambda: _refuses(proxy.http), 5, what="the listener to close")
        results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == [200] * 5
    assert all(r[1].startswith("slow done") for r in results)
    assert all(r[2] == "close" for r in results)  # busy connections lose keep-alive
    assert proxy.proc.wait(10) == 0
    print(f"drained 5 in-flight requests, exit after {time.monotonic() - t0:.2f}s")


def test_sigterm_closes_idle_keep_alive_connections_at_once(one, start_proxy, px):
    name, host, backend = one
    proxy = start_proxy()
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/x", host))
        assert c.response().status == 200
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert c.is_closed(timeout=5)
        assert time.monotonic() - t0 < 2
    assert proxy.proc.wait(10) == 0


def test_drain_deadline_closes_what_is_left(one, start_proxy, px):
    name, host, backend = one
    proxy = start_proxy("--drain-timeout", "0.5")
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/slow?delay=10", host))
        base = _backend_count(backend)
        px.wait_for(lambda: _backend_count(backend) > base, 10, what="the request at the backend")
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        assert c.is_closed(timeout=5)
    assert time.monotonic() - t0 < 5


async def test_workers_share_the_listener_and_drain_together(one, start_proxy, px):
    name, host, backend = one
    proxy = start_proxy("--workers", "2")
    prefixes = _spread_requests(proxy, px, host, 40)
    assert len(prefixes) == 2, prefixes
    with urllib.request.urlopen(f"http://{proxy.admin}/ready", timeout=5) as r:
        assert r.status == 200
    children = _children(proxy.pid)
    assert len(children) == 2
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    px.wait_for(lambda: not any(pid_alive(pid) for pid in children), 5, what="workers to exit")


async def test_the_workers_admin_counts_every_workers_requests_and_in_flight(one, start_proxy, px,
                                                                                 mesh_catalog):
    """With --workers the admin address answers for all workers: /metrics counts every
    request whichever worker served it, and /routes lists a deregistered endpoint as
    draining with the requests in flight on it in any worker (what a rollout waits for)."""
    name, host, backend = one
    proxy = start_proxy("--workers", "2")
    prefixes = _spread_requests(proxy, px, host, 40)
    assert len(prefixes) == 2, prefixes           # both workers served some
    samples = _samples(proxy)
    assert samples[("meshlet_proxy_requests_total", (("code", "200"), ("service", name)))] == 40
    assert samples[("meshlet_proxy_request_duration_seconds_count", (("service", name),))] == 40
    with urllib.request.urlopen(f"http://{proxy.admin}/ready", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ready (2 of 2 workers)\n"

    # 8 slow requests, each on its own connection (so over both workers), in flight when
    # the endpoint leaves the catalog
    before = _backend_count(backend)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        async def slow(i: int) -> int:
            async with s.get(f"http://{proxy.http}/slow?delay=4&n={i}", headers={"Host": host}) as r:
                await r.read()
                return r.status
        tasks = [asyncio.create_task(slow(i)) for i in range(8)]
        await px.async_wait_for(lambda: _backend_count(backend) - before >= 9, timeout=10,
                                what="8 slow requests at the backend")   # (+1: this /count)
        mesh_catalog.deregister(name + "-0")

        def draining() -> int:
            with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
                return sum(e["active"] for e in json.load(r)["draining"] if e["port"] == backend.port)
        await px.async_wait_for(lambda: draining() == 8, timeout=5, what="8 in flight, listed as draining")
        # the contract with the supervisor (config/README.md, "The proxy's /routes"): what it
        # reads from this document before it stops a retired replica
        with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
            assert draining_requests(json.load(r), name + "-0") == 8
        assert await asyncio.gather(*tasks) == [200] * 8
    assert draining() == 0
    with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
        assert draining_requests(json.load(r), name + "-0") is None   # nothing left to wait for


def _spread_requests(proxy, px, host: str, n: int) -> set[str]:
    """``n`` GETs, each on a new connection (the kernel spreads them over the workers), all
    200; the X-Request-Id prefixes seen, one per worker that served some."""
    prefixes = set()
    for _ in range(n):
        with px.RawClient(proxy.http) as c:
            c.send(px.get("/w", host, "Connection: close\r\n"))
            r = c.response()
            assert r.status == 200
            rid = dict((k.lower(), v) for k, v in r.json()["headers"])["x-request-id"]
            prefixes.add(rid.split("-")[0])
    return prefixes


def _samples(proxy) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_killed_worker_is_restarted(one, start_proxy, px):
    name, host, backend = one
    proxy = start_proxy("--workers", "2")
    first = _children(proxy.pid)
    os.kill(first[0], signal.SIGKILL)
    px.wait_for(lambda: len(set(_children(proxy.pid)) - set(first)) == 1, 15, interval=0.1,
                what="a new worker")
    for _ in range(10):
        with px.RawClient(proxy.http) as c:
            c.send(px.get("/after", host, "Connection: close\r\n"))
            assert c.response().status == 200


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return sorted(out)


def test_worker_command_lines():
    from proxy import parse_args
    from proxy._workers import worker_argv
    args = parse_args(["--consul", "http://c:8500", "--listen", "127.0.0.1:0", "--workers", "3",
                       "--admin", "127.0.0.1:9901", "--access-log"])
    held = [config.ProxyListener(address="127.0.0.1:8080")]
    w0 = worker_argv(args, 0, held)
    w1 = worker_argv(args, 1, held)
    assert w0[1:4] == ["-P", "-m", "proxy"]   # -P: the working directory is not on its import path
    assert "--listen" in w0 and w0[w0.index("--listen") + 1] == "127.0.0.1:8080"  # the port the parent holds
    assert w0[w0.index("--worker-index") + 1] == "0" and w1[w1.index("--worker-index") + 1] == "1"
    # each worker has an internal admin listener; the parent serves --admin from them
    assert w0[w0.index("--admin") + 1] == w1[w1.index("--admin") + 1] == "127.0.0.1:0"
    assert "--access-log" in w1 and w1[w1.index("--workers") + 1] == "3"
    assert parse_args(w0[4:]).listen == held
