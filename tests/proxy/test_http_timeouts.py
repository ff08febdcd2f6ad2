"""Time-outs and limits, and the answers the proxy generates: 502, 503, 504, 408."""

from __future__ import annotations

import json
import time
import urllib.request

import aiohttp
import pytest
from _util import refusing_port

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

PORT = "ports: [{name: http, port: 0, protocol: http}]"


@pytest.fixture(scope="module")
def mesh(mesh_catalog, tmp_path_factory, px):
    """Services with small time-outs and limits behind one proxy with short client time-outs."""
    tmp = tmp_path_factory.mktemp("timeouts")
    names = {k: px.unique(k) for k in ("slow", "pertry", "down", "refused", "pending", "stall")}
    backends = []

    def add(kind: str, n: int, routes: str | None) -> list:
        bs = [px.Backend(f"{names[kind]}-b{i}") for i in range(n)]
        for i, b in enumerate(bs):
            mesh_catalog.register(names[kind], f"{names[kind]}-{i}", b.port)
        if routes is not None:
            mesh_catalog.put_service(names[kind], f"command: [x]\n{PORT}\nroutes: {routes}")
        backends.extend(bs)
        return bs

    add("slow", 1, "{timeouts: {request: 0.5s}}")
    add("pertry", 2, "{retries: {attempts: 1, per_try_timeout: 0.3s}, timeouts: {request: 5s}}")
    add("down", 1, None)
    mesh_catalog.set_status(f"{names['down']}-0", "critical")
    mesh_catalog.register(names["refused"], f"{names['refused']}-0", refusing_port())
    add("pending", 1, "{max_pending: 1}")
    add("stall", 1, "{timeouts: {idle: 0.5s}}")
    proxy = px.Proxy(mesh_catalog.url, "--header-timeout", "0.5", "--idle-timeout", "0.5",
                     log_path=tmp / "proxy.log")
    yield proxy, {k: f"{v}.service.meshlet" for k, v in names.items()}, backends
    proxy.stop()
    for kind, name in names.items():
        for i in range(2):
            mesh_catalog.deregister(f"{name}-{i}")
        mesh_catalog.delete_service(name)
    for b in backends:
        b.stop()


async def test_overall_timeout_is_504_naming_the_service(mesh):
    proxy, hosts, _ = mesh
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.get(proxy.url("/slow?delay=3"), headers={"Host": hosts["slow"]}) as r:
            text = await r.text()
        elapsed = time.monotonic() - t0
    assert r.status == 504 and hosts["slow"].split(".")[0] in text and "Traceback" not in text
    assert elapsed < 2.5


async def test_per_try_timeout_retries_on_another_instance(mesh):
    proxy, hosts, backends = mesh
    slow_one = [b for b in backends if b.name.startswith(hosts["pertry"].split(".")[0])][0].name
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(proxy.url(f"/slow?delay=3&only={slow_one}"), headers={"Host": hosts["pertry"]}) as r:
                assert r.status == 200
                assert r.headers["X-Backend"] != slow_one


async def test_no_ready_instance_is_503(mesh):
    proxy, hosts, _ = mesh
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url("/"), headers={"Host": hosts["down"]}) as r:
            text = await r.text()
    assert r.status == 503 and f"no ready instance of service {hosts['down'].split('.')[0]}" in text


async def test_connection_refused_is_502(mesh):
    proxy, hosts, _ = mesh
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url("/"), headers={"Host": hosts["refused"]}) as r:
            text = await r.text()
    assert r.status == 502 and hosts["refused"].split(".")[0] in text and "refused" in text.lower()


async def test_pending_limit_answers_503(mesh, px):
    proxy, hosts, _ = mesh
    import asyncio
    service = hosts["pending"].split(".")[0]

    def in_flight() -> int:
        with urllib.request.urlopen(f"http://{proxy.admin}/routes", timeout=5) as r:
            clusters = json.load(r)["services"][service]["clusters"]
        return sum(e["active"] for c in clusters for e in c["endpoints"])

    async with aiohttp.ClientSession() as s:
        async def slow() -> int:
            async with s.get(proxy.url("/slow?delay=1"), headers={"Host": hosts["pending"]}) as r:
                return r.status
        first = asyncio.create_task(slow())
        await px.async_wait_for(lambda: in_flight() == 1, timeout=5, what="the first request in flight")
        async with s.get(proxy.url("/quick"), headers={"Host": hosts["pending"]}) as r:
            text = await r.text()
        assert r.status == 503 and "pending" in text
        assert await first == 200


def test_slow_request_head_is_408_and_closed(mesh, px):
    proxy, hosts, _ = mesh
    with px.RawClient(proxy.http) as c:
        c.send(f"GET / HTTP/1.1\r\nHost: {hosts['slow']}\r\nX-Part".encode())
        t0 = time.monotonic()
        r = c.response()
        assert r.status == 408 and c.is_closed()
    assert time.monotonic() - t0 < 3


def test_idle_keep_alive_connection_is_closed(mesh, px):
    proxy, hosts, _ = mesh
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/x", hosts["pertry"]))
        assert c.response().status == 200
        t0 = time.monotonic()
        assert c.is_closed(timeout=5)
    assert time.monotonic() - t0 < 3


def test_stalled_request_body_is_408_and_closed(mesh, px):
    proxy, hosts, _ = mesh
    with px.RawClient(proxy.http) as c:
        c.send(f"POST /upload HTTP/1.1\r\nHost: {hosts['stall']}\r\nContent-Length: 100\r\n\r\nonly some".encode())
        r = c.response()
        assert r.status == 408 and c.is_closed()


def test_connect_that_hangs_is_retried_on_another_instance(mesh_catalog, backends, start_proxy, px):
    """An instance whose accept queue is full drops SYNs: connects hang until the connect
    time-out (1 s by default), then the request goes to another instance."""
    import socket

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue; nothing ever accepts
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(hang.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    name = px.unique("hang")
    good = backends(name + "-good")
    mesh_catalog.register(name, name + "-0", hang.getsockname()[1])
    mesh_catalog.register(name, name + "-1", good.port)
    proxy = start_proxy()
    try:
        import urllib.request

        def retried() -> bool:
            text = urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=5).read().decode()
            return f'meshlet_proxy_retries_total{{service="{name}"}}' in text
        for _ in range(40):  # until the balancer has tried the hanging instance once
            with px.RawClient(proxy.http, timeout=10) as c:
                c.send(px.get("/h", f"{name}.service.meshlet"))
                r = c.response()
                assert r.status == 200 and r.header("x-backend") == good.name
            if retried():
                break
        assert retried()
    finally:
        mesh_catalog.deregister(name + "-0")
        mesh_catalog.deregister(name + "-1")
        for s in fillers:
            s.close()
        hang.close()
