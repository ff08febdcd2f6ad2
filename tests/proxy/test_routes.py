"""Route table: hosts, wildcards, longest prefix, strip, VIP listeners, conflicts,
spec-less services, and endpoint identity across rebuilds."""

from __future__ import annotations

import logging
import random

import pytest

import config
from discovery.view import CRITICAL, PASSING, WARNING, Instance, ServiceView, View
from proxy._routes import ClusterSettings, Endpoint, RouteTable, build_table


def inst(id: str, service: str, port: int, *, addr: str = "127.0.0.1", status: str = PASSING,
         weight: int = 1, ports: dict[str, int] | None = None) -> Instance:
    return Instance(id=id, service=service, node="n1", address=addr, port=port, status=status,
                    weight=weight, ports=ports if ports is not None else {"http": port})


def svc(name: str, *instances: Instance, spec: config.ServiceSpec | None = None,
        vip: str | None = None) -> ServiceView:
    return ServiceView(name=name, instances=tuple(instances), spec=spec, vip=vip,
                       revision="r1" if spec is not None else None)


def spec_from_yaml(text: str, name: str) -> config.ServiceSpec:
    """The spec as the Mirror hands it over: read back from the document `meshlet apply` stores."""
    spec = config.loads(text).services[name]
    return config.parse_service_document(config.canonical_json(config.service_document(spec, None)))[0]


def routes_of(**routes: object) -> config.Routes:
    return config.ServiceSpec.from_dict({"name": "s", "command": ["s"], "routes": routes}).routes


WEB_SPEC = spec_from_yaml("""
services:
  web:
    command: [web]
    ports:
      - {name: http, port: 0}
      - {name: admin, port: 0, vip_port: 8081}
      - {name: db, port: 5432, protocol: tcp}
    routes:
      hosts: [www.example.test, "*.apps.test"]
      paths:
        - {prefix: /}
        - {prefix: /api, strip_prefix: true}
        - {prefix: /api/v2/}
""", "web")

API_SPEC = spec_from_yaml("""
services:
  api:
    command: [api]
    ports: [{name: http, port: 0}]
    routes:
      hosts: ["*.b.apps.test", www.example.test]
      paths: [{prefix: /only}]
""", "api")


def make_view() -> View:
    web = svc("web", inst("web-1", "web", 8001, ports={"http": 8001, "admin": 9001, "db": 5432}),
              inst("web-2", "web", 8002, ports={"http": 8002, "admin": 9002, "db": 5433}, addr="127.0.0.2"),
              spec=WEB_SPEC, vip="127.10.0.2")
    api = svc("api", inst("api-1", "api", 8101), spec=API_SPEC, vip="127.10.0.3")
    legacy = svc("legacy", inst("legacy-1", "legacy", 9100, ports={}))
    return View(services={"web": web, "api": api, "legacy": legacy}, index=7)


@pytest.fixture
def table() -> RouteTable:
    return build_table(make_view(), rng=random.Random(1))


@pytest.mark.parametrize("host, path, service, prefix", [
    pytest.param(b"web.service.meshlet", b"/", "web", b"/", id="own-name"),
    pytest.param(b"web.service.meshlet", b"/index.html", "web", b"/", id="own-name-deep"),
    pytest.param(b"www.example.test", b"/x", "web", b"/", id="configured-host"),
    pytest.param(b"WWW.Example.TEST", b"/x", "web", b"/", id="case-insensitive"),
    pytest.param(b"www.example.test.", b"/x", "web", b"/", id="trailing-dot"),
    pytest.param(b"web.service.meshlet", b"/api", "web", b"/api", id="prefix-exact"),
    pytest.param(b"web.service.meshlet", b"/api/v1/users", "web", b"/api", id="longer-path"),
    pytest.param(b"web.service.meshlet", b"/api/v2/users", "web", b"/api/v2/", id="longest-prefix"),
    pytest.param(b"web.service.meshlet", b"/apix", "web", b"/api", id="plain-byte-prefix"),
    pytest.param(b"a.apps.test", b"/", "web", b"/", id="wildcard"),
    pytest.param(b"x.y.apps.test", b"/", "web", b"/", id="wildcard-deep"),
    pytest.param(b"c.b.apps.test", b"/only/x", "api", b"/only", id="longest-wildcard-wins"),
    pytest.param(b"legacy.service.meshlet", b"/anything", "legacy", b"/", id="spec-less-service"),
    pytest.param(b"api.service.meshlet", b"/only", "api", b"/only", id="other-service"),
    pytest.param(b"www.example.test", b"/only/a", "api", b"/only", id="shared-host-other-prefix"),
])
def test_match(table: RouteTable, host: bytes, path: bytes, service: str, prefix: bytes) -> None:
    route = table.match(host, path)
    assert route is not None
    assert (route.cluster.name, route.prefix) == (service, prefix)


@pytest.mark.parametrize("host, path", [
    pytest.param(b"unknown.test", b"/", id="unknown-host"),
    pytest.param(b"apps.test", b"/", id="wildcard-needs-a-label"),
    pytest.param(b"api.service.meshlet", b"/", id="known-host-no-prefix"),
    pytest.param(b"nosuch.service.meshlet", b"/x", id="unknown-service"),
])
def test_no_match(table: RouteTable, host: bytes, path: bytes) -> None:
    assert table.match(host, path) is None


def test_entry_routes_go_to_the_first_http_port(table: RouteTable) -> None:
    route = table.match(b"web.service.meshlet", b"/")
    assert route.cluster.port_name == "http"
    assert route.cluster.protocol == "http"
    assert sorted((e.address, e.port) for e in route.cluster.endpoints) == [("127.0.0.1", 8001), ("127.0.0.2", 8002)]


def test_spec_less_service_uses_catalog_port_and_defaults(table: RouteTable) -> None:
    c = table.match(b"legacy.service.meshlet", b"/").cluster
    assert c.port_name is None and c.protocol == "http"
    assert [(e.address, e.port) for e in c.endpoints] == [("127.0.0.1", 9100)]
    assert c.settings == ClusterSettings()
    assert not any(c is v for v in table.vip_listeners.values())


def test_vip_listeners_one_per_port(table: RouteTable) -> None:
    got = {k: (c.name, c.port_name, c.protocol) for k, c in table.vip_listeners.items()}
    assert got == {
        ("127.10.0.2", 80): ("web", "http", "http"),
        ("127.10.0.2", 8081): ("web", "admin", "http"),
        ("127.10.0.2", 5432): ("web", "db", "tcp"),
        ("127.10.0.3", 80): ("api", "http", "http"),
    }
    db = table.vip_listeners[("127.10.0.2", 5432)]
    assert sorted(e.port for e in db.endpoints) == [5432, 5433]


@pytest.mark.parametrize("path, prefix, strip, upstream", [
    (b"/api/users", b"/api", True, b"/users"),
    (b"/api", b"/api", True, b"/"),
    (b"/api?q=1", b"/api", True, b"/?q=1"),
    (b"/api/x", b"/api/", True, b"/x"),
    (b"/api/users", b"/api", False, b"/api/users"),
])
def test_strip_prefix(path: bytes, prefix: bytes, strip: bool, upstream: bytes) -> None:
    spec = spec_from_yaml(f"""
services:
  s:
    command: [s]
    ports: [{{name: http}}]
    routes: {{paths: [{{prefix: "{prefix.decode()}", strip_prefix: {str(strip).lower()}}}]}}
""", "s")
    t = build_table(View(services={"s": svc("s", inst("s-1", "s", 80), spec=spec)}))
    route = t.match(b"s.service.meshlet", path)
    assert route.rewrite(path) == upstream


def test_custom_domain() -> None:
    t = build_table(make_view(), domain="Mesh.Local.")
    assert t.match(b"web.service.mesh.local", b"/").cluster.name == "web"
    assert t.match(b"web.service.meshlet", b"/") is None


def test_service_without_http_port_has_no_host_route() -> None:
    spec = spec_from_yaml("""
services:
  db:
    command: [db]
    ports: [{name: pg, port: 5432, protocol: tcp}]
""", "db")
    t = build_table(View(services={"db": svc("db", inst("db-1", "db", 5432, ports={"pg": 5432}), spec=spec,
                                                vip="127.10.0.9")}))
    assert t.match(b"db.service.meshlet", b"/") is None
    assert t.vip_listeners[("127.10.0.9", 5432)].protocol == "tcp"


def conflict_view() -> View:
    spec = spec_from_yaml("""
services:
  s:
    command: [s]
    ports: [{name: http}]
    routes: {hosts: [shared.test, zeta.service.meshlet]}
""", "s")
    return View(services={
        name: svc(name, inst(f"{name}-1", name, 8000 + i), spec=spec)
        for i, name in enumerate(["zeta", "alpha", "mid"])
    })


def test_conflict_first_service_by_name_wins_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meshlet.proxy.routes"):
        t = build_table(conflict_view())
    assert t.match(b"shared.test", b"/").cluster.name == "alpha"
    # A service's own name is never taken by another service's configured host.
    assert t.match(b"zeta.service.meshlet", b"/").cluster.name == "zeta"
    assert len(t.conflicts) == 4  # shared.test x2, zeta.service.meshlet x2
    assert any("shared.test" in m and "alpha wins" in m for m in t.conflicts)
    logged = [r for r in caplog.records if "route conflict" in r.getMessage()]
    assert len(logged) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meshlet.proxy.routes"):
        t2 = build_table(conflict_view(), previous=t)
    assert t2.match(b"shared.test", b"/").cluster.name == "alpha"
    assert not [r for r in caplog.records if "route conflict" in r.getMessage()]
    assert t2.to_json()["conflicts"] == list(t.conflicts)


def test_only_passing_instances_become_endpoints() -> None:
    s = svc("s", inst("a", "s", 8001), inst("b", "s", 8002, status=WARNING),
            inst("c", "s", 8003, status=CRITICAL))
    t = build_table(View(services={"s": s}))
    c = t.cluster("s")
    assert [e.instance_id for e in c.endpoints] == ["a"]


def test_service_with_no_ready_instance_routes_but_picks_none() -> None:
    s = svc("s", inst("a", "s", 8001, status=CRITICAL))
    t = build_table(View(services={"s": s}))
    route = t.match(b"s.service.meshlet", b"/")
    assert route is not None and route.cluster.pick() is None


def test_endpoint_stats_survive_rebuild_and_unchanged_clusters_are_reused() -> None:
    view1 = View(services={"s": svc("s", inst("a", "s", 8001), inst("b", "s", 8002)),
                           "t": svc("t", inst("t1", "t", 8100))})
    t1 = build_table(view1)
    c1 = t1.cluster("s")
    a1 = next(e for e in c1.endpoints if e.instance_id == "a")
    c1.begin(a1)
    c1.begin(a1)
    assert c1.try_acquire_pending()
    view2 = View(services={"s": svc("s", inst("a", "s", 8001), inst("b", "s", 8002), inst("c", "s", 8003)),
                           "t": svc("t", inst("t1", "t", 8100))})
    t2 = build_table(view2, previous=t1)
    c2 = t2.cluster("s")
    assert c2 is not c1
    a2 = next(e for e in c2.endpoints if e.instance_id == "a")
    assert a2 is a1 and a2.active == 2
    assert c2.pending == 1  # admitted on the old snapshot, still counted
    c1.release_pending()  # released on the old snapshot the request started on
    assert c2.pending == 0
    assert t2.cluster("t") is t1.cluster("t")  # nothing changed: same object


def test_moved_instance_gets_fresh_stats_and_weight_changes_keep_them() -> None:
    t1 = build_table(View(services={"s": svc("s", inst("a", "s", 8001), inst("b", "s", 8002))}))
    a1, b1 = t1.cluster("s").endpoints
    a1.active = 5
    b1.active = 3
    t2 = build_table(View(services={"s": svc("s", inst("a", "s", 8001, addr="127.0.0.9"),
                                             inst("b", "s", 8002, weight=10))}), previous=t1)
    a2, b2 = t2.cluster("s").endpoints
    assert a2 is not a1 and a2.active == 0
    assert b2 is b1 and b2.weight == 10 and b2.active == 3


def test_removed_service_disappears() -> None:
    t1 = build_table(make_view())
    t2 = build_table(View(services={"legacy": make_view().services["legacy"]}), previous=t1)
    assert t2.match(b"web.service.meshlet", b"/") is None
    assert t2.vip_listeners == {}


def test_settings_from_the_normalised_document() -> None:
    spec = spec_from_yaml("""
services:
  s:
    command: [s]
    ports: [{name: http}]
    routes:
      policy: ring_hash
      hash_on: {cookie: sid}
      retries: {attempts: 4, per_try_timeout: 250ms, budget_percent: 50, min_concurrent: 1}
      timeouts: {connect: 2s, request: 1m, idle: 5s}
      outlier: {consecutive_5xx: 3, consecutive_gateway_failure: 0, base_ejection_time: 10s,
                max_ejection_percent: 50, interval: 1s}
      max_pending: 7
""", "s")
    s = ClusterSettings.from_routes(spec.routes)
    assert s.policy == "ring_hash" and s.hash_on == ("cookie", "sid")
    assert (s.retries.attempts, s.retries.per_try_timeout, s.retries.budget_percent, s.retries.min_concurrent) \
        == (4, 0.25, 50, 1)
    assert (s.timeouts.connect, s.timeouts.request, s.timeouts.idle) == (2.0, 60.0, 5.0)
    o = s.outlier
    assert (o.consecutive_5xx, o.consecutive_gateway_failure, o.base_ejection_time, o.max_ejection_percent,
            o.interval, o.max_ejection_time) == (3, 0, 10.0, 50, 1.0, 300.0)
    assert s.max_pending == 7


@pytest.mark.parametrize("hash_on, expected", [
    ({"header": "X-User", "cookie": None, "source_ip": False}, ("header", "x-user")),
    ({"cookie": "sid"}, ("cookie", "sid")),
    ({"header": None, "cookie": None, "source_ip": True}, ("source_ip", None)),
])
def test_hash_on_forms(hash_on, expected) -> None:
    assert ClusterSettings.from_routes(routes_of(policy="ring_hash", hash_on=hash_on)).hash_on == expected


def test_defaults_match_envoy() -> None:
    s = ClusterSettings.from_routes(routes_of())
    assert s == ClusterSettings()   # one set of defaults: config's
    assert s.policy == "least_request" and s.hash_on is None
    assert (s.retries.attempts, s.retries.per_try_timeout, s.retries.budget_percent, s.retries.min_concurrent) \
        == (2, 0.0, 20, 3)
    assert (s.timeouts.connect, s.timeouts.request, s.timeouts.idle) == (1.0, 15.0, 60.0)
    assert (s.outlier.consecutive_5xx, s.outlier.consecutive_gateway_failure, s.outlier.base_ejection_time,
            s.outlier.max_ejection_percent, s.outlier.max_ejection_time) == (5, 5, 30.0, 10, 300.0)
    assert s.max_pending == 1024


def test_policy_names_are_exactly_those_config_accepts() -> None:
    """The proxy looks the policy up by name: config must accept no name it lacks."""
    import re
    from proxy._balance import POLICIES
    with pytest.raises(config.ConfigError) as info:
        routes_of(policy="fastest")
    accepted = re.search(r"expected (.*), got", str(info.value)).group(1).replace(" or ", ", ").split(", ")
    assert sorted(accepted) == sorted(POLICIES)
    assert ClusterSettings().policy in POLICIES


def test_to_json_lists_services_hosts_and_endpoints(table: RouteTable) -> None:
    doc = table.to_json()
    assert doc["index"] == 7
    assert {r["prefix"] for r in doc["hosts"]["web.service.meshlet"]} == {"/", "/api", "/api/v2/"}
    assert "*.apps.test" in doc["hosts"]
    web = doc["services"]["web"]
    assert web["vip"] == "127.10.0.2"
    http = next(c for c in web["clusters"] if c["port_name"] == "http")
    assert {(e["address"], e["port"], e["weight"], e["active"], e["ejected"]) for e in http["endpoints"]} == {
        ("127.0.0.1", 8001, 1, 0, False), ("127.0.0.2", 8002, 1, 0, False)}
    assert all(e["ewma"] == 30.0 for e in http["endpoints"])
    assert {"listen": "127.10.0.2:5432", "service": "web", "port_name": "db", "protocol": "tcp"} \
        in doc["vip_listeners"]


def test_endpoint_repr_is_readable() -> None:
    assert repr(Endpoint("a:1", "127.0.0.1", 1, 3)) == "<Endpoint a:1 127.0.0.1:1 w=3 active=0>"


def test_an_applied_spec_change_takes_effect_on_the_next_build() -> None:
    def view(routes: str, revision: str) -> View:
        spec = spec_from_yaml(f"""
services:
  s:
    command: [s]
    ports: [{{name: http}}]
    routes: {routes}
""", "s")
        return View(services={"s": ServiceView("s", (inst("s-1", "s", 8001), inst("s-2", "s", 8002)), spec=spec,
                                               revision=revision)})

    t1 = build_table(view("{policy: round_robin}", "r1"))
    t2 = build_table(view("{policy: ring_hash, hash_on: {source_ip: true}, max_pending: 5, hosts: [new.test]}",
                          "r2"), previous=t1)
    c1, c2 = t1.cluster("s"), t2.cluster("s")
    assert (c2.settings.policy, c2.settings.hash_on, c2.settings.max_pending) == ("ring_hash", ("source_ip", None), 5)
    assert c2.endpoints == c1.endpoints  # the same Endpoint objects, stats intact
    assert t2.match(b"new.test", b"/").cluster is c2
    assert t1.match(b"new.test", b"/") is None  # the old table is never written to
    assert t2.to_json()["services"]["s"]["revision"] == "r2"
