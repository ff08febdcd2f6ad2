"""Mirror (the data plane's View) and LeaderLock against a real catalog process."""

from __future__ import annotations

import asyncio
import json

import consul
import pytest
from _util import async_wait_for, refusing_port

import config
from discovery.consul import LeaderLock, Mirror, MirrorError, connect
from discovery.view import CRITICAL, PASSING, View

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

WEB = config.loads("services: {web: {command: [x], replicas: 2, ports: [{name: http}]}}", base_dir="/").services["web"]
DB = config.loads("services: {db: {command: [x], ports: [{name: pg, port: 5432, protocol: tcp}]}}",
                  base_dir="/").services["db"]


def document(spec: config.ServiceSpec, vip: str | None) -> bytes:
    return json.dumps(config.service_document(spec, vip)).encode()


@pytest.fixture
async def client(catalog):
    c = connect(catalog.access)
    yield c
    await c.close()


async def register(c: consul.aio.Consul, sid: str, name: str = "web", port: int = 8080) -> None:
    assert await c.agent.service.register(name, service_id=sid, address="127.0.0.1", port=port,
                                          check=consul.Check.ttl("60s"))


async def test_mirror_first_view_and_changes(catalog, client) -> None:
    await register(client, "web-1")
    await client.agent.check.ttl_pass("service:web-1")
    await client.kv.put("meshlet/services/web", document(WEB, "127.10.0.1"))
    await client.kv.put("meshlet/services/db", document(DB, "127.10.0.2"))  # a doc, no instances
    views: list[View] = []
    mirror = Mirror(catalog.access, wait="10s", on_change=views.append)
    try:
        first = await mirror.start(timeout=10)
        assert mirror.view is first and views[-1] is first
        web = first.services["web"]
        assert [(i.id, i.status) for i in web.instances] == [("web-1", PASSING)]
        assert (web.vip, web.revision, web.spec.replicas) == ("127.10.0.1", config.service_revision(WEB), 2)
        db = first.services["db"]
        assert (db.instances, db.vip, db.spec.ports[0].port) == ((), "127.10.0.2", 5432)
        assert first.nodes, "the node list is part of the first view"

        changes = mirror.changes()
        # A check failing shows as a new View with the instance critical.
        await client.agent.check.ttl_fail("service:web-1")
        await async_wait_for(lambda: mirror.view.services["web"].instances[0].status == CRITICAL, 5)
        assert views[-1] is mirror.view and views[-1].index > first.index
        got = await asyncio.wait_for(changes.__anext__(), 5)
        assert got.index > first.index

        # A new service appears; its instances come with it.
        await register(client, "api-1", name="api", port=9000)
        await async_wait_for(lambda: "api" in mirror.view.services, 5)
        assert mirror.view.services["api"].instances[0].port == 9000
        assert mirror.view.services["api"].spec is None  # registered by another tool: no document

        # An invalid document is logged and the last good one stays.
        await client.kv.put("meshlet/services/web", b"{not json")
        await client.kv.put("meshlet/services/api", document(config.loads(
            "services: {api: {command: [y]}}", base_dir="/").services["api"], None))
        await async_wait_for(lambda: mirror.view.services["api"].revision is not None, 5)
        assert mirror.view.services["web"].vip == "127.10.0.1"

        # The document goes and the instances go: the service leaves the View.
        await client.kv.delete("meshlet/services/api")
        await client.agent.service.deregister("api-1")
        await async_wait_for(lambda: "api" not in mirror.view.services, 5)
        assert [v.index for v in views] == sorted({v.index for v in views}), "indexes strictly increase"
    finally:
        await mirror.close()
    assert await asyncio.wait_for(anext(changes, None), 5) is None  # ends after close


async def test_mirror_changes_iterator_ends_on_close(catalog) -> None:
    mirror = Mirror(catalog.access, wait="10s")
    await mirror.start()
    changes = mirror.changes()
    waiter = asyncio.create_task(anext(changes, None))
    await mirror.close()
    assert await asyncio.wait_for(waiter, 5) is None


async def test_mirror_keeps_the_last_view_through_an_outage(catalog, client) -> None:
    await register(client, "web-1")
    mirror = Mirror(catalog.access, wait="10s")
    try:
        first = await mirror.start()
        await asyncio.to_thread(catalog.kill)
        await async_wait_for(lambda: mirror._outage.errors >= 3, 5, what="the mirror retrying")
        assert mirror.view is first
        await asyncio.to_thread(catalog.restart)
        c2 = connect(catalog.access)
        try:
            await register(c2, "web-2")
            await async_wait_for(lambda: len(mirror.view.services["web"].instances) == 2, 15)
        finally:
            await c2.close()
    finally:
        await mirror.close()


async def test_mirror_start_fails_clearly_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{refusing_port()}"
    mirror = Mirror(url)
    with pytest.raises(MirrorError, match=f"catalog at {url} did not answer within 0.5s"):
        await mirror.start(timeout=0.5)


async def test_leader_lock_two_contenders_hand_over(catalog) -> None:
    c1, c2, c3 = connect(catalog.access), connect(catalog.access), connect(catalog.access)
    one = LeaderLock(c1, "meshlet/leader", ttl="10s", name="one", value=b"one")
    two = LeaderLock(c2, "meshlet/leader", ttl="10s", name="two", value=b"two")
    try:
        await asyncio.wait_for(one.acquire(), 5)
        assert one.held
        contender = asyncio.create_task(two.acquire())
        await async_wait_for(lambda: two.session is not None, 5, what="the second session")
        _, entry = await c3.kv.get("meshlet/leader")
        assert entry["Session"] == one.session and entry["Value"] == b"one"
        assert not contender.done() and not two.held
        await one.release()
        assert not one.held
        await asyncio.wait_for(contender, 5)  # handed over without waiting for a lock-delay
        assert two.held
        _, entry = await c3.kv.get("meshlet/leader")
        assert entry["Session"] == two.session and entry["Value"] == b"two"

        # The session disappearing (destroyed by an operator, expired) loses leadership.
        assert await c3.session.destroy(two.session)
        await asyncio.wait_for(two.lost.wait(), 5)
        assert not two.held
    finally:
        await one.release()
        await two.release()
        for c in (c1, c2, c3):
            await c.close()


async def test_leader_lock_renews_and_is_lost_when_renewal_fails(catalog_factory) -> None:
    cat = catalog_factory("--session-ttl-min", "1s")
    c = connect(cat.access)
    lock = LeaderLock(c, "meshlet/leader", ttl="1s", lock_delay="0s")
    try:
        await asyncio.wait_for(lock.acquire(), 5)
        # Unrenewed, the session would expire after TTL x 2 = 2 s; renewed every 0.5 s it lives on.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(lock.lost.wait()), 3.0)
        _, entry = await c.kv.get("meshlet/leader")
        assert lock.held and entry["Session"] == lock.session
        # Catalog gone: renewals fail, and after the TTL leadership is given up.
        await asyncio.to_thread(cat.kill)
        await asyncio.wait_for(lock.lost.wait(), 5)
        assert not lock.held
    finally:
        await lock.release()
        await c.close()


async def test_leader_lock_rejected_session_raises(catalog) -> None:
    c = connect(catalog.access)
    lock = LeaderLock(c, "meshlet/leader", ttl="1s")  # below the catalog's 10 s minimum
    try:
        with pytest.raises(consul.ConsulException, match="Invalid Session TTL"):
            await asyncio.wait_for(lock.acquire(), 5)
    finally:
        await lock.release()
        await c.close()
