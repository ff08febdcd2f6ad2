"""Blocking KV queries: wake-ups on the right writes only, timeouts, index rules."""

from __future__ import annotations

import asyncio
import time

import pytest

from _util import async_wait_for
from catalog_helpers import blocked, wakeups

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def _check(catalog, n: int):
    async def run() -> bool:
        return await asyncio.to_thread(blocked, catalog) >= n

    return run()


async def test_get_wakes_on_write_to_its_key(catalog) -> None:
    c = catalog.aio()
    try:
        await c.kv.put("index", "bump")
        index, data = await c.kv.get("foo")
        assert data is None
        task = asyncio.ensure_future(c.kv.get("foo", index=index, wait="30s"))
        await async_wait_for(lambda: _check(catalog, 1), what="blocked")
        assert await c.kv.put("foo", "bar") is True
        new_index, data = await asyncio.wait_for(task, 10)
        assert data["Value"] == b"bar"
        assert int(new_index) > int(index)
    finally:
        await c.close()


@pytest.mark.parametrize(
    "watch, unrelated, related",
    [
        pytest.param({"key": "a/x"}, "a/y", "a/x", id="key-vs-sibling"),
        pytest.param({"key": "a/x"}, "a/x/child", "a/x", id="key-vs-child"),
        pytest.param({"key": "a/", "recurse": True}, "b/x", "a/deep/er", id="prefix-vs-other-prefix"),
        pytest.param({"key": "a/", "keys": True}, "ab", "a/", id="keys-vs-lookalike"),
    ],
)
async def test_unrelated_write_does_not_wake(catalog, watch: dict, unrelated: str, related: str) -> None:
    c = catalog.aio()
    try:
        await c.kv.put("a/seed", "0")
        key = watch.pop("key")
        index, _ = await c.kv.get(key, **watch)
        task = asyncio.ensure_future(c.kv.get(key, index=index, wait="30s", **watch))
        await async_wait_for(lambda: _check(catalog, 1), what="blocked")
        before = await asyncio.to_thread(wakeups, catalog)
        assert await c.kv.put(unrelated, "noise") is True  # acknowledged = committed and notified
        assert await asyncio.to_thread(wakeups, catalog) == before
        assert not task.done()
        assert await asyncio.to_thread(blocked, catalog) == 1
        assert await c.kv.put(related, "signal") is True
        new_index, _ = await asyncio.wait_for(task, 10)
        assert int(new_index) > int(index)
    finally:
        await c.close()


async def test_recurse_watch_sees_deletes(catalog) -> None:
    c = catalog.aio()
    try:
        await c.kv.put("svc/a", "1")
        await c.kv.put("svc/b", "2")
        await c.kv.put("other", "x")  # raises the KV table index above svc/'s entries
        index, data = await c.kv.get("svc/", recurse=True)
        assert [d["Key"] for d in data] == ["svc/a", "svc/b"]
        task = asyncio.ensure_future(c.kv.get("svc/", recurse=True, index=index, wait="30s"))
        await async_wait_for(lambda: _check(catalog, 1), what="blocked")
        assert await c.kv.delete("svc/b") is True
        new_index, data = await asyncio.wait_for(task, 10)
        assert [d["Key"] for d in data] == ["svc/a"]
        assert int(new_index) > int(index)  # a tombstone moves the index forward
    finally:
        await c.close()


def test_timeout_returns_current_data_and_same_index(catalog) -> None:
    c = catalog.client()
    c.kv.put("foo", "bar")
    index, _ = c.kv.get("foo")
    start = time.monotonic()
    check, data = c.kv.get("foo", index=index, wait="200ms")
    assert time.monotonic() - start >= 0.2
    assert check == index
    assert data["Value"] == b"bar"


def test_index_zero_or_past_returns_at_once(catalog) -> None:
    c = catalog.client()
    c.kv.put("foo", "bar")
    index, _ = c.kv.get("foo")
    r = catalog.http.get(catalog.url + "/v1/kv/foo", params={"index": "0", "wait": "30s"}, timeout=5)
    assert r.status_code == 200
    r = catalog.http.get(catalog.url + "/v1/kv/foo", params={"index": str(int(index) - 1), "wait": "30s"}, timeout=5)
    assert r.headers["X-Consul-Index"] == index


async def test_many_watchers_of_one_key_all_wake(catalog) -> None:
    c = catalog.aio(connections_limit=200)
    try:
        await c.kv.put("hot", "0")
        index, _ = await c.kv.get("hot")
        tasks = [asyncio.ensure_future(c.kv.get("hot", index=index, wait="30s")) for _ in range(150)]
        await async_wait_for(lambda: _check(catalog, 150), timeout=10, what="150 blocked")
        assert await c.kv.put("hot", "1") is True
        results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert {r[1]["Value"] for r in results} == {b"1"}
    finally:
        await c.close()


def test_abandoned_blocking_query_is_dropped(catalog) -> None:
    """A watcher whose client went away stops waiting (and holding its subscription)."""
    import requests as rq

    from _util import wait_for

    c = catalog.client()
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    with pytest.raises(rq.exceptions.ReadTimeout):
        catalog.http.get(catalog.url + "/v1/kv/k", params={"index": index, "wait": "120s"}, timeout=0.5)
    wait_for(lambda: blocked(catalog) == 0, timeout=10, what="abandoned query dropped")
