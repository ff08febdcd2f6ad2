"""Sessions: lifecycle, validation, locks, TTL expiry, lock-delay, check-bound sessions."""

from __future__ import annotations

import asyncio

import consul
import consul.aio
import pytest
import requests

from _util import async_wait_for, wait_for
from catalog_helpers import shared_catalog  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

Check = consul.Check


def create(catalog, body: dict) -> requests.Response:
    return catalog.http.put(catalog.url + "/v1/session/create", json=body, timeout=5)


def test_session_lifecycle(catalog) -> None:
    c = catalog.client()
    with pytest.raises(consul.ConsulException):
        c.session.create(node="n2")
    with pytest.raises(consul.ConsulException):
        c.session.create(dc="dc2")
    session_id = c.session.create("my-session")
    assert [x["Name"] for x in c.session.list()[1]] == ["my-session"]
    assert c.session.info("1" * 36)[1] is None
    _, session = c.session.info(session_id)
    assert session["Name"] == "my-session"
    assert session["Behavior"] == "release" and session["LockDelay"] == 15_000_000_000
    assert session["NodeChecks"] == ["serfHealth"] and session["TTL"] == ""
    assert [x["Name"] for x in c.session.node(session["Node"])[1]] == ["my-session"]
    assert c.session.destroy(session_id) is True
    assert c.session.list()[1] == []
    assert c.session.destroy(session_id) is True  # idempotent


def test_renew_and_delete_behavior(catalog) -> None:
    c = catalog.client()
    s = c.session.create(behavior="delete", ttl=20)
    with pytest.raises(consul.NotFound):
        c.session.renew("1" * 36)
    session = c.session.renew(s)
    assert session["Behavior"] == "delete" and session["TTL"] == "20s"
    assert c.kv.put("foo", "1", acquire=s) is True
    assert c.kv.get("foo")[1]["Value"] == b"1"
    c.session.destroy(s)
    assert c.kv.get("foo")[1] is None


@pytest.mark.parametrize(
    "body, status, text",
    [
        pytest.param({"Behavior": "explode"}, 500, "Invalid Behavior setting 'explode'", id="behavior"),
        pytest.param({"TTL": "5s"}, 500, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]", id="ttl-too-short"),
        pytest.param({"TTL": "25h"}, 500, "Invalid Session TTL '90000000000000', must be between [10s=24h0m0s]", id="ttl-too-long"),
        pytest.param({"TTL": "soon"}, 500, 'Session TTL \'soon\' invalid: time: invalid duration "soon"', id="ttl-garbage"),
        pytest.param({"Node": "elsewhere"}, 500, "Missing node registration", id="unknown-node"),
        pytest.param({"NodeChecks": ["nope"]}, 500, "Missing check 'nope' registration", id="unknown-check"),
        pytest.param({"Nmae": "typo"}, 400, 'Request decode failed: json: unknown field "Nmae"', id="unknown-field"),
    ],
)
def test_create_rejects(shared_catalog, body: dict, status: int, text: str) -> None:
    r = create(shared_catalog, body)
    assert (r.status_code, r.text) == (status, text)
    assert shared_catalog.client().session.list()[1] == []


def test_create_accepts_lowercase_and_number_lock_delay(catalog) -> None:
    r = create(catalog, {"name": "n", "lockdelay": 5, "behavior": "delete", "ttl": "30s"})
    assert r.status_code == 200, r.text
    session = catalog.client().session.info(r.json()["ID"])[1]
    assert (session["Name"], session["LockDelay"], session["Behavior"], session["TTL"]) == (
        "n", 5_000_000_000, "delete", "30s")


def test_session_bound_to_a_critical_check_cannot_be_created(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", check=Check.ttl("60s"))
    r = create(catalog, {"ServiceChecks": [{"ID": "service:web"}]})
    assert (r.status_code, r.text) == (500, "Check 'service:web' is in critical state")


def test_session_invalidated_when_its_check_goes_critical(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", check=Check.ttl("60s"))
    c.agent.check.ttl_pass("service:web")
    sid = create(catalog, {"ServiceChecks": [{"ID": "service:web"}], "LockDelay": "0s"}).json()["ID"]
    assert c.kv.put("leader", "me", acquire=sid) is True
    c.agent.check.ttl_fail("service:web")
    assert c.session.info(sid)[1] is None
    _, entry = c.kv.get("leader")
    assert "Session" not in entry and entry["Value"] == b"me"


def test_lock_delay_after_invalidation(catalog) -> None:
    c = catalog.client()
    s1 = c.session.create(lock_delay=2)
    s2 = c.session.create(lock_delay=2)
    assert c.kv.put("lock", "a", acquire=s1) is True
    c.session.destroy(s1)
    assert "Session" not in c.kv.get("lock")[1]
    assert c.kv.put("lock", "b", acquire=s2) is False  # in lock-delay
    wait_for(lambda: c.kv.put("lock", "b", acquire=s2), timeout=10, interval=0.05, what="acquire after lock-delay")
    assert c.kv.get("lock")[1]["Session"] == s2


def test_ttl_expiry_releases_lock(catalog_factory) -> None:
    catalog = catalog_factory("--session-ttl-min", "500ms")
    c = catalog.client()
    sid = create(catalog, {"TTL": "1s", "LockDelay": "0s"}).json()["ID"]
    keep = create(catalog, {"TTL": "1s", "Behavior": "delete"}).json()["ID"]
    assert c.kv.put("lock", "held", acquire=sid) is True
    assert c.kv.put("ephemeral", "x", acquire=keep) is True
    renewals = 0

    def expired() -> bool:
        nonlocal renewals
        c.session.renew(keep)  # renewing keeps this one alive
        renewals += 1
        return c.session.info(sid)[1] is None

    wait_for(expired, timeout=10, interval=0.2, what="session expired")
    assert "Session" not in c.kv.get("lock")[1]
    assert c.session.info(keep)[1] is not None
    assert c.kv.get("ephemeral")[1]["Session"] == keep
    c.session.destroy(keep)
    assert c.kv.get("ephemeral")[1] is None


def test_sessions_and_locks_survive_restart(catalog) -> None:
    c = catalog.client()
    sid = c.session.create("durable", ttl=60)
    assert c.kv.put("lock", "v", acquire=sid) is True
    catalog.kill()
    catalog.restart()
    c = catalog.client()
    assert c.session.info(sid)[1]["Name"] == "durable"
    assert c.kv.get("lock")[1]["Session"] == sid
    assert c.kv.put("lock", "w", acquire=c.session.create()) is False


async def test_session_list_blocks(catalog) -> None:
    c = catalog.aio()
    try:
        index, sessions = await c.session.list()
        assert sessions == []
        task = asyncio.ensure_future(c.session.list(index=index, wait="30s"))
        await async_wait_for(lambda: asyncio.to_thread(lambda: _blocked(catalog)), what="blocked")
        sid = await c.session.create()
        index, sessions = await asyncio.wait_for(task, 10)
        assert [s["ID"] for s in sessions] == [sid]
        task = asyncio.ensure_future(c.session.list(index=index, wait="30s"))
        await async_wait_for(lambda: asyncio.to_thread(lambda: _blocked(catalog)), what="blocked")
        assert await c.session.destroy(sid) is True
        _, sessions = await asyncio.wait_for(task, 10)
        assert sessions == []
    finally:
        await c.close()


def _blocked(catalog) -> bool:
    from catalog_helpers import blocked

    return blocked(catalog) >= 1
def test_acquire_release(catalog) -> None:
    c = catalog.client()
    with pytest.raises(consul.ConsulException):
        c.kv.put("foo", "bar", acquire="foo")
    s1 = c.session.create()
    s2 = c.session.create()
    assert c.kv.put("foo", "1", acquire=s1) is True
    _, data = c.kv.get("foo")
    assert data["Session"] == s1 and data["LockIndex"] == 1
    assert c.kv.put("foo", "2", acquire=s2) is False
    assert c.kv.put("foo", "1", acquire=s1) is True  # the holder re-acquires
    assert c.kv.get("foo")[1]["LockIndex"] == 1
    assert c.kv.put("foo", "1", release="foo") is False
    assert c.kv.put("foo", "2", release=s2) is False
    assert c.kv.put("foo", "2", release=s1) is True
    _, data = c.kv.get("foo")
    assert "Session" not in data and data["Value"] == b"2"
    assert c.kv.put("foo", "3", acquire=s2) is True  # released without lock-delay
    assert c.kv.get("foo")[1]["LockIndex"] == 2


