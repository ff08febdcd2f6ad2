"""Connect registrations: a SidecarService registers <id>-sidecar-proxy as Consul does,
with its default checks (a TCP check and an alias of the parent's health), and the
Connect read endpoints list it. No mesh runs behind it: these are the registrations."""

from __future__ import annotations

import socket

import consul
import pytest

from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

Check = consul.Check


def _checks(c, sid: str) -> dict[str, dict]:
    return {k: v for k, v in c.agent.checks().items() if v["ServiceID"] == sid}


def test_sidecar_service_is_registered_with_consuls_defaults(catalog) -> None:
    c = catalog.client()
    assert c.agent.service.register("web", port=8080, tags=["v1"], meta={"team": "a"},
                                    check=Check.ttl("30s"), connect={"SidecarService": {}})
    services = c.agent.services()
    assert set(services) == {"web", "web-sidecar-proxy"}
    assert "Connect" not in services["web"]  # the sugar is not kept in the parent
    proxy = services["web-sidecar-proxy"]
    assert proxy["Kind"] == "connect-proxy" and proxy["Service"] == "web-sidecar-proxy"
    assert proxy["Port"] == 21000 and proxy["Tags"] == ["v1"] and proxy["Meta"] == {"team": "a"}
    assert {k: proxy["Proxy"][k] for k in ("DestinationServiceName", "DestinationServiceID",
                                            "LocalServiceAddress", "LocalServicePort")} == {
        "DestinationServiceName": "web", "DestinationServiceID": "web",
        "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080}
    checks = _checks(c, "web-sidecar-proxy")
    assert {k: (v["Name"], v["Type"]) for k, v in checks.items()} == {
        "service:web-sidecar-proxy:1": ("Connect Sidecar Listening", "tcp"),
        "service:web-sidecar-proxy:2": ("Connect Sidecar Aliasing web", "alias"),
    }
    assert checks["service:web-sidecar-proxy:1"]["Definition"]["TCP"] == "127.0.0.1:21000"
    # the alias follows the parent: critical (its TTL check starts critical), then passing
    alias = "service:web-sidecar-proxy:2"
    got = wait_for(lambda: (ch := _checks(c, "web-sidecar-proxy")[alias])["Output"] and ch, timeout=10)
    assert got["Status"] == "critical" and got["Output"].startswith('Aliased check "Service \'web\' check" failing')
    c.agent.check.ttl_pass("service:web")
    wait_for(lambda: (ch := _checks(c, "web-sidecar-proxy")[alias])["Status"] == "passing"
             and ch["Output"] == "All checks passing.", timeout=10, what="alias passing")
    c.agent.check.ttl_warn("service:web", notes="slow")
    wait_for(lambda: (ch := _checks(c, "web-sidecar-proxy")[alias])["Status"] == "warning"
             and ch["Output"] == "Aliased check \"Service 'web' check\" failing: slow", timeout=10)


def test_sidecar_ports_tcp_check_and_deregistration(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("api", port=9000, connect={"SidecarService": {}})
    c.agent.service.register("db", port=5432, connect={"sidecar_service": {"port": 21500}})
    c.agent.service.register("cache", port=6379, connect={"sidecar_service": {}})
    services = c.agent.services()
    assert services["api-sidecar-proxy"]["Port"] == 21000
    assert services["db-sidecar-proxy"]["Port"] == 21500
    assert services["cache-sidecar-proxy"]["Port"] == 21001  # lowest free in 21000-21255
    c.agent.service.register("api", port=9001, connect={"SidecarService": {}})  # keeps its port
    assert c.agent.services()["api-sidecar-proxy"]["Port"] == 21000
    assert c.agent.services()["api-sidecar-proxy"]["Proxy"]["LocalServicePort"] == 9001
    # the listening check probes the proxy's port: a listener there makes it pass
    c.agent.service.register("late", port=7000, connect={"SidecarService": {"port": 0}})
    port = c.agent.services()["late-sidecar-proxy"]["Port"]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        body = {"Name": "late", "Port": 7000,
                "Connect": {"SidecarService": {"Check": {"TCP": f"127.0.0.1:{port}", "Interval": "100ms"}}}}
        assert catalog.http.put(catalog.url + "/v1/agent/service/register", json=body, timeout=5).status_code == 200
        wait_for(lambda: _checks(c, "late-sidecar-proxy")["service:late-sidecar-proxy"]["Status"] == "passing",
                 timeout=15, what="given sidecar check passing")
    assert c.agent.service.deregister("api") is True
    assert "api-sidecar-proxy" not in c.agent.services()
    assert not _checks(c, "api-sidecar-proxy")


def test_connect_endpoints_list_the_proxies(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", port=8080, connect={"SidecarService": {}})
    c.agent.service.register("plain", port=1)
    index, nodes = c.health.connect("web")
    assert [n["Service"]["ID"] for n in nodes] == ["web-sidecar-proxy"]
    assert nodes[0]["Service"]["Kind"] == "connect-proxy"
    assert {ch["CheckID"] for ch in nodes[0]["Checks"]} >= {"service:web-sidecar-proxy:1", "service:web-sidecar-proxy:2"}
    _, entries = c.catalog.connect("web")
    assert [(e["ServiceID"], e["ServiceKind"], e["ServicePort"]) for e in entries] == [
        ("web-sidecar-proxy", "connect-proxy", 21000)]
    assert c.health.connect("plain")[1] == [] and c.catalog.connect("plain")[1] == []
    # a watcher of web's connect endpoints wakes when a second proxy appears
    c.agent.service.register("web", service_id="web-2", port=8081, connect={"SidecarService": {}})
    new_index, nodes = c.health.connect("web", index=index, wait="10s")
    assert int(new_index) > int(index)
    assert [n["Service"]["ID"] for n in nodes] == ["web-2-sidecar-proxy", "web-sidecar-proxy"]


@pytest.mark.parametrize("connect, text", [
    pytest.param({"SidecarService": {"Kind": "mesh-gateway"}}, "Invalid SidecarService: Kind must be 'connect-proxy'",
                 id="wrong-kind"),
    pytest.param({"SidecarService": {"Connect": {"SidecarService": {}}}}, None, id="nested-sidecar"),
    pytest.param({"SidecarService": {"Bogus": 1}}, 'Request decode failed: json: unknown field "Bogus"',
                 id="unknown-field"),
])
def test_bad_sidecar_is_refused_and_nothing_is_registered(catalog, connect, text) -> None:
    r = catalog.http.put(catalog.url + "/v1/agent/service/register", json={"Name": "web", "Connect": connect}, timeout=5)
    assert r.status_code == 400, r.text
    if text is not None:
        assert r.text == text
    assert catalog.client().agent.services() == {}
