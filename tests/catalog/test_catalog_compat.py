"""Answers real Consul clients rely on, checked with py-consul over HTTP: catalog/services
filtering, query parameters for features this catalog does not have (peers, central
config, gateways), and the index header on every answer Consul gives one."""

from __future__ import annotations

import consul
import pytest

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

Check = consul.Check


def test_catalog_services_filter_gathers_tags_of_matching_instances_only(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-a", tags=["prod"], meta={"zone": "a"})
    c.agent.service.register("web", service_id="web-b", tags=["staging"], meta={"zone": "b"})
    c.agent.service.register("db", service_id="db-1", tags=["prod", "primary"])
    _, everything = c.catalog.services()
    assert everything == {"consul": [], "db": ["primary", "prod"], "web": ["prod", "staging"]}
    _, services = c.catalog.services(filter_expr='"prod" in ServiceTags and ServiceName == "web"')
    assert services == {"web": ["prod"]}
    _, services = c.catalog.services(filter_expr='ServiceMeta.zone == "b"')
    assert services == {"web": ["staging"]}
    _, services = c.catalog.services(filter_expr='"prod" in ServiceTags')
    assert services == {"db": ["primary", "prod"], "web": ["prod"]}
    r = catalog.http.get(catalog.url + "/v1/catalog/services", params={"filter": "ServiceName =="}, timeout=5)
    assert r.status_code == 400 and r.text.startswith("Failed to create boolean expression evaluator")


def test_filtered_catalog_services_watch_wakes_on_a_tag_change(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-a", tags=["prod"])
    index, services = c.catalog.services(filter_expr='"prod" in ServiceTags')
    assert services == {"web": ["prod"]}
    c.agent.service.register("web", service_id="web-b", tags=["prod", "canary"])
    new_index, services = c.catalog.services(filter_expr='"prod" in ServiceTags', index=index, wait="10s")
    assert int(new_index) > int(index) and services == {"web": ["canary", "prod"]}


def test_unknown_peer_answers_empty_with_index(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-1", check=Check.ttl("30s"))
    assert c.health.service("web")[1] != []
    index, nodes = c.health.service("web", peer="nowhere")
    assert nodes == [] and int(index) >= 1
    index, nodes = c.catalog.service("web", peer="nowhere")
    assert nodes == [] and int(index) >= 1
    for path, empty in (("/v1/catalog/services", {}), ("/v1/catalog/nodes", []), ("/v1/health/checks/web", []),
                        ("/v1/health/state/any", []), ("/v1/health/node/meshlet", [])):
        r = catalog.http.get(catalog.url + path, params={"peer": "nowhere"}, timeout=5)
        assert (r.status_code, r.json()) == (200, empty), path
        assert int(r.headers["X-Consul-Index"]) >= 1


def test_merge_central_config_is_accepted(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-1", port=80)
    plain = c.health.service("web")
    merged = c.health.service("web", merge_central_config=True)
    assert merged == plain and merged[1][0]["Service"]["Port"] == 80
    assert c.catalog.service("web", merge_central_config=True) == c.catalog.service("web")


def test_gateway_services_of_an_unknown_gateway_is_an_empty_list(catalog) -> None:
    c = catalog.client()
    assert c.catalog.gateway_services("ingress") == []
    r = catalog.http.get(catalog.url + "/v1/catalog/gateway-services/ingress", timeout=5)
    assert r.status_code == 200 and r.json() == [] and int(r.headers["X-Consul-Index"]) >= 1
    r = catalog.http.get(catalog.url + "/v1/catalog/gateway-services/", timeout=5)
    assert (r.status_code, r.text) == (400, "Missing gateway name")


async def test_the_same_answers_through_consul_aio(catalog) -> None:

    c = catalog.aio()
    try:
        assert await c.agent.service.register("web", service_id="web-a", tags=["prod"], port=80,
                                              connect={"SidecarService": {}})
        assert await c.agent.service.register("web", service_id="web-b", tags=["staging"], port=81)
        _, services = await c.catalog.services(filter_expr='"prod" in ServiceTags')
        assert services == {"web": ["prod"], "web-sidecar-proxy": ["prod"]}  # the sidecar inherits the tags
        assert (await c.health.service("web", peer="elsewhere"))[1] == []
        assert await c.catalog.gateway_services("gw") == []
        _, proxies = await c.health.connect("web")
        assert [p["Service"]["ID"] for p in proxies] == ["web-a-sidecar-proxy"]
        assert await c.agent.reload() is True
        assert await c.agent.check.register("orphan", Check.ttl("10s"), service_id="nope") is False
    finally:
        await c.close()


def test_node_services_lists_a_nodes_services(catalog) -> None:
    c = catalog.client()
    c.agent.service.register("web", service_id="web-1", port=80, tags=["a"])
    r = catalog.http.get(catalog.url + "/v1/catalog/node-services/meshlet", params={"merge-central-config": ""}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and int(r.headers["X-Consul-Index"]) >= 1
    assert body["Node"]["Node"] == "meshlet"
    assert {s["ID"]: (s["Port"], s["Tags"]) for s in body["Services"]} == {"consul": (8300, []), "web-1": (80, ["a"])}
    r = catalog.http.get(catalog.url + "/v1/catalog/node-services/nowhere", timeout=5)
    assert (r.status_code, r.json()) == (200, {"Node": None, "Services": None})
    assert int(r.headers["X-Consul-Index"]) >= 1
