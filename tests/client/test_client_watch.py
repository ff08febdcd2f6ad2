"""watch_* against a real catalog process: changes, index reset, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import consul
import pytest
from _util import async_wait_for

from discovery.consul import _Outage, connect, kv_cas, kv_delete, kv_get, kv_put, watch_kv_prefix, \
    watch_nodes, watch_service, watch_services
from discovery.view import CRITICAL, PASSING

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


class Collector:
    """Runs a watch in a task and keeps every snapshot it yields."""

    def __init__(self, it: AsyncIterator[Any]) -> None:
        self.items: list[Any] = []
        self._task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[Any]) -> None:
        async for item in it:
            self.items.append(item)

    @property
    def last(self) -> Any:
        return self.items[-1] if self.items else None

    async def until(self, predicate, timeout: float = 5.0, what: str | None = None) -> Any:
        await async_wait_for(lambda: bool(self.items) and predicate(self.items[-1]), timeout, what=what)
        return self.items[-1]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def client(catalog):
    c = connect(catalog.access)
    yield c
    await c.close()


async def register(c: consul.aio.Consul, sid: str, name: str = "web", port: int = 8080, **kw: Any) -> None:
    assert await c.agent.service.register(name, service_id=sid, address="127.0.0.1", port=port,
                                          check=consul.Check.ttl("60s"), **kw)


async def test_watch_service_follows_register_checks_and_deregister(client) -> None:
    watch = Collector(watch_service(client, "web", wait="5s"))
    try:
        await watch.until(lambda s: s == (), what="empty first snapshot")
        await register(client, "web-1", meta={"weight": "3", "port_http": "8080"})
        (inst,) = await watch.until(lambda s: len(s) == 1)
        assert (inst.id, inst.status, inst.weight, dict(inst.ports)) == ("web-1", CRITICAL, 3, {"http": 8080})
        await client.agent.check.ttl_pass("service:web-1")
        await watch.until(lambda s: s[0].status == PASSING, what="passing")
        await client.agent.check.ttl_fail("service:web-1")
        await watch.until(lambda s: s[0].status == CRITICAL, what="critical again")
        await client.agent.service.deregister("web-1")
        await watch.until(lambda s: s == (), what="deregistered")
        # Only changes are yielded: every consecutive pair differs.
        assert all(a != b for a, b in zip(watch.items, watch.items[1:]))
    finally:
        await watch.close()


async def test_watch_services_kv_and_nodes(client) -> None:
    services = Collector(watch_services(client, wait="5s"))
    kv = Collector(watch_kv_prefix(client, "app/", wait="5s"))
    nodes = Collector(watch_nodes(client, wait="5s"))
    try:
        await register(client, "api-1", name="api", tags=["v2"])
        await services.until(lambda s: s.get("api") == ("v2",))
        await kv_put(client, "app/a", b"1")
        await kv_put(client, "other/b", b"x")
        await kv.until(lambda d: d == {"app/a": b"1"})
        assert await kv_cas(client, "app/a", b"2", 0) is False  # exists: create-only CAS fails
        index, value = await kv_get(client, "app/a")
        assert value == b"1" and index > 0
        assert await kv_cas(client, "app/a", b"2", index) is True
        await kv.until(lambda d: d == {"app/a": b"2"})
        assert await kv_delete(client, "app/a")
        await kv.until(lambda d: d == {})
        assert await kv_get(client, "app/a") == (0, None)
        node = await nodes.until(lambda n: len(n) >= 1)
        assert all(n.address for n in node.values())
    finally:
        for w in (services, kv, nodes):
            await w.close()


async def test_index_going_backwards_resets_the_watch(catalog, tmp_path) -> None:
    """A catalog restarted on a fresh data dir at the same address has a lower index. The
    watch must start over at index 0 rather than wait for the old, higher index."""
    c = connect(catalog.access)
    # A short wait: the first query against the new catalog blocks on the old index until it.
    watch = Collector(watch_service(c, "web", wait="3s"))
    try:
        for i in range(15):  # push the index well up
            await register(c, "web-1", tags=[f"t{i}"])
        await watch.until(lambda s: len(s) == 1 and s[0].tags == ("t14",))
        catalog.data_dir = tmp_path / "fresh"
        await asyncio.to_thread(catalog.restart)
        assert catalog.url == c.http.base_uri, "the catalog came back on another port"
        await register(c, "web-2")
        await watch.until(lambda s: [i.id for i in s] == ["web-2"], timeout=10, what="the fresh catalog's state")
        # Now the watch must block on the new, low index: a change shows at once, not at the
        # next wait timeout (3 s) as it would while still blocking on the old index.
        await register(c, "web-3")
        await watch.until(lambda s: len(s) == 2, timeout=2.0, what="a prompt change after the reset")
    finally:
        await watch.close()
        await c.close()


async def test_outage_keeps_last_known_good_and_recovers(catalog, caplog) -> None:
    c = connect(catalog.access)
    outage = _Outage("test watch")
    watch = Collector(watch_service(c, "web", wait="30s", _outage=outage))
    caplog.set_level(logging.WARNING, logger="discovery.consul")
    try:
        await register(c, "web-1")
        await watch.until(lambda s: len(s) == 1)
        seen = len(watch.items)
        await asyncio.to_thread(catalog.kill)
        await async_wait_for(lambda: outage.failing, 5, what="the watch noticing the outage")
        # It keeps retrying (several attempts) without yielding anything, and logs once.
        await async_wait_for(lambda: outage.errors >= 4, 5, what="several retries")
        assert len(watch.items) == seen
        await asyncio.to_thread(catalog.restart)
        await register(c, "web-2")  # needs the catalog back on the same address
        await watch.until(lambda s: len(s) == 2, timeout=15, what="recovery after restart")
        assert all(len(s) > 0 for s in watch.items), "an empty snapshot was yielded during the outage"
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await watch.close()
        await c.close()
