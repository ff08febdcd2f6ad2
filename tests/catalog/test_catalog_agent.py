"""/v1/agent/*: services, checks, TTL updates, maintenance, self and members."""

from __future__ import annotations

import json

import consul
import consul.aio
import pytest
import requests

from catalog_helpers import shared_catalog  # noqa: F401 (fixture)
from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

Check = consul.Check


def put(catalog, path: str, body=None, **params) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
    return catalog.http.put(catalog.url + path, data=data, params=params, timeout=5)


async def test_services_shape_aio(catalog) -> None:
    c = catalog.aio()
    try:
        assert await c.agent.services() == {}
        assert await c.agent.service.register("foo") is True
        assert await c.agent.services() == {
            "foo": {
                "Address": "", "Datacenter": "dc1", "EnableTagOverride": False, "ID": "foo", "Meta": {},
                "Port": 0, "Service": "foo", "Tags": [], "Weights": {"Passing": 1, "Warning": 1},
            }
        }
        assert await c.agent.service.deregister("foo") is True
        assert await c.agent.services() == {}
    finally:
        await c.close()


def test_register_fields_and_deregister(catalog) -> None:
    c = catalog.client()
    assert c.agent.service.register(
        "web", service_id="web-1", address="10.10.10.1", port=8080, tags=["v1", "blue"],
        meta={"revision": "abc", "slot": "0"}, enable_tag_override=True, weights={"Passing": 3, "Warning": 1},
    )
    svc = c.agent.services()["web-1"]
    assert svc["Address"] == "10.10.10.1" and svc["Port"] == 8080
    assert svc["Tags"] == ["v1", "blue"] and svc["Meta"] == {"revision": "abc", "slot": "0"}
    assert svc["EnableTagOverride"] is True and svc["Weights"] == {"Passing": 3, "Warning": 1}
    assert c.agent.service_definition("web-1")["ID"] == "web-1"
    assert c.agent.service_definition("nope") is None
    assert c.agent.service.deregister("web-1") is True
    assert c.agent.service.deregister("web-1") is False  # 404 maps to False
    r = put(catalog, "/v1/agent/service/deregister/web-1")
    assert r.status_code == 404
    assert r.text == 'Unknown service ID "web-1". Ensure that the service ID is passed, not the service name.'


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"Name": "s", "ID": "s1", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "1m"}}, id="canonical"),
        pytest.param({"name": "s", "id": "s1", "check": {"ttl": "10s", "deregister_critical_service_after": "1m"}}, id="lower-snake"),
        pytest.param({"NAME": "s", "Id": "s1", "CHECK": {"Ttl": 10_000_000_000, "DeregisterCriticalServiceAfter": 60_000_000_000}},
                     id="upper-and-ns-numbers"),
    ],
)
def test_register_keys_case_insensitive_and_durations(catalog, body: dict) -> None:
    assert put(catalog, "/v1/agent/service/register", body).status_code == 200
    check = catalog.client().agent.checks()["service:s1"]
    assert check["Type"] == "ttl"
    assert check["Definition"]["TTL"] == "10s"
    assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s"


@pytest.mark.parametrize(
    "body, text",
    [
        pytest.param({"Name": "s", "Bogus": 1}, 'Request decode failed: json: unknown field "Bogus"', id="unknown-field"),
        pytest.param({"Name": "s", "Check": {"TTL": "5s", "x": 1}}, 'Request decode failed: json: unknown field "x"',
                     id="unknown-nested-field"),
        pytest.param({"Name": "s", "Port": "80"}, None, id="port-as-string"),
        pytest.param({"Name": "s", "Check": {"TTL": "soon"}}, None, id="bad-duration"),
        pytest.param({"Port": 1}, "Missing service name", id="missing-name"),
        pytest.param({"Name": "s", "Address": "0.0.0.0"}, "Invalid service address", id="wildcard-address"),
        pytest.param({"Name": "s", "Weights": {"Passing": 0, "Warning": 1}}, "Invalid Weights: Passing must be greater than 0",
                     id="bad-weights"),
        pytest.param({"Name": "s", "Meta": {"bad key": "v"}}, None, id="bad-meta"),
        pytest.param({"Name": "s", "Check": {"TTL": "5s", "Interval": "5s", "HTTP": "http://x"}},
                     "Invalid check: Interval and TTL cannot both be specified", id="ttl-and-interval"),
        pytest.param({"Name": "s", "Check": {"HTTP": "http://127.0.0.1:1/"}},
                     "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
                     id="http-without-interval"),
        pytest.param({"Name": "s", "Check": {"Notes": "n"}}, "Invalid check: TTL must be > 0 for TTL checks", id="no-kind"),
        pytest.param({"Name": "s", "Check": {"TTL": "5s", "Status": "fine"}},
                     "Status for checks must 'passing', 'warning', 'critical'", id="bad-status"),
        pytest.param({"Name": "s", "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}}, None, id="unsupported-grpc"),
        pytest.param([1, 2], None, id="not-an-object"),
        pytest.param("{not json", None, id="not-json"),
        pytest.param("", "Request decode failed: EOF", id="empty"),
    ],
)
def test_register_rejects(shared_catalog, body, text: str | None) -> None:
    r = put(shared_catalog, "/v1/agent/service/register", body)
    assert r.status_code == 400, r.text
    assert "Traceback" not in r.text
    if text is not None:
        assert r.text == text
    assert shared_catalog.client().agent.services() == {}  # nothing half-written


def test_script_checks_are_disabled(catalog) -> None:
    c = catalog.client()
    with pytest.raises(consul.ConsulException, match="Scripts are disabled"):
        c.agent.check.register("script_check", Check.script(["/bin/true"], "10s"))
    assert c.agent.checks() == {}


def test_check_ids_and_replace_existing_checks(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("foo1", check=Check.ttl("10s"), extra_checks=[Check.ttl("20s"), Check.ttl("30s")])
    assert set(c.agent.checks()) == {"service:foo1:1", "service:foo1:2", "service:foo1:3"}
    c.agent.check.ttl_pass("service:foo1:1")
    # re-registering keeps the status of a check that stays; without replace, others stay too
    c.agent.service.register("foo1", check=Check.ttl("10s"))
    checks = c.agent.checks()
    assert set(checks) == {"service:foo1", "service:foo1:1", "service:foo1:2", "service:foo1:3"}
    assert checks["service:foo1:1"]["Status"] == "passing"
    assert checks["service:foo1"]["Name"] == "Service 'foo1' check"
    c.agent.service.register("foo1", check=Check.ttl("10s"), replace_existing_checks=True)
    assert set(c.agent.checks()) == {"service:foo1"}
    assert c.agent.service.deregister("foo1") is True
    assert c.agent.checks() == {}


def test_ttl_updates_and_errors(catalog) -> None:
    c = catalog.client()
    c.agent.check.register("check", Check.ttl("10s"), notes="foo")
    checks = c.agent.checks()
    assert checks["check"]["Notes"] == "foo" and checks["check"]["Status"] == "critical"
    for call, status in ((c.agent.check.ttl_warn, "warning"), (c.agent.check.ttl_fail, "critical"),
                         (c.agent.check.ttl_pass, "passing")):
        assert call("check", notes=f"now {status}") is True
        got = c.agent.checks()["check"]
        assert (got["Status"], got["Output"]) == (status, f"now {status}")
    r = put(catalog, "/v1/agent/check/update/check", {"Status": "warning", "Output": "via update"})
    assert r.status_code == 200
    assert c.agent.checks()["check"]["Output"] == "via update"
    r = put(catalog, "/v1/agent/check/update/check", {"Status": "meh"})
    assert (r.status_code, r.text) == (400, "Invalid check status: 'meh'")
    r = put(catalog, "/v1/agent/check/update/check", {"Status": "passing", "Extra": 1})
    assert (r.status_code, r.text) == (400, 'Request decode failed: json: unknown field "Extra"')
    r = put(catalog, "/v1/agent/check/pass/nope")
    assert r.status_code == 404
    assert r.text == 'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
    c.agent.service.register("m", service_id="m1")
    c.agent.service.maintenance("m1", "true")
    r = put(catalog, "/v1/agent/check/pass/_service_maintenance:m1")
    assert (r.status_code, r.text) == (500, 'CheckID "_service_maintenance:m1" does not have associated TTL')
    assert c.agent.check.deregister("check") is True
    assert c.agent.check.deregister("check") is False


def test_ttl_expiry_turns_critical(catalog) -> None:
    c = catalog.client()
    c.agent.check.register("ttl_check", Check.ttl("300ms"))
    c.agent.check.ttl_pass("ttl_check", notes="all good")
    assert c.agent.checks()["ttl_check"]["Status"] == "passing"
    got = wait_for(lambda: (ch := c.agent.checks()["ttl_check"])["Status"] == "critical" and ch, timeout=5)
    assert got["Output"] == "TTL expired"


def test_check_register_for_unknown_service_is_404(catalog) -> None:
    c = catalog.client()
    # py-consul maps a 404 to False, as it does for Consul (agent_endpoint.go answers 404)
    assert c.agent.check.register("foo", Check.ttl("100ms"), service_id="foo1") is False
    r = put(catalog, "/v1/agent/check/register", {"Name": "foo", "TTL": "10s", "ServiceID": "foo1"})
    assert (r.status_code, r.text) == (404, 'ServiceID "foo1" does not exist')
    # an invalid check is still a 400 first, as in Consul (Validate runs before the lookup)
    r = put(catalog, "/v1/agent/check/register", {"Name": "foo", "ServiceID": "foo1"})
    assert (r.status_code, r.text) == (400, "Invalid check: TTL must be > 0 for TTL checks")
    assert c.agent.checks() == {}


def test_check_attached_to_service_shows_in_health(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("foo1")
    c.agent.check.register("foo", Check.ttl("10s"), service_id="foo1")
    c.agent.check.register("foo2", Check.ttl("10s"), service_id="foo1")
    _, nodes = c.health.service("foo1")
    assert {ch["ServiceID"] for n in nodes for ch in n["Checks"]} == {"foo1", ""}
    assert {ch["CheckID"] for n in nodes for ch in n["Checks"]} == {"foo", "foo2", "serfHealth"}


def test_service_and_node_maintenance(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("foo", check=Check.ttl("10s"))
    assert c.agent.service.maintenance("foo", "true", "test") is True
    check = c.agent.checks()["_service_maintenance:foo"]
    assert (check["Notes"], check["Status"], check["ServiceID"]) == ("test", "critical", "foo")
    assert c.health.service("foo", passing=True)[1] == []
    c.agent.service.maintenance("foo", "false")
    assert "_service_maintenance:foo" not in c.agent.checks()
    r = put(catalog, "/v1/agent/service/maintenance/foo")
    assert (r.status_code, r.text) == (400, "Missing value for enable")
    r = put(catalog, "/v1/agent/service/maintenance/nope", enable="true")
    assert r.status_code == 404
    c.agent.maintenance("true", "node work")
    assert c.agent.checks()["_node_maintenance"]["Notes"] == "node work"
    # a node check shows in every service of the node
    _, nodes = c.health.service("foo")
    assert "_node_maintenance" in {ch["CheckID"] for ch in nodes[0]["Checks"]}
    c.agent.maintenance("false")
    assert "_node_maintenance" not in c.agent.checks()


def test_self_members_and_status(catalog) -> None:
    c = catalog.client()
    me = c.agent.self()
    assert set(me) == {"Member", "xDS", "Stats", "Config", "Coord", "DebugConfig", "Meta"}
    assert me["Config"]["NodeName"] == "meshlet" and me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["Version"]
    leader = c.status.leader()
    assert leader and me["Stats"]["consul"]["leader_addr"] == leader
    assert leader in c.status.peers()
    members = c.agent.members()
    assert all(m["Status"] == 1 and m["Name"] and m["Tags"] is not None for m in members)
    assert me["Member"] in members
    assert all("dc1" in m["Name"] for m in c.agent.members(wan=True))


def test_agent_health_endpoints(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("api", service_id="api-1", check=Check.ttl("10s"))
    c.agent.service.register("api", service_id="api-2", check=Check.ttl("10s"))
    r = catalog.http.get(catalog.url + "/v1/agent/health/service/id/api-1")
    assert r.status_code == 503 and r.json()["AggregatedStatus"] == "critical"
    c.agent.check.ttl_pass("service:api-1")
    r = catalog.http.get(catalog.url + "/v1/agent/health/service/id/api-1?format=text")
    assert (r.status_code, r.text) == (200, "passing")
    c.agent.check.ttl_warn("service:api-2")
    r = catalog.http.get(catalog.url + "/v1/agent/health/service/name/api")
    assert r.status_code == 429 and len(r.json()) == 2
    assert catalog.http.get(catalog.url + "/v1/agent/health/service/id/nope").status_code == 404
