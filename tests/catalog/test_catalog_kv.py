"""KV over the real process with the real py-consul client (sync and aio)."""

from __future__ import annotations

import base64
import http.client
import struct

import pytest
import requests
from catalog_helpers import shared_catalog  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def test_put_get_roundtrip_binary_and_empty(catalog) -> None:
    c = catalog.client()
    index, data = c.kv.get("foo")
    assert data is None
    assert int(index) >= 1
    assert c.kv.put("foo", "bar") is True
    _, data = c.kv.get("foo")
    assert data["Value"] == b"bar"
    assert data["Flags"] == 0 and data["LockIndex"] == 0
    assert data["CreateIndex"] == data["ModifyIndex"]
    c.kv.put("foo", struct.pack("i", 1000))
    assert struct.unpack("i", c.kv.get("foo")[1]["Value"]) == (1000,)
    c.kv.put("foo", "")
    assert c.kv.get("foo")[1]["Value"] is None
    c.kv.put("foo", None)
    assert c.kv.get("foo")[1]["Value"] is None


def test_update_keeps_create_index_and_replaces_flags(catalog) -> None:
    c = catalog.client()
    c.kv.put("k", "1", flags=50)
    _, first = c.kv.get("k")
    assert first["Flags"] == 50
    c.kv.put("k", "2")
    _, second = c.kv.get("k")
    assert second["CreateIndex"] == first["CreateIndex"]
    assert second["ModifyIndex"] > first["ModifyIndex"]
    assert second["Flags"] == 0


def test_cas(catalog) -> None:
    c = catalog.client()
    assert c.kv.put("foo", "bar", cas=50) is False
    assert c.kv.put("foo", "bar", cas=0) is True
    assert c.kv.put("foo", "again", cas=0) is False
    _, data = c.kv.get("foo")
    assert c.kv.put("foo", "bar2", cas=data["ModifyIndex"] - 1) is False
    assert c.kv.put("foo", "bar2", cas=data["ModifyIndex"]) is True
    assert c.kv.get("foo")[1]["Value"] == b"bar2"


def test_recurse_keys_and_separator(catalog) -> None:
    c = catalog.client()
    assert c.kv.get("foo/", recurse=True)[1] is None
    c.kv.put("foo/", None)
    c.kv.put("foo/bar1", "1")
    c.kv.put("foo/bar2", "2")
    c.kv.put("foo/bar3", "3")
    c.kv.put("foozle", "x")
    _, data = c.kv.get("foo/", recurse=True)
    assert [x["Key"] for x in data] == ["foo/", "foo/bar1", "foo/bar2", "foo/bar3"]
    assert [x["Value"] for x in data] == [None, b"1", b"2", b"3"]
    c.kv.put("bar", "4")
    c.kv.put("base/foo", "1")
    c.kv.put("base/base/foo", "5")
    assert c.kv.get("base/", keys=True, separator="/")[1] == ["base/base/", "base/foo"]
    assert c.kv.get("base/", keys=True)[1] == ["base/base/foo", "base/foo"]
    assert c.kv.get("", keys=True, separator="/")[1] == ["bar", "base/", "foo/", "foozle"]
    # a missing prefix is a 404 (None), but the root is always a list
    assert c.kv.get("nothing/", keys=True)[1] is None
    c.kv.delete("", recurse=True)
    assert c.kv.get("", keys=True)[1] == []


def test_delete_recurse_and_cas(catalog) -> None:
    c = catalog.client()
    for k in ("foo1", "foo2", "foo3"):
        c.kv.put(k, k)
    assert c.kv.delete("foo2") is True
    assert [x["Key"] for x in c.kv.get("foo", recurse=True)[1]] == ["foo1", "foo3"]
    assert c.kv.delete("foo", recurse=True) is True
    assert c.kv.get("foo", recurse=True)[1] is None
    c.kv.put("foo", "bar")
    index, data = c.kv.get("foo")
    assert c.kv.delete("foo", cas=data["ModifyIndex"] - 1) is False
    assert c.kv.get("foo") == (index, data)
    assert c.kv.delete("foo", cas=data["ModifyIndex"]) is True
    assert c.kv.get("foo")[1] is None
    assert c.kv.delete("never-was") is True


def test_miss_is_404_with_index_headers(catalog) -> None:
    r = catalog.http.get(catalog.url + "/v1/kv/missing")
    assert r.status_code == 404
    assert r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"


def test_raw_and_pretty(catalog) -> None:
    catalog.http.put(catalog.url + "/v1/kv/doc", data=b'{"a": 1}')
    r = catalog.http.get(catalog.url + "/v1/kv/doc?raw")
    assert r.status_code == 200 and r.content == b'{"a": 1}'
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    r = catalog.http.get(catalog.url + "/v1/kv/doc?pretty")
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.text.endswith("\n") and "\n    " in r.text
    assert base64.b64decode(r.json()[0]["Value"]) == b'{"a": 1}'


@pytest.mark.parametrize(
    "method, path, status, body",
    [
        pytest.param("PUT", "/v1/kv/a?cas=0&acquire=x", 400, "Conflicting flags: acquire=x&cas=0\n", id="conflicting-put"),
        pytest.param("DELETE", "/v1/kv/a?recurse&cas=1", 400, "Conflicting flags: cas=1&recurse=\n", id="conflicting-delete"),
        pytest.param("PUT", "/v1/kv/", 400, "Missing key name", id="put-missing-key"),
        pytest.param("GET", "/v1/kv/", 400, "Missing key name", id="get-missing-key"),
        pytest.param("DELETE", "/v1/kv/", 400, "Missing key name", id="delete-missing-key"),
        pytest.param("PUT", "/v1/kv/a/../b", 400, None, id="traversal"),
        pytest.param("PUT", "/v1/kv/a/%252e%252e/b", 400, None, id="encoded-traversal"),
        pytest.param("PUT", "/v1/kv/%20a", 400, None, id="leading-space"),
        pytest.param("GET", "/v1/kv/a%20", 400, None, id="trailing-space"),
        pytest.param("PUT", "/v1/kv/a?flags=x", 500, None, id="bad-flags"),
        pytest.param("PUT", "/v1/kv/a?acquire=nope", 500, 'invalid session "nope"', id="unknown-session"),
        pytest.param("GET", "/v1/kv/a?dc=dc2", 500, "No path to datacenter", id="unknown-dc"),
        pytest.param("GET", "/v1/kv/a?index=x", 400, "Invalid index", id="bad-index"),
        pytest.param("GET", "/v1/kv/a?index=1&wait=10", 400, "Invalid wait time", id="wait-without-unit"),
        pytest.param("GET", "/v1/kv/a?stale&consistent", 400,
                     "Cannot specify ?stale with ?consistent, conflicting semantics.", id="stale-and-consistent"),
        pytest.param("GET", "/v1/nope", 404, "Invalid URL path: not a recognized HTTP API endpoint\n", id="unknown-path"),
    ],
)
def test_kv_errors(shared_catalog, method: str, path: str, status: int, body: str | None) -> None:
    # http.client sends the path as given (requests would resolve "..").
    conn = http.client.HTTPConnection(shared_catalog.host, shared_catalog.port, timeout=5)
    conn.request(method, path, headers=shared_catalog.headers)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    assert r.status == status, text
    assert "Traceback" not in text
    if body is not None:
        assert text == body
    else:
        assert text  # says what was wrong


def test_wrong_method_is_405_with_allow(catalog) -> None:
    r = catalog.http.post(catalog.url + "/v1/kv/a")
    assert r.status_code == 405
    assert r.text == "method POST not allowed"
    assert r.headers["Allow"] == "OPTIONS,GET,PUT,DELETE"
    r = requests.options(catalog.url + "/v1/kv/a")
    assert r.status_code == 200 and r.headers["Allow"] == "OPTIONS,GET,PUT,DELETE"


def test_value_size_limit(catalog) -> None:
    c = catalog.client()
    assert c.kv.put("big", b"x" * (512 * 1024)) is True
    r = catalog.http.put(catalog.url + "/v1/kv/big", data=b"x" * (512 * 1024 + 1))
    assert r.status_code == 413
    assert r.text.startswith("Request body(524289 bytes) too large, max size: 524288 bytes.")
    assert len(c.kv.get("big")[1]["Value"]) == 512 * 1024


async def test_aio_client(catalog) -> None:
    c = catalog.aio()
    try:
        _, data = await c.kv.get("foo")
        assert data is None
        assert await c.kv.put("foo", struct.pack("i", 7)) is True
        _, data = await c.kv.get("foo")
        assert struct.unpack("i", data["Value"]) == (7,)
        for k in ("p/1", "p/2", "p/3"):
            await c.kv.put(k, k)
        assert await c.kv.delete("p/2") is True
        _, data = await c.kv.get("p/", recurse=True)
        assert [x["Key"] for x in data] == ["p/1", "p/3"]
        assert await c.kv.delete("p/", recurse=True) is True
        assert (await c.kv.get("p/", recurse=True))[1] is None
    finally:
        await c.close()
