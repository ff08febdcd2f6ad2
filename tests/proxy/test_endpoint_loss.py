"""Instances that die, freeze or leave the catalog while requests are on them: clients see
no failure (real backend processes, real signals, the real catalog watch).

The cases behind zero failed requests in bench/heal and rolling updates: a process frozen
with SIGSTOP holds pooled keep-alive connections that never answer; a process killed with
SIGKILL resets them; an instance deregistered (a rollout retiring it) must finish what it
has and get nothing new.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

PORT = "command: [x]\nports: [{name: http, port: 0, protocol: http}]\n"
NO_EJECTION = "outlier: {consecutive_5xx: 0, consecutive_gateway_failure: 0}"
# The frozen instance holds a third (a half) of the concurrent requests, which all time out
# in the same sweep: more retries at once than the default budget (20 %, at least 3) allows.
# These tests are about where retries go; test_retry_budget.py is about how many.
BUDGET = "budget_percent: 100"


def routes_endpoints(proxy, service: str) -> set[int]:
    """Ports of the endpoints of ``service`` in the proxy's live table (/routes)."""
    with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
        table = json.load(r)
    svc = table["services"].get(service)
    if svc is None:
        return set()
    return {e["port"] for c in svc["clusters"] for e in c["endpoints"]}


def draining_ports(proxy) -> dict[int, int]:
    """/routes "draining": port -> requests in flight, of endpoints that left the table."""
    with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
        return {e["port"]: e["active"] for e in json.load(r)["draining"]}


def established(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (the backend's
    side of the proxy's upstream connections), from /proc/net/tcp."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, state = parts[1], parts[3]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            n += 1
    return n


async def get(s: aiohttp.ClientSession, env, path: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    async with s.get(env.url(path), headers={"Host": env.host}) as r:
        body = await r.read()
        backend = r.headers.get("X-Backend", "") if r.status == 200 else body.decode(errors="replace")
        return r.status, backend, time.monotonic() - t0


async def warm(s: aiohttp.ClientSession, env, n: int = 40) -> None:
    """Concurrent requests so that the proxy pools keep-alive connections to every backend."""
    results = await asyncio.gather(*(get(s, env, f"/warm/{i}") for i in range(n)))
    assert {b for _, b, _ in results} == {b.name for b in env.backends}, results


@pytest.fixture
def frozen(request):
    """SIGCONT whatever a test froze, even when it fails (so teardown can stop it)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


async def test_frozen_backend_with_pooled_connections_is_bypassed_within_per_try_timeout(
        mesh_catalog, tmp_path, px, frozen):
    """SIGSTOP one of three backends after the proxy pooled connections to it: every GET
    still succeeds, via another instance, within per_try_timeout (plus the sweep's tick)."""
    env = px.Env(mesh_catalog, tmp_path, px.unique("frozen"), 3,
                 PORT + f"routes: {{retries: {{attempts: 2, per_try_timeout: 0.4s, {BUDGET}}}, {NO_EJECTION}}}")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await warm(s, env)
            victim = env.backends[0]
            os.kill(victim.proc.pid, signal.SIGSTOP)
            frozen.append(victim.proc.pid)
            results = []
            for _ in range(3):  # rounds of concurrent requests: pooled and fresh connections alike
                results += await asyncio.gather(*(get(s, env, f"/f/{i}") for i in range(30)))
        bad = [r for r in results if r[0] != 200]
        assert bad == [], bad[:5]
        assert victim.name not in {b for _, b, _ in results}
        slowest = max(t for _, _, t in results)
        assert slowest < 0.4 + 0.6, f"slowest request took {slowest:.2f}s (per-try time-out 0.4s)"
    finally:
        env.close()


async def test_frozen_backend_without_per_try_timeout_is_hedged(mesh_catalog, tmp_path, px, frozen):
    """Without per_try_timeout a GET with no response head after HEDGE_AFTER (2 s) is also
    sent to another instance, and the first answer wins."""
    from proxy._decisions import HEDGE_AFTER

    env = px.Env(mesh_catalog, tmp_path, px.unique("hedge"), 2,
                 PORT + f"routes: {{retries: {{{BUDGET}}}, {NO_EJECTION}}}")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await warm(s, env, 20)
            victim = env.backends[0]
            os.kill(victim.proc.pid, signal.SIGSTOP)
            frozen.append(victim.proc.pid)
            results = await asyncio.gather(*(get(s, env, f"/h/{i}") for i in range(20)))
            assert [r for r in results if r[0] != 200] == []
            assert {b for _, b, _ in results} == {env.backends[1].name}
            slowest = max(t for _, _, t in results)
            assert slowest < HEDGE_AFTER + 0.8, f"slowest request took {slowest:.2f}s"
            # A legitimately slow answer is not cut short by the hedge: the first attempt
            # keeps going, and the answer that comes first is the one relayed.
            os.kill(victim.proc.pid, signal.SIGCONT)
            frozen.clear()
            status, backend, took = await get(s, env, "/slow?delay=2.6")
            assert status == 200 and took >= 2.6, (status, backend, took)
        metrics = urllib.request.urlopen(f"http://{env.proxy.admin}/metrics", timeout=5).read().decode()
        assert any(line.startswith("meshlet_proxy_retries_total") and env.name in line
                   for line in metrics.splitlines())
    finally:
        env.close()


async def test_backend_killed_with_requests_in_flight_and_pooled(mesh_catalog, tmp_path, px):
    """SIGKILL one of three backends while slow GETs wait on it and more connections to it
    sit in the pool: the in-flight ones are retried elsewhere (reset before any response
    byte), the pooled ones are never used again; no client sees an error."""
    env = px.Env(mesh_catalog, tmp_path, px.unique("killed"), 3, PORT + f"routes: {{{NO_EJECTION}}}")
    try:
        victim = env.backends[0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await warm(s, env)
            pooled = established(victim.port)
            assert pooled > 0
            # Slow only on the victim: requests that land there are still waiting when it dies.
            c0 = served(victim)
            slow = [asyncio.create_task(get(s, env, f"/slow?delay=5&only={victim.name}&n={i}")) for i in range(12)]
            calls = [1]

            def waiting() -> bool:
                calls[0] += 1
                return served(victim) - c0 - calls[0] >= 1

            await px.async_wait_for(waiting, timeout=5, what="slow requests waiting on the victim")
            victim.kill()
            results = await asyncio.gather(*slow)
            results += await asyncio.gather(*(get(s, env, f"/after/{i}") for i in range(40)))
        assert [r for r in results if r[0] != 200] == [], [r for r in results if r[0] != 200][:5]
        assert victim.name not in {b for _, b, _ in results}
        assert max(t for _, _, t in results) < 3.0  # retried at the reset, not after the 5 s delay
    finally:
        env.close()


def served(backend) -> int:
    """Requests the backend has received so far (its /count, this one included)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{backend.port}/count", timeout=5) as r:
        return json.load(r)["count"]


async def test_endpoint_leaving_the_catalog_finishes_in_flight_and_gets_nothing_new(mesh_catalog, tmp_path, px):
    """Deregister one of two instances (a rollout retiring it) while a slow request is in
    flight on it: that request completes from it (and /routes lists the instance as
    draining until then); once the proxy's table no longer lists it, no request reaches
    it, and its idle pooled connections are closed."""
    env = px.Env(mesh_catalog, tmp_path, px.unique("leave"), 2, PORT + f"routes: {{{NO_EJECTION}}}")
    try:
        victim = env.backends[0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await warm(s, env)
            assert established(victim.port) >= 1
            # Slow only on the victim: those that land there are in flight when it leaves.
            c0 = served(victim)
            slow = [asyncio.create_task(get(s, env, f"/slow?delay=1.5&only={victim.name}&n={i}")) for i in range(6)]
            calls = [1]

            def waiting() -> bool:
                calls[0] += 1
                return served(victim) - c0 - calls[0] >= 1

            await px.async_wait_for(waiting, timeout=5, what="a slow request in flight on the instance")
            mesh_catalog.deregister(f"{env.name}-0")
            left_at = time.monotonic()
            await px.async_wait_for(lambda: victim.port not in routes_endpoints(env.proxy, env.name), timeout=5,
                                    what="the instance out of the proxy's table")
            # A rollout can see that requests are still in flight on the retired instance.
            assert draining_ports(env.proxy).get(victim.port, 0) >= 1
            seen_after = await asyncio.gather(*(get(s, env, f"/new/{i}") for i in range(40)))
            finished = await asyncio.gather(*slow)
            assert victim.port not in draining_ports(env.proxy)
            assert all(status == 200 for status, _, _ in finished), finished
            on_victim = [took for _, backend, took in finished if backend == victim.name]
            assert on_victim and min(on_victim) >= 1.5, finished  # answered by it, not retried elsewhere
            assert {b for _, b, _ in seen_after} == {env.backends[1].name}
            # Idle pooled connections to it are closed (the busy one after its response).
            await px.async_wait_for(lambda: established(victim.port) == 0, timeout=5,
                                    what="the proxy's connections to the retired instance closed")
            print(f"instance left the table {time.monotonic() - left_at:.3f}s after deregistration")
    finally:
        env.close()


async def test_connect_failures_try_every_instance(mesh_catalog, tmp_path, px):
    """Two of three instances refuse connections and only one retry is configured: connect
    failures have their own allowance (attempts + one per instance), so every request
    still reaches the live one."""
    import socket

    name = px.unique("refuse")
    live = px.Backend(f"{name}-live")
    closed = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed.append(sock.getsockname()[1])
        sock.close()
    for i, port in enumerate([*closed, live.port]):
        mesh_catalog.register(name, f"{name}-{i}", port)
    mesh_catalog.put_service(name, PORT + f"routes: {{retries: {{attempts: 1}}, {NO_EJECTION}}}")
    proxy = px.Proxy(mesh_catalog.url, log_path=tmp_path / "proxy.log")
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(30):
                async with s.get(proxy.url(f"/c/{i}"), headers={"Host": f"{name}.service.meshlet"}) as r:
                    assert r.status == 200, await r.text()
    finally:
        proxy.stop()
        for i in range(3):
            mesh_catalog.deregister(f"{name}-{i}")
        mesh_catalog.delete_service(name)
        live.stop()


async def test_request_timeout_zero_means_none(mesh_catalog, tmp_path, px):
    """``timeouts.request: 0`` is documented as no overall time-out (config/README.md)."""
    env = px.Env(mesh_catalog, tmp_path, px.unique("notimeout"), 1, PORT + "routes: {timeouts: {request: 0s}}")
    try:
        async with aiohttp.ClientSession() as s:
            status, backend, took = await get(s, env, "/slow?delay=0.3")
            assert (status, backend) == (200, env.backends[0].name)
    finally:
        env.close()


def _dies_mid_body(conn, head: bytes, rest: bytes) -> bytes:
    """Answer a head and half the body, then vanish (a kill between a server's writes)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    conn.close()
    return b""


async def test_upstream_dying_between_head_and_body_is_retried_not_truncated(mesh_catalog, tmp_path, px):
    """A small response is relayed only once complete: an upstream that dies after its
    head leaves nothing at the client, so a GET is retried elsewhere and a POST (already
    processed) gets a 502 naming the loss; no client sees a truncated 200."""
    name = px.unique("midbody")
    dying = px.RawUpstream({b"/": _dies_mid_body})
    live = px.Backend(f"{name}-live")
    mesh_catalog.register(name, f"{name}-0", dying.port)
    mesh_catalog.register(name, f"{name}-1", live.port)
    mesh_catalog.put_service(name, PORT + f"routes: {{{NO_EJECTION}}}")
    proxy = px.Proxy(mesh_catalog.url, log_path=tmp_path / "proxy.log")
    host = {"Host": f"{name}.service.meshlet"}
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.get(proxy.url("/"), headers=host) as r:
                    assert r.status == 200 and r.headers["X-Backend"] == live.name
                    await r.read()  # a truncated body would raise ClientPayloadError here
            posts = []
            for _ in range(20):
                async with s.post(proxy.url("/"), data=b"x", headers=host) as r:
                    posts.append((r.status, (await r.read()).decode()))
        assert {st for st, _ in posts} <= {200, 502}
        assert all("lost before the whole response" in text for st, text in posts if st == 502), posts
        assert dying.accepted > 0
    finally:
        proxy.stop()
        for i in range(2):
            mesh_catalog.deregister(f"{name}-{i}")
        mesh_catalog.delete_service(name)
        dying.close()
        live.stop()
