"""Failures of single instances are hidden from clients: retries to another instance,
outlier ejection and recovery, and readiness changes in the catalog applied at once."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import aiohttp
import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

FAST_OUTLIER = """command: [x]
ports: [{name: http, port: 0, protocol: http}]
routes:
  outlier: {consecutive_5xx: 3, base_ejection_time: 2s, max_ejection_percent: 50, interval: 1s}
"""


@pytest.fixture
def trio(mesh_catalog, tmp_path, px):
    env = px.Env(mesh_catalog, tmp_path, px.unique("trio"), 3, None)
    yield env
    env.close()


async def test_instance_killed_under_load_no_client_visible_errors(trio, px):
    """kill -9 of one of three backend processes while 16 clients send GETs and POSTs."""
    errors: list[str] = []
    served: dict[str, int] = {}
    stop = asyncio.Event()

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if i % 2:
                    req = s.post(trio.url(f"/w{i}/{n}"), data=b"p" * 1000, headers={"Host": trio.host})
                else:
                    req = s.get(trio.url(f"/w{i}/{n}"), headers={"Host": trio.host})
                async with req as r:
                    info = await r.json() if r.status == 200 else None
                    if r.status != 200:
                        errors.append(f"{r.status} {await r.text()}")
                    else:
                        served[info["backend"]] = served.get(info["backend"], 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(repr(exc))

    victim = trio.backends[0]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(client(i, s)) for i in range(16)]
        try:
            # every backend busy (the victim too) before the kill, then plenty after it
            await px.async_wait_for(lambda: all(served.get(b.name, 0) >= 20 for b in trio.backends),
                                    timeout=10, what="traffic on every backend")
            before = dict(served)
            victim.kill()
            await px.async_wait_for(lambda: sum(served.values()) > sum(before.values()) + 200, timeout=10,
                                    what="traffic going on after the kill")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert errors == [], errors[:5]
    assert before.get(victim.name, 0) > 0, "the victim served traffic before it was killed"
    # what hid the kill: requests to the dead backend were retried on another one
    metrics = urllib.request.urlopen(f"http://{trio.proxy.admin}/metrics", timeout=5).read().decode()
    retries = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith(f'meshlet_proxy_retries_total{{service="{trio.name}"}}'))
    assert retries >= 1, [line for line in metrics.splitlines() if "retries" in line]


async def test_readiness_change_in_catalog_stops_traffic_to_instance(mesh_catalog, tmp_path, px):
    env = px.Env(mesh_catalog, tmp_path, px.unique("ready"), 2, None)
    try:
        victim_id = f"{env.name}-0"
        victim = env.backends[0].name
        async with aiohttp.ClientSession() as s:
            async def who() -> tuple[float, str]:
                sent = time.monotonic()
                async with s.get(env.url("/r"), headers={"Host": env.host}) as r:
                    return sent, (await r.json())["backend"]

            seen = {(await who())[1] for _ in range(30)}
            assert victim in seen
            changed_at = time.monotonic()
            mesh_catalog.set_status(victim_id, "critical")
            # From some request on, none reaches the victim: find it (30 in a row without it).
            history: list[tuple[float, str]] = []

            async def settled() -> bool:
                history.append(await who())
                tail = history[-30:]
                return len(tail) == 30 and all(b != victim for _, b in tail)

            await px.async_wait_for(settled, timeout=10, interval=0, what="no request reaching the instance")
            last_hit = max((t for t, b in history if b == victim), default=changed_at)
            first_clean = min(t for t, b in history if t > last_hit)
            print(f"readiness change applied after at most {(first_clean - changed_at) * 1000:.1f} ms "
                  f"({len(history)} requests watched)")
            mesh_catalog.set_status(victim_id, "passing")
            await px.async_wait_for(lambda: who_is(victim, who), timeout=10, what="the instance back in rotation")
    finally:
        env.close()


async def who_is(name, who) -> bool:
    for _ in range(20):
        if (await who())[1] == name:
            return True
    return False


NO_OUTLIER = """command: [x]
ports: [{name: http, port: 0, protocol: http}]
routes:
  outlier: {consecutive_5xx: 0, consecutive_gateway_failure: 0}
"""


async def test_gateway_error_from_one_instance_is_retried_for_idempotent_requests(mesh_catalog, tmp_path, px):
    env = px.Env(mesh_catalog, tmp_path, px.unique("gw"), 3, NO_OUTLIER)
    try:
        victim = env.backends[0].name
        async with aiohttp.ClientSession() as s:
            for i in range(20):
                async with s.get(env.url(f"/status/503?only={victim}"), headers={"Host": env.host}) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["X-Backend"] != victim
            # Not for POST: a 503 may come after the request was processed.
            codes = []
            for i in range(30):
                async with s.post(env.url(f"/status/503?only={victim}"), data=b"x",
                                  headers={"Host": env.host}) as r:
                    codes.append(r.status)
        assert set(codes) == {200, 503}
    finally:
        env.close()


async def test_consecutive_5xx_eject_the_instance_and_it_returns(mesh_catalog, tmp_path, px):
    env = px.Env(mesh_catalog, tmp_path, px.unique("eject"), 2, FAST_OUTLIER)
    try:
        bad = env.backends[0].name
        async with aiohttp.ClientSession() as s:
            async def call() -> str:
                async with s.get(env.url(f"/status/500?only={bad}"), headers={"Host": env.host}) as r:
                    return r.headers["X-Backend"]
            got = [await call() for _ in range(40)]
            # Exactly consecutive_5xx (3) answers of the bad instance, then it is ejected.
            assert got.count(bad) == 3, got
            assert got[-20:].count(bad) == 0
            ejected_at = time.monotonic()

            async def back() -> bool:
                return await call() == bad
            await px.async_wait_for(back, timeout=10, interval=0.02, what="the ejected instance to return")
            print(f"ejected instance returned after {time.monotonic() - ejected_at:.2f}s (base 2s)")
    finally:
        env.close()
