"""The admin listener over a real socket: /ready, /routes, /metrics."""

from __future__ import annotations

import random

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import config
from discovery.view import Instance, ServiceView, View
from proxy._admin import start_admin
from proxy._metrics import Metrics
from proxy._routes import RouteTable, build_table

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


class State:
    def __init__(self) -> None:
        self.table: RouteTable | None = None
        self.draining = False
        self.fail = False

    def get_table(self) -> RouteTable | None:
        if self.fail:
            raise RuntimeError("secret detail that must not reach a client")
        return self.table

    def is_ready(self) -> bool:
        return self.table is not None and not self.draining


@pytest.fixture
async def admin():
    state = State()
    metrics = Metrics()
    runner, port = await start_admin("127.0.0.1", 0, get_table=state.get_table, metrics=metrics,
                                     is_ready=state.is_ready)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
        yield state, metrics, http, port
    await runner.cleanup()


def view() -> View:
    web = ServiceView("web", (
        Instance("web-1", "web", "n1", "127.0.0.1", 8001, ports={"http": 8001}, weight=3),
        Instance("web-2", "web", "n1", "127.0.0.2", 8002, ports={"http": 8002}),
    ), spec=config.ServiceSpec.from_dict({
        "name": "web", "command": ["web"], "ports": [{"name": "http", "port": 0, "vip_port": 80, "protocol": "http"}],
        "routes": {"hosts": ["www.example.test"], "paths": [{"prefix": "/", "strip_prefix": False}]}}),
        vip="127.10.0.2", revision="abc123")
    return View(services={"web": web}, index=42)


async def test_ready_follows_table_and_drain(admin) -> None:
    state, _, http, port = admin
    assert port > 0
    async with http.get("/ready") as r:
        assert r.status == 503 and "no route table" in await r.text()
    state.table = build_table(view())
    async with http.get("/ready") as r:
        assert r.status == 200 and await r.text() == "ready\n"
    state.draining = True
    async with http.get("/ready") as r:
        assert r.status == 503 and "draining" in await r.text()


async def test_routes_shows_the_live_table(admin) -> None:
    state, _, http, _ = admin
    async with http.get("/routes") as r:
        assert r.status == 503 and await r.json() == {"loaded": False}
    state.table = build_table(view(), rng=random.Random(1))
    c = state.table.cluster("web")
    ep = next(e for e in c.endpoints if e.instance_id == "web-1")
    c.begin(ep)
    async with http.get("/routes") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["loaded"] is True and doc["index"] == 42
    assert set(doc["hosts"]) == {"web.service.meshlet", "www.example.test"}
    assert doc["hosts"]["www.example.test"] == [{"prefix": "/", "strip_prefix": False, "service": "web",
                                                  "port_name": "http"}]
    svc = doc["services"]["web"]
    assert (svc["vip"], svc["revision"]) == ("127.10.0.2", "abc123")
    endpoints = {e["id"]: e for e in svc["clusters"][0]["endpoints"]}
    one = endpoints["web-1:8001"]
    assert (one["address"], one["port"], one["weight"], one["active"], one["ejected"], one["ewma"]) == (
        "127.0.0.1", 8001, 3, 1, False, 30.0)
    assert endpoints["web-2:8002"]["active"] == 0
    assert doc["vip_listeners"] == [{"listen": "127.10.0.2:80", "service": "web", "port_name": "http",
                                     "protocol": "http"}]


async def test_metrics_over_http(admin) -> None:
    state, metrics, http, _ = admin
    state.table = build_table(view())
    metrics.request_done("web", 200, 0.004)
    metrics.active_requests.inc()
    async with http.get("/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await r.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("meshlet_proxy_requests_total", (("code", "200"), ("service", "web")))] == 1
    assert samples[("meshlet_proxy_active_requests", ())] == 1
    assert samples[("meshlet_proxy_endpoints_ejected", (("service", "web"),))] == 0


async def test_errors_never_leak_a_traceback(admin) -> None:
    state, _, http, _ = admin
    state.fail = True
    async with http.get("/routes") as r:
        body = await r.text()
        assert r.status == 500 and body == "internal error\n"
    async with http.get("/nope") as r:
        assert r.status == 404
    async with http.post("/ready") as r:
        assert r.status == 405


async def test_port_in_use_is_an_error_and_cleanup_frees_the_port() -> None:
    state = State()
    runner, port = await start_admin("127.0.0.1", 0, get_table=state.get_table, metrics=Metrics(),
                                     is_ready=state.is_ready)
    with pytest.raises(OSError):
        await start_admin("127.0.0.1", port, get_table=state.get_table, metrics=Metrics(), is_ready=state.is_ready)
    await runner.cleanup()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/ready")
