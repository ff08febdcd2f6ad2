"""Blocking health/catalog queries: targeted wake-ups, index rules, 1,000 watchers."""

from __future__ import annotations

import asyncio

import consul
import consul.aio
import pytest

from _util import async_wait_for
from catalog_helpers import blocked, encoded, wakeups

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

Check = consul.Check


async def _blocked(catalog, n: int) -> bool:
    return await asyncio.to_thread(blocked, catalog) >= n


@pytest.fixture
async def aio(catalog):
    c = catalog.aio(connections_limit=1200)
    yield c
    await c.close()


async def test_check_change_wakes_service_watcher_not_others(catalog, aio) -> None:
    c = aio
    await c.agent.service.register("web", service_id="web-1", check=Check.ttl("30s"))
    await c.agent.service.register("db", service_id="db-1", check=Check.ttl("30s"))
    await c.agent.check.ttl_pass("service:web-1")
    index, nodes = await c.health.service("web")
    assert nodes[0]["Checks"][1]["Status"] == "passing"
    task = asyncio.ensure_future(c.health.service("web", index=index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    before = await asyncio.to_thread(wakeups, catalog)
    # unrelated: another service's check, a new service, a KV write
    await c.agent.check.ttl_fail("service:db-1")
    await c.agent.service.register("other", check=Check.ttl("30s"))
    await c.kv.put("k", "v")
    assert await asyncio.to_thread(wakeups, catalog) == before
    assert not task.done()
    # repeating web's current status is not a change either
    await c.agent.check.ttl_pass("service:web-1")
    assert await asyncio.to_thread(wakeups, catalog) == before
    await c.agent.check.ttl_fail("service:web-1", notes="down")
    new_index, nodes = await asyncio.wait_for(task, 10)
    assert int(new_index) > int(index)
    assert nodes[0]["Checks"][1]["Status"] == "critical"


async def test_absent_service_watcher_wakes_on_registration(catalog, aio) -> None:
    c = aio
    await c.agent.service.register("placeholder")
    index, nodes = await c.health.service("late")
    assert nodes == []
    task = asyncio.ensure_future(c.health.service("late", index=index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    await c.agent.service.register("late", port=1234)
    new_index, nodes = await asyncio.wait_for(task, 10)
    assert [n["Service"]["Port"] for n in nodes] == [1234]
    assert int(new_index) > int(index)
    # and deregistration ("extinction") moves the index forward too
    task = asyncio.ensure_future(c.health.service("late", index=new_index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    await c.agent.service.deregister("late")
    last_index, nodes = await asyncio.wait_for(task, 10)
    assert nodes == [] and int(last_index) > int(new_index)


async def test_passing_filter_applies_after_blocking(catalog, aio) -> None:
    c = aio
    await c.agent.service.register("web", check=Check.ttl("30s"))
    index, nodes = await c.health.service("web", passing=True)
    assert nodes == []
    task = asyncio.ensure_future(c.health.service("web", passing=True, index=index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    await c.agent.check.ttl_pass("service:web")
    _, nodes = await asyncio.wait_for(task, 10)
    assert [n["Service"]["ID"] for n in nodes] == ["web"]


async def test_catalog_services_wakes_only_on_list_change(catalog, aio) -> None:
    c = aio
    await c.agent.service.register("web", service_id="web-1", tags=["v1"])
    index, services = await c.catalog.services()
    task = asyncio.ensure_future(c.catalog.services(index=index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    before = await asyncio.to_thread(wakeups, catalog)
    await c.agent.service.register("web", service_id="web-2", tags=["v1"], port=2)  # same name, same tags
    assert await asyncio.to_thread(wakeups, catalog) == before
    await c.agent.service.register("web", service_id="web-3", tags=["v2"])
    _, services = await asyncio.wait_for(task, 10)
    assert services["web"] == ["v1", "v2"]


async def test_catalog_nodes_and_node_blocking(catalog, aio) -> None:
    c = aio
    index, nodes = await c.catalog.nodes()
    assert len(nodes) == 1
    task = asyncio.ensure_future(c.catalog.nodes(index=index, wait="30s"))
    await async_wait_for(lambda: _blocked(catalog, 1), what="blocked")
    await c.catalog.register("n1", "10.1.10.11")
    _, nodes = await asyncio.wait_for(task, 10)
    assert sorted(n["Node"] for n in nodes) == ["meshlet", "n1"]


def test_health_blocking_times_out_with_same_index(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web")
    index, nodes = c.health.service("web")
    again, nodes2 = c.health.service("web", index=index, wait="100ms")
    assert again == index and nodes2 == nodes


async def test_thousand_watchers_all_woken_by_one_check_change(catalog, aio) -> None:
    c = aio
    await c.agent.service.register("hot", check=Check.ttl("60s"))
    await c.agent.check.ttl_pass("service:hot")
    index, _ = await c.health.service("hot")
    tasks = [asyncio.ensure_future(c.health.service("hot", index=index, wait="60s")) for _ in range(1000)]
    await async_wait_for(lambda: _blocked(catalog, 1000), timeout=30, interval=0.1, what="1000 watchers")
    before = await asyncio.to_thread(encoded, catalog)
    await c.agent.check.ttl_fail("service:hot")
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert len(results) == 1000
    # one answer, evaluated and encoded once, was sent to all of them (the watchers' next
    # queries and the metrics reads may add a few more, never one per watcher)
    assert await asyncio.to_thread(encoded, catalog) - before < 20
    assert {r[1][0]["Checks"][1]["Status"] for r in results} == {"critical"}
    assert len({r[0] for r in results}) == 1 and int(results[0][0]) > int(index)
