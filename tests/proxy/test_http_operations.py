"""Operational behaviour: access log, connection limit, client going away mid-request,
upstream keep-alive idle time-out."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def _metric(proxy, name: str) -> float:
    text = urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture
def svc(mesh_catalog, backends, px):
    name = px.unique("ops")
    b = backends(name + "-b0")
    mesh_catalog.register(name, name + "-0", b.port)
    mesh_catalog.put_service(name, "command: [x]\nports: [{name: http, port: 0, protocol: http}]\n"
                                   "routes: {timeouts: {idle: 0.3s}}")
    yield name, f"{name}.service.meshlet", b
    mesh_catalog.deregister(name + "-0")
    mesh_catalog.delete_service(name)


def test_access_log_writes_one_json_line_per_request(svc, start_proxy, px):
    name, host, backend = svc
    proxy = start_proxy("--access-log")
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/logged?x=1", host, "X-Request-Id: rid-7\r\n"))
        assert c.response().status == 200

    def record():
        for line in proxy.stderr_text().splitlines():
            if line.startswith("{") and '"rid-7"' in line:
                return json.loads(line)
    rec = px.wait_for(record, 5, what="the access log line")
    assert rec["status"] == 200 and rec["service"] == name and rec["method"] == "GET"
    assert rec["path"] == "/logged?x=1" and rec["upstream"] == f"127.0.0.1:{backend.port}"
    assert rec["duration_ms"] >= 0 and rec["client"] == "127.0.0.1"


def test_connection_limit_answers_503_and_closes(svc, start_proxy, px):
    name, host, backend = svc
    proxy = start_proxy("--max-connections", "2")
    a, b = px.RawClient(proxy.http), px.RawClient(proxy.http)
    try:
        a.send(px.get("/a", host))
        assert a.response().status == 200
        b.send(px.get("/b", host))
        assert b.response().status == 200
        with px.RawClient(proxy.http) as c:
            r = c.response()
            assert r.status == 503 and b"connection limit" in r.body
            assert c.is_closed()
    finally:
        a.close()
        b.close()
    # Once the two are gone, new connections are served again.
    def served() -> bool:
        with px.RawClient(proxy.http) as c:
            c.send(px.get("/again", host))
            return c.response().status == 200
    px.wait_for(served, 5, interval=0.05, what="a connection to be accepted again")


def test_client_leaving_mid_request_releases_everything(svc, start_proxy, px):
    name, host, backend = svc
    proxy = start_proxy()
    for _ in range(3):
        c = px.RawClient(proxy.http)
        c.send(px.get("/slow?delay=5", host))
        px.wait_for(lambda: _metric(proxy, "meshlet_proxy_active_requests") >= 1, 5, what="the request in flight")
        c.close()
        px.wait_for(lambda: _metric(proxy, "meshlet_proxy_active_requests") == 0, 5, what="the request released")
    # The upstream connections of the abandoned requests were closed, not pooled.
    px.wait_for(lambda: _metric(proxy, "meshlet_proxy_upstream_connections") == 0, 5, what="upstream closed")
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/after", host))
        assert c.response().status == 200


def test_idle_upstream_connections_are_closed_after_the_idle_time_out(svc, start_proxy, px):
    name, host, backend = svc
    proxy = start_proxy()

    def peer() -> int:
        with px.RawClient(proxy.http) as c:
            c.send(px.get("/peer", host))
            return c.response().json()["peer"]
    first = peer()
    assert peer() == first  # reused while fresh
    px.wait_for(lambda: _metric(proxy, "meshlet_proxy_upstream_connections") == 0, 5,
                what="the idle upstream connection to be closed")
    assert peer() != first


def test_catalog_outage_keeps_the_last_table(catalog_factory, backends, px, tmp_path):
    import consul

    cat = catalog_factory()
    c = cat.client()
    b = backends("outage-b0")
    assert c.agent.service.register("outage", service_id="outage-0", address="127.0.0.1", port=b.port,
                                    check=consul.Check.ttl("1h"))
    c.agent.check.ttl_pass("service:outage-0")
    proxy = px.Proxy(cat.url, log_path=tmp_path / "proxy.log")
    try:
        def ok() -> bool:
            with px.RawClient(proxy.http) as rc:
                rc.send(px.get("/x", "outage.service.meshlet"))
                return rc.response().status == 200
        px.wait_for(ok, 5, what="the service routed")
        cat.kill()
        for _ in range(20):
            assert ok()
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()


def test_unreachable_catalog_at_start_exits_1_with_a_message(tmp_path):
    import subprocess
    import sys

    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.run([sys.executable, "-m", "proxy", "--consul", f"http://127.0.0.1:{port}", "--listen",
                        "127.0.0.1:0", "--catalog-timeout", "1"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stdout == ""
    assert f"127.0.0.1:{port}" in p.stderr and "Traceback" not in p.stderr
