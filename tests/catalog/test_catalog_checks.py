"""Checks the catalog runs itself: HTTP and TCP against real loopback servers, TTL,
DeregisterCriticalServiceAfter, thresholds, and what a restart keeps."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import consul
import pytest

from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

Check = consul.Check


class _Handler(BaseHTTPRequestHandler):
    status = 200
    seen_headers: list[dict[str, str]] = []
    seen_methods: list[str] = []

    def _reply(self) -> None:
        type(self).seen_headers.append(dict(self.headers))
        type(self).seen_methods.append(self.command)
        body = f"status {self.status}".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def http_server():
    handler = type("Handler", (_Handler,), {"status": 200, "seen_headers": [], "seen_methods": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.handler = handler  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def _status(c, check_id: str) -> str | None:
    check = c.agent.checks().get(check_id)
    return check and check["Status"]


def test_http_check_follows_the_server(catalog, http_server) -> None:
    c = catalog.client()
    port = http_server.server_address[1]
    url = f"http://127.0.0.1:{port}/health"
    check = Check.http(url, "100ms", timeout="1s", header={"X-Probe": ["meshlet"]})
    c.agent.service.register("web", port=port, check=check)
    wait_for(lambda: _status(c, "service:web") == "passing", timeout=15, what="passing")
    out = c.agent.checks()["service:web"]["Output"]
    assert out.startswith(f"HTTP GET {url}: 200 OK Output: status 200")
    assert http_server.handler.seen_headers[-1]["X-Probe"] == "meshlet"
    assert http_server.handler.seen_headers[-1]["User-Agent"] == "Consul Health Check"
    http_server.handler.status = 429
    wait_for(lambda: _status(c, "service:web") == "warning", timeout=15, what="warning on 429")
    http_server.handler.status = 503
    wait_for(lambda: _status(c, "service:web") == "critical", timeout=15, what="critical on 503")
    http_server.handler.status = 200
    wait_for(lambda: _status(c, "service:web") == "passing", timeout=15, what="passing again")
    http_server.shutdown()
    http_server.server_close()
    wait_for(lambda: _status(c, "service:web") == "critical", timeout=15, what="critical when the server is gone")
    assert c.health.service("web", passing=True)[1] == []


def test_http_check_method(catalog, http_server) -> None:
    port = http_server.server_address[1]
    body = {"Name": "m", "Check": {"HTTP": f"http://127.0.0.1:{port}/", "Method": "POST", "Interval": "100ms"}}
    assert catalog.http.put(catalog.url + "/v1/agent/service/register", json=body).status_code == 200
    c = catalog.client()
    wait_for(lambda: _status(c, "service:m") == "passing", timeout=15)
    assert "POST" in http_server.handler.seen_methods


def test_tcp_check_follows_the_listener(catalog) -> None:
    c = catalog.client()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    c.agent.service.register("db", port=port, check=Check.tcp("127.0.0.1", port, "100ms", timeout="1s"))
    wait_for(lambda: _status(c, "service:db") == "passing", timeout=15)
    assert c.agent.checks()["service:db"]["Output"] == f"TCP connect 127.0.0.1:{port}: Success"
    listener.close()
    wait_for(lambda: _status(c, "service:db") == "critical", timeout=15)
    assert c.agent.checks()["service:db"]["Output"].startswith(f"dial tcp 127.0.0.1:{port}: ")


def test_deregister_critical_service_after(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("flaky", check=Check.ttl("200ms") | {"DeregisterCriticalServiceAfter": "300ms"})
    c.agent.service.register("steady", check=Check.ttl("60s"))
    c.agent.check.ttl_pass("service:flaky")
    wait_for(lambda: "flaky" not in c.agent.services(), timeout=10, what="flaky reaped")
    assert "service:flaky" not in c.agent.checks()
    assert "steady" in c.agent.services()


def test_failures_before_critical_and_success_before_passing(catalog, http_server) -> None:
    port = http_server.server_address[1]
    body = {"Name": "t", "Check": {"HTTP": f"http://127.0.0.1:{port}/", "Interval": "100ms",
                                   "SuccessBeforePassing": 2, "FailuresBeforeCritical": 3}}
    assert catalog.http.put(catalog.url + "/v1/agent/service/register", json=body).status_code == 200
    c = catalog.client()
    wait_for(lambda: _status(c, "service:t") == "passing", timeout=15)
    http_server.handler.status = 500
    wait_for(lambda: _status(c, "service:t") == "critical", timeout=15)
    # three failures were needed: at least 3 probes answered 500 before the flip
    assert http_server.handler.seen_methods.count("GET") >= 5


def test_repeated_status_does_not_bump_index(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", check=Check.ttl("60s"))
    c.agent.check.ttl_pass("service:web", notes="ok")
    index, _ = c.health.service("web")
    for _ in range(3):
        c.agent.check.ttl_pass("service:web", notes="ok")
    c.agent.service.register("web", check=Check.ttl("60s"))  # identical re-registration
    assert c.health.service("web")[0] == index
    c.agent.check.ttl_pass("service:web", notes="still ok")  # output changes: a real change
    assert int(c.health.service("web")[0]) > int(index)


def test_restart_keeps_services_checks_status_and_rearms_ttl(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-1", port=80, tags=["v1"], check=Check.ttl("2s"))
    c.agent.service.register("web", service_id="web-2", port=81, check=Check.ttl("60s"))
    c.agent.check.ttl_pass("service:web-1", notes="fine")
    c.agent.check.ttl_warn("service:web-2", notes="meh")
    c.kv.put("cfg", "x")
    index, before = c.health.service("web")
    catalog.kill()
    catalog.restart()
    c = catalog.client()
    index2, after = c.health.service("web")
    assert int(index2) >= int(index)
    assert [(n["Service"]["ID"], n["Service"]["Port"], n["Checks"][1]["Status"], n["Checks"][1]["Output"]) for n in after] == [
        ("web-1", 80, "passing", "fine"), ("web-2", 81, "warning", "meh")]
    # the TTL timer starts over after a restart, then expires
    wait_for(lambda: _status(c, "service:web-1") == "critical", timeout=10, what="TTL expired after restart")
    assert c.agent.checks()["service:web-1"]["Output"] == "TTL expired"
    assert c.agent.checks()["service:web-2"]["Status"] == "warning"


def test_service_with_several_checks_reports_each(catalog, http_server) -> None:
    c = catalog.client()
    port = http_server.server_address[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    tcp_port = listener.getsockname()[1]
    try:
        assert c.agent.service.register(
            "multi", port=port, check=Check.ttl("30s"),
            extra_checks=[Check.http(f"http://127.0.0.1:{port}/", "100ms"), Check.tcp("127.0.0.1", tcp_port, "100ms")])
        checks = c.agent.checks()
        assert {k: v["Type"] for k, v in checks.items()} == {
            "service:multi:1": "ttl", "service:multi:2": "http", "service:multi:3": "tcp"}
        assert checks["service:multi:1"]["Status"] == "critical"  # a TTL check starts critical
        wait_for(lambda: _status(c, "service:multi:2") == "passing" and _status(c, "service:multi:3") == "passing",
                 timeout=15, what="the HTTP and TCP checks ran")
        assert _status(c, "service:multi:1") == "critical"
        _, nodes = c.health.service("multi")
        assert {ch["CheckID"]: ch["Status"] for ch in nodes[0]["Checks"]} == {
            "serfHealth": "passing", "service:multi:1": "critical", "service:multi:2": "passing",
            "service:multi:3": "passing"}
        assert c.health.service("multi", passing=True)[1] == []
        c.agent.check.ttl_pass("service:multi:1")
        assert [n["Service"]["ID"] for n in c.health.service("multi", passing=True)[1]] == ["multi"]
    finally:
        listener.close()
