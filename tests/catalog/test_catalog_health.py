"""/v1/health/* and /v1/catalog/* with the real py-consul client."""

from __future__ import annotations

import consul
import pytest
from catalog_helpers import shared_catalog  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

Check = consul.Check


def test_health_service_order_passing_and_tags(catalog) -> None:
    c = catalog.client()
    assert c.health.service("foo")[1] == []
    c.agent.service.register("foo", service_id="foo:2", check=Check.ttl("10s"), tags=["a"])
    c.agent.service.register("foo", service_id="foo:1", check=Check.ttl("10s"), tags=["a", "b"])
    _, nodes = c.health.service("foo")
    assert [n["Service"]["ID"] for n in nodes] == ["foo:1", "foo:2"]
    entry = nodes[0]
    assert set(entry) == {"Node", "Service", "Checks"}
    assert entry["Node"]["Node"] == "meshlet" and entry["Node"]["Address"] == "127.0.0.1"
    assert [ch["CheckID"] for ch in entry["Checks"]] == ["serfHealth", "service:foo:1"]
    assert entry["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    assert c.health.service("foo", passing=True)[1] == []
    c.agent.check.ttl_pass("service:foo:1")
    assert [n["Service"]["ID"] for n in c.health.service("foo", passing=True)[1]] == ["foo:1"]
    c.agent.check.ttl_warn("service:foo:2")
    assert [n["Service"]["ID"] for n in c.health.service("foo", passing=True)[1]] == ["foo:1"]
    assert [n["Service"]["ID"] for n in c.health.service("foo", tag="b")[1]] == ["foo:1"]
    assert [n["Service"]["ID"] for n in c.health.service("foo", tag=["a", "b"])[1]] == ["foo:1"]
    assert [n["Service"]["ID"] for n in c.health.service("foo", tag="a")[1]] == ["foo:1", "foo:2"]
    assert c.health.service("foo", tag=["a", "zzz"])[1] == []


def test_passing_filter_does_not_change_index(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("foo", check=Check.ttl("10s"))
    index_all, _ = c.health.service("foo")
    index_passing, nodes = c.health.service("foo", passing=True)
    assert nodes == [] and index_passing == index_all
    r = catalog.http.get(catalog.url + "/v1/health/service/foo?passing=maybe")
    assert (r.status_code, r.text) == (400, "Invalid value for ?passing")


def test_health_state_checks_and_node(catalog) -> None:
    c = catalog.client()
    assert [n["ServiceID"] for n in c.health.state("any")[1]] == [""]
    c.agent.service.register("foo", service_id="foo:1", check=Check.ttl("10s"))
    c.agent.service.register("foo", service_id="foo:2", check=Check.ttl("10s"))
    assert {n["ServiceID"] for n in c.health.state("any")[1]} == {"", "foo:1", "foo:2"}
    assert {n["ServiceID"] for n in c.health.state("critical")[1]} == {"foo:1", "foo:2"}
    c.agent.check.ttl_pass("service:foo:1")
    assert {n["ServiceID"] for n in c.health.state("passing")[1]} == {"", "foo:1"}
    assert c.health.state("warning")[1] == []
    r = catalog.http.get(catalog.url + "/v1/health/state/bogus")
    assert (r.status_code, r.text) == (400, "Invalid check state")
    assert [ch["CheckID"] for ch in c.health.checks("foo")[1]] == ["service:foo:1", "service:foo:2"]
    assert c.health.checks("nothing")[1] == []
    node = c.agent.self()["Config"]["NodeName"]
    _, checks = c.health.node(node)
    assert {ch["CheckID"] for ch in checks} == {"serfHealth", "service:foo:1", "service:foo:2"}
    assert c.health.node("no-such-node")[1] == []


@pytest.mark.parametrize(
    "expr, ids",
    [
        pytest.param('"tag:foo:1" in Service.Tags', ["foo:1"], id="in-tags"),
        pytest.param('"tag:does:not:exist" in Service.Tags', [], id="no-match"),
        pytest.param('Service.ID == "foo:2"', ["foo:2"], id="equal"),
        pytest.param('Service.ID != "foo:2" and Node.Node == "meshlet"', ["foo:1"], id="and"),
        pytest.param('Service.Meta.slot == "1" or Service.Port == 8002', ["foo:1", "foo:2"], id="or-meta-number"),
        pytest.param('Service.Tags is empty', [], id="is-empty"),
        pytest.param('Service.ID matches "2$"', ["foo:2"], id="matches"),
        pytest.param('not (Service.ID contains "1")', ["foo:2"], id="not-contains"),
    ],
)
def test_health_service_filter(shared_catalog, expr: str, ids: list[str]) -> None:
    c = shared_catalog.client()
    c.agent.service.register("foo", service_id="foo:1", tags=["tag:foo:1"], meta={"slot": "1"}, port=8001)
    c.agent.service.register("foo", service_id="foo:2", tags=["tag:foo:2"], meta={"slot": "2"}, port=8002)
    assert [n["Service"]["ID"] for n in c.health.service("foo", filter_expr=expr)[1]] == ids


def test_bad_filter_is_400(catalog) -> None:
    r = catalog.http.get(catalog.url + "/v1/health/service/foo", params={"filter": "Service.ID =="})
    assert r.status_code == 400
    assert r.text.startswith("Failed to create boolean expression evaluator")


def test_other_filters(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("foobar", service_id="foobar", check=Check.ttl("10s"))
    assert [ch["CheckID"] for ch in c.health.checks("foobar", filter_expr='CheckID == "service:foobar"')[1]] == [
        "service:foobar"
    ]
    assert c.health.state("critical", filter_expr='ServiceID == "nope"')[1] == []
    assert list(c.agent.services(filter_expr='Service == "foobar"')) == ["foobar"]
    assert c.agent.checks(filter_expr='Status == "passing"') == {}


def test_catalog_register_list_and_deregister(catalog) -> None:
    c = catalog.client()
    _, nodes = c.catalog.nodes()
    assert len(nodes) == 1
    current = nodes[0]
    assert c.catalog.datacenters() == ["dc1"]
    with pytest.raises(consul.ConsulException):
        c.catalog.register("foo", "10.1.10.11", dc="dc2")
    assert c.catalog.register("n1", "10.1.10.11", service={"service": "s1"}, check={"name": "c1"}) is True
    assert c.catalog.register("n1", "10.1.10.11", service={"service": "s2"}) is True
    assert c.catalog.register("n2", "10.1.10.12", service={"service": "s1", "tags": ["master"]}) is True
    with pytest.raises(consul.ConsulException):
        c.catalog.nodes(dc="dc2")
    _, nodes = c.catalog.nodes()
    nodes.remove(current)
    assert [x["Node"] for x in nodes] == ["n1", "n2"]
    with pytest.raises(consul.ConsulException):
        c.catalog.services(dc="dc2")
    assert c.catalog.services()[1] == {"s1": ["master"], "s2": [], "consul": []}
    _, node = c.catalog.node("n1")
    assert set(node["Services"]) == {"s1", "s2"}
    assert c.catalog.node("n3")[1] is None
    _, entries = c.catalog.service("s1")
    assert {x["Node"] for x in entries} == {"n1", "n2"}
    assert {x["Address"] for x in entries} == {"10.1.10.11", "10.1.10.12"}
    assert {x["Node"] for x in c.catalog.service("s1", tag="master")[1]} == {"n2"}
    # a check registered through the catalog is not run: it stays as given (critical)
    assert {ch["CheckID"]: ch["Status"] for ch in c.health.node("n1")[1]} == {"c1": "critical"}
    assert c.catalog.deregister("n1", check_id="c1") is True
    assert c.catalog.deregister("n2", service_id="s1") is True
    _, nodes = c.catalog.nodes()
    nodes.remove(current)
    assert [x["Node"] for x in nodes] == ["n1", "n2"]
    assert {x["Node"] for x in c.catalog.service("s1")[1]} == {"n1"}
    assert c.catalog.deregister("n1") is True
    assert c.catalog.deregister("n2") is True
    _, nodes = c.catalog.nodes()
    assert nodes == [current]
    assert c.catalog.services()[1] == {"consul": []}


@pytest.mark.parametrize(
    "body, status",
    [
        pytest.param({"Address": "10.0.0.1"}, 400, id="missing-node"),
        pytest.param({"Node": "n1"}, 400, id="missing-address"),
        pytest.param({"Node": "n1", "Address": "10.0.0.1", "Check": {"Name": "c", "ServiceID": "nope"}}, 500,
                     id="check-for-missing-service"),
        pytest.param({"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc9"}, 500, id="other-dc"),
        pytest.param({"Node": "n1", "Address": "10.0.0.1", "Service": {"Name": "s"}}, 400, id="unknown-field"),
    ],
)
def test_catalog_register_rejects(shared_catalog, body: dict, status: int) -> None:
    r = shared_catalog.http.put(shared_catalog.url + "/v1/catalog/register", json=body)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    assert [n["Node"] for n in shared_catalog.client().catalog.nodes()[1]] == ["meshlet"]  # nothing half-written


def test_catalog_services_lists_consul_and_tags(catalog) -> None:
    c = catalog.client()
    assert c.catalog.services()[1] == {"consul": []}
    c.agent.service.register("web", service_id="web-1", tags=["v1"])
    c.agent.service.register("web", service_id="web-2", tags=["v2", "v1"])
    assert c.catalog.services()[1] == {"consul": [], "web": ["v1", "v2"]}
    assert [x["ServiceID"] for x in c.catalog.service("web", tag="v2")[1]] == ["web-2"]
    _, consul_nodes = c.health.service("consul")
    assert [n["Service"]["Port"] for n in consul_nodes] == [8300]
