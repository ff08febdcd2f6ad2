"""HTTP proxying through the real proxy process: routing, keep-alive, pipelining, framing of
HEAD/204/304, 100-continue, chunked bodies, headers, WebSocket."""

from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

WEB_YAML = """command: [x]
ports: [{name: http, port: 0, protocol: http}]
routes:
  hosts: [www.{name}.test]
  paths: [{prefix: /}, {prefix: /api, strip_prefix: true}]
"""


@pytest.fixture(scope="module")
def web(mesh_catalog, tmp_path_factory, px):
    name = px.unique("web")
    env = px.Env(mesh_catalog, tmp_path_factory.mktemp("web"), name, 2, WEB_YAML.replace("{name}", name))
    yield env
    env.close()


@pytest.fixture(scope="module")
def solo(mesh_catalog, tmp_path_factory, px):
    """One backend: every request of the service lands on it."""
    name = px.unique("solo")
    env = px.Env(mesh_catalog, tmp_path_factory.mktemp("solo"), name, 1, None)
    yield env
    env.close()


async def test_routes_by_service_host_and_keeps_path_query_and_adds_forwarded_headers(web):
    async with aiohttp.ClientSession() as s:
        async with s.get(web.url("/hello/world?x=1&y=2"), headers={"Host": web.host}) as r:
            assert r.status == 200
            info = await r.json()
    assert info["path"] == "/hello/world?x=1&y=2"
    assert info["backend"].startswith(web.name)
    headers = {k.lower(): v for k, v in info["headers"]}
    assert headers["host"] == web.host
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == web.host
    assert headers["x-request-id"]


async def test_client_request_id_is_kept(web):
    async with aiohttp.ClientSession() as s:
        async with s.get(web.url("/"), headers={"Host": web.host, "X-Request-Id": "abc-123"}) as r:
            info = await r.json()
    assert [v for k, v in info["headers"] if k.lower() == "x-request-id"] == ["abc-123"]


async def test_configured_host_and_prefix_with_strip_prefix(web):
    host = f"www.{web.name}.test"
    async with aiohttp.ClientSession() as s:
        async with s.get(web.url("/api/users?q=1"), headers={"Host": host.upper() + ":8080"}) as r:
            assert r.status == 200
            assert (await r.json())["path"] == "/users?q=1"
        async with s.get(web.url("/apiary"), headers={"Host": host}) as r:
            assert (await r.json())["path"] == "/ary"  # "/api" is a plain byte prefix (Envoy, fabio)
        async with s.get(web.url("/other"), headers={"Host": host}) as r:
            assert (await r.json())["path"] == "/other"


async def test_unknown_host_is_404_with_short_text(web):
    async with aiohttp.ClientSession() as s:
        async with s.get(web.url("/x"), headers={"Host": "nobody.example"}) as r:
            assert r.status == 404
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    assert "nobody.example" in text and len(text) < 200 and "Traceback" not in text


async def test_post_with_length_and_chunked_bodies(web):
    body = bytes(range(256)) * 4000  # 1 MB
    async def gen():
        for i in range(0, len(body), 100_000):
            yield body[i:i + 100_000]
    async with aiohttp.ClientSession() as s:
        async with s.post(web.url("/upload"), data=body, headers={"Host": web.host}) as r:
            info = await r.json()
        assert (info["body_len"], info["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        async with s.post(web.url("/upload"), data=gen(), headers={"Host": web.host}) as r:
            info = await r.json()
        assert (info["body_len"], info["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        sent = {k.lower(): v for k, v in info["headers"]}
        assert sent.get("transfer-encoding") == "chunked"


async def test_chunked_download_is_relayed_chunked(web, px):
    with px.RawClient(web.addr) as c:
        c.send(px.get("/download?size=300000&chunked=1", web.host))
        r = c.response()
    assert r.status == 200 and r.header("transfer-encoding") == "chunked"
    assert r.body == b"x" * 300000


async def test_keep_alive_reuses_one_upstream_connection(solo):
    peers = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(solo.url("/a"), headers={"Host": solo.host}) as r:
                peers.add((await r.json())["peer"])
    # A second client connection, later: the idle pooled upstream connection is reused.
    async with aiohttp.ClientSession() as s:
        async with s.get(solo.url("/b"), headers={"Host": solo.host}) as r:
            peers.add((await r.json())["peer"])
    assert len(peers) == 1


def test_pipelined_requests_are_answered_in_order(web, px):
    with px.RawClient(web.addr) as c:
        c.send(b"".join(px.get(f"/p{i}", web.host) for i in range(5)) +
               b"POST /p5 HTTP/1.1\r\nHost: " + web.host.encode() + b"\r\nContent-Length: 3\r\n\r\nabc" +
               px.get("/p6", web.host))
        paths = [c.response().json()["path"] for _ in range(7)]
    assert paths == [f"/p{i}" for i in range(7)]


def test_head_204_304_framing_keeps_the_connection_usable(web, px):
    with px.RawClient(web.addr) as c:
        c.send(f"HEAD /download?size=1000 HTTP/1.1\r\nHost: {web.host}\r\n\r\n".encode())
        r = c.response(head_request=True)
        assert r.status == 200 and r.header("content-length") == "1000"
        c.send(px.get("/nocontent", web.host))
        assert c.response().status == 204
        c.send(px.get("/notmodified", web.host))
        r = c.response()
        assert r.status == 304 and r.header("etag") == '"v1"'
        c.send(px.get("/after", web.host))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/after"


def test_expect_100_continue(web, px):
    with px.RawClient(web.addr) as c:
        c.send(f"POST /upload HTTP/1.1\r\nHost: {web.host}\r\nContent-Length: 5\r\n"
               f"Expect: 100-continue\r\n\r\n".encode())
        interim = c.response()
        assert interim.status == 100
        c.send(b"hello")
        r = c.response()
    assert r.status == 200 and r.json()["body_len"] == 5


def test_hop_by_hop_headers_removed_and_forwarded_for_appended(web, px):
    with px.RawClient(web.addr) as c:
        c.send(f"GET /h HTTP/1.1\r\nHost: {web.host}\r\nConnection: keep-alive, X-Secret, X-Forwarded-For\r\n"
               f"X-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n"
               f"Upgrade: foo\r\nX-Forwarded-For: 10.0.0.1\r\nX-Kept: yes\r\n\r\n".encode())
        r = c.response()
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    for hop in ("x-secret", "keep-alive", "proxy-connection", "te", "upgrade"):
        assert hop not in headers, hop
    assert headers["x-kept"] == "yes"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert "keep-alive" not in {k.lower() for k, _ in r.headers}


def test_connection_close_is_honoured(web, px):
    with px.RawClient(web.addr) as c:
        c.send(px.get("/c", web.host, "Connection: close\r\n"))
        r = c.response()
        assert r.status == 200 and r.header("connection") == "close"
        assert c.is_closed()


def test_http10_client_gets_close_delimited_or_length_framed_answers(web, px):
    with px.RawClient(web.addr) as c:
        c.send(f"GET /download?size=5000&chunked=1 HTTP/1.0\r\nHost: {web.host}\r\n\r\n".encode())
        r = c.response()
    assert r.status == 200 and r.header("transfer-encoding") is None and r.body == b"x" * 5000


async def test_websocket_echo(web):
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(web.url("/ws"), headers={"Host": web.host}) as ws:
            for i in range(3):
                await ws.send_str(f"m{i}")
                assert (await ws.receive()).data == f"echo:m{i}"
            await ws.send_bytes(b"\x00\x01" * 40000)
            assert (await ws.receive()).data == b"\x00\x01" * 40000


def test_admin_serves_metrics_and_routes(web, px):
    import urllib.request
    with px.RawClient(web.addr) as c:
        c.send(px.get("/m", web.host))
        assert c.response().status == 200
    metrics = urllib.request.urlopen(f"http://{web.proxy.admin}/metrics", timeout=5).read().decode()
    assert f'service="{web.name}"' in metrics
    routes = json.loads(urllib.request.urlopen(f"http://{web.proxy.admin}/routes", timeout=5).read())
    assert web.host in routes["hosts"]


def test_h2c_upgrade_is_ignored_and_the_request_answered(web, px):
    with px.RawClient(web.addr) as c:
        c.send(f"GET /h2c HTTP/1.1\r\nHost: {web.host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               f"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode())
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/h2c"
        sent = {k.lower() for k, _ in r.json()["headers"]}
        assert "upgrade" not in sent and "http2-settings" not in sent
        assert c.is_closed()


async def test_ring_hash_on_a_header_keeps_each_key_on_one_instance(mesh_catalog, tmp_path, px):
    yaml = ("command: [x]\nports: [{name: http, port: 0, protocol: http}]\n"
            "routes: {policy: ring_hash, hash_on: {header: X-User}}")
    env = px.Env(mesh_catalog, tmp_path, px.unique("ring"), 3, yaml)
    try:
        placed: dict[str, set[str]] = {}
        async with aiohttp.ClientSession() as s:
            for user in range(20):
                for _ in range(4):
                    async with s.get(env.url("/r"), headers={"Host": env.host, "X-User": f"u{user}"}) as r:
                        placed.setdefault(f"u{user}", set()).add(r.headers["X-Backend"])
        assert all(len(b) == 1 for b in placed.values()), placed
        assert len(set().union(*placed.values())) > 1  # the keys spread over the instances
    finally:
        env.close()
