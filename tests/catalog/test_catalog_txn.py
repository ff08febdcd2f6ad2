"""PUT /v1/txn: atomic KV transactions."""

from __future__ import annotations

import base64

import pytest
import requests
from catalog_helpers import shared_catalog  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def txn(catalog, ops: list) -> requests.Response:
    return catalog.http.put(catalog.url + "/v1/txn", json=ops, timeout=5)


def test_set_then_get(catalog) -> None:
    c = catalog.client()
    r = c.txn.put([{"KV": {"Verb": "set", "Key": "asdf", "Value": b64("1")}}])
    assert r["Errors"] is None
    assert r["Results"][0]["KV"]["Key"] == "asdf" and r["Results"][0]["KV"]["Value"] is None
    r = c.txn.put([{"KV": {"Verb": "get", "Key": "asdf"}}])
    assert r["Results"][0]["KV"]["Value"] == b64("1")


async def test_aio(catalog) -> None:
    c = catalog.aio()
    try:
        r = await c.txn.put([{"KV": {"Verb": "set", "Key": "k", "Value": b64("v")}}])
        assert r["Errors"] is None
        assert (await c.kv.get("k"))[1]["Value"] == b"v"
    finally:
        await c.close()


def test_failed_op_rolls_back_everything(catalog) -> None:
    c = catalog.client()
    c.kv.put("a", "old")
    index, before = c.kv.get("a")
    r = txn(catalog, [
        {"KV": {"Verb": "set", "Key": "a", "Value": b64("new")}},
        {"KV": {"Verb": "set", "Key": "b", "Value": b64("new")}},
        {"KV": {"Verb": "cas", "Key": "a", "Value": b64("x"), "Index": 1}},
        {"KV": {"Verb": "get", "Key": "missing"}},
    ])
    assert r.status_code == 409
    body = r.json()
    assert body["Results"] is None
    assert body["Errors"] == [
        {"OpIndex": 2, "What": 'failed to set key "a", index is stale'},
        {"OpIndex": 3, "What": 'key "missing" doesn\'t exist'},
    ]
    assert c.kv.get("a") == (index, before)
    assert c.kv.get("b")[1] is None


def test_cas_check_index_lock_unlock_and_trees(catalog) -> None:
    c = catalog.client()
    sid = c.session.create(lock_delay=0)
    c.kv.put("cfg/a", "1")
    _, a = c.kv.get("cfg/a")
    r = txn(catalog, [
        {"KV": {"Verb": "check-index", "Key": "cfg/a", "Index": a["ModifyIndex"]}},
        {"KV": {"Verb": "cas", "Key": "cfg/a", "Value": b64("2"), "Index": a["ModifyIndex"]}},
        {"KV": {"Verb": "set", "Key": "cfg/b", "Value": b64("3"), "Flags": 9}},
        {"KV": {"Verb": "lock", "Key": "cfg/lock", "Value": b64("me"), "Session": sid}},
        {"KV": {"Verb": "check-session", "Key": "cfg/lock", "Session": sid}},
        {"KV": {"Verb": "check-not-exists", "Key": "cfg/none"}},
        {"KV": {"Verb": "get-tree", "Key": "cfg/"}},
    ])
    assert r.status_code == 200, r.text
    results = r.json()["Results"]
    tree = {x["KV"]["Key"]: x["KV"] for x in results[-3:]}
    assert set(tree) == {"cfg/a", "cfg/b", "cfg/lock"}
    assert base64.b64decode(tree["cfg/a"]["Value"]) == b"2" and tree["cfg/b"]["Flags"] == 9
    assert tree["cfg/lock"]["Session"] == sid
    # all of them happened at one index
    assert len({x["KV"]["ModifyIndex"] for x in results[1:4]}) == 1
    r = txn(catalog, [{"KV": {"Verb": "unlock", "Key": "cfg/lock", "Session": sid}},
                      {"KV": {"Verb": "delete-cas", "Key": "cfg/a", "Index": 1}}])
    assert r.status_code == 409
    assert c.kv.get("cfg/lock")[1]["Session"] == sid  # the unlock was undone too
    r = txn(catalog, [{"KV": {"Verb": "unlock", "Key": "cfg/lock", "Session": sid}},
                      {"KV": {"Verb": "delete-tree", "Key": "cfg/"}}])
    assert r.status_code == 200
    assert r.json() == {"Results": [{"KV": r.json()["Results"][0]["KV"]}], "Errors": None}
    assert c.kv.get("cfg/", recurse=True)[1] is None


@pytest.mark.parametrize(
    "ops, status, text",
    [
        pytest.param([{"Node": {"Verb": "set"}}], 400, "only KV operations are supported", id="node-op"),
        pytest.param([{"KV": {"Verb": "frobnicate", "Key": "a"}}], 400, 'unknown KV verb "frobnicate"', id="bad-verb"),
        pytest.param([{"KV": {"Verb": "set", "Key": "a", "Value": "%%%"}}], 400, "base64", id="bad-base64"),
        pytest.param([{"KV": {"Verb": "set", "Key": "a", "Bogus": 1}}], 400, 'unknown field "Bogus"', id="unknown-field"),
        pytest.param([{"KV": {"Verb": "lock", "Key": "a"}}], 400, "Missing Session", id="lock-without-session"),
        pytest.param([{"KV": {"Verb": "set", "Key": "a/../b"}}], 400, "path traversal", id="traversal"),
        pytest.param([{"KV": {"Verb": "get", "Key": "a"}}] * 65, 413, "too many operations", id="too-many"),
        pytest.param({"KV": {}}, 400, "Request decode failed", id="not-a-list"),
    ],
)
def test_rejects(shared_catalog, ops, status: int, text: str) -> None:
    r = txn(shared_catalog, ops)
    assert r.status_code == status, r.text
    assert text in r.text
    assert shared_catalog.client().kv.get("a")[1] is None
