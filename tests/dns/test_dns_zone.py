"""The pure zone: build_zone(view, settings) and answer(zone, qname, qtype), no sockets.

Each row reads "question -> rcode, answer data, authority" against one hand-built View.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

import config
from discovery.dns import Settings, answer, build_zone
from discovery.dns._records import (
    A, AAAA, ANY, AXFR, NOERROR, NOTIMP, NS, NXDOMAIN, PTR, REFUSED, SOA, SRV, TXT,
)
from discovery.view import CRITICAL, PASSING, WARNING, Instance, Node, ServiceView, View


def inst(service: str, n: int, address: str = "127.0.0.1", *, node: str = "local", port: int = 0,
         status: str = PASSING, tags: tuple[str, ...] = (), weight: int = 1) -> Instance:
    return Instance(id=f"{service}-{n}", service=service, node=node, address=address,
                    port=port or 20000 + n, status=status, tags=tags, weight=weight)


def spec(mode: str | None = None, ttl: float | None = None, tags: list[str] | None = None) -> config.ServiceSpec:
    return config.ServiceSpec.from_dict({"name": "s", "command": ["s"], "dns": {"mode": mode, "ttl": ttl},
                                         "tags": tags or [], "ports": [{"name": "http", "port": 0, "vip_port": 80}]})


VIEW = View(
    services={
        # VIP service: two passing (tags v1/v2), one critical, one warning
        "web": ServiceView("web", (
            inst("web", 1, tags=("v1",)),
            inst("web", 2, "127.0.0.2", node="n2", tags=("v2", "canary")),
            inst("web", 3, "127.0.0.3", status=CRITICAL, tags=("v1",)),
            inst("web", 4, "127.0.0.4", status=WARNING, tags=("v1",)),
        ), spec=spec(), vip="127.10.0.2", revision="abc"),
        # no VIP, endpoints only
        "db": ServiceView("db", (inst("db", 1, "127.0.0.5", node="n2", port=5432),)),
        # VIP but nothing ready: the name stays (no NXDOMAIN), A answers the VIP
        "idle": ServiceView("idle", (inst("idle", 1, status=CRITICAL),), spec=spec(), vip="127.10.0.3"),
        # no VIP and nothing ready: does not exist
        "down": ServiceView("down", (inst("down", 1, status=CRITICAL),)),
        # per-service override: endpoints mode and a TTL of 30 s
        "api": ServiceView("api", (inst("api", 1, "127.0.0.6"), inst("api", 2, "127.0.0.7"),
                                   inst("api", 3, "127.0.0.8", weight=0)),
                           spec=spec(mode="endpoints", ttl=30.0), vip="127.10.0.4"),
        "v6": ServiceView("v6", (inst("v6", 1, "::1"),), spec=spec(), vip="fd00::10"),
        "Bad_Name!": ServiceView("Bad_Name!", (inst("bad", 1),)),
    },
    nodes={"local": Node("local", "127.0.0.1"), "n2": Node("n2", "127.0.0.2", {"rack": "r1"})},
    index=7,
)
ZONE = build_zone(VIEW, Settings())


def run(qname: str, qtype: int, zone=ZONE):
    return answer(zone, qname, qtype)


def data(ans, rtype: int | None = None) -> list:
    return sorted(str(r.rdata) if r.rtype != SRV else (r.rdata.port, r.rdata.target)
                  for r in ans.answers if rtype is None or r.rtype == rtype)


CASES = [
    # name form, type -> rcode, sorted answer data
    pytest.param("web.service.meshlet", A, NOERROR, ["127.10.0.2"], id="vip-A"),
    pytest.param("WEB.Service.MeshLet.", A, NOERROR, ["127.10.0.2"], id="case-insensitive"),
    pytest.param("web.service.meshlet", AAAA, NOERROR, [], id="vip-AAAA-nodata"),
    pytest.param("web.service.meshlet", SRV, NOERROR,
                 [(20001, "local.node.meshlet"), (20002, "n2.node.meshlet")], id="srv-ready-only"),
    pytest.param("_web._tcp.service.meshlet", SRV, NOERROR,
                 [(20001, "local.node.meshlet"), (20002, "n2.node.meshlet")], id="rfc2782"),
    pytest.param("_web._tcp.meshlet", SRV, NOERROR,
                 [(20001, "local.node.meshlet"), (20002, "n2.node.meshlet")], id="rfc2782-no-service-label"),
    pytest.param("v1.web.service.meshlet", A, NOERROR, ["127.0.0.1"], id="tag-A-endpoints"),
    pytest.param("v1.web.service.meshlet", SRV, NOERROR, [(20001, "local.node.meshlet")], id="tag-srv"),
    pytest.param("_web._canary.service.meshlet", SRV, NOERROR, [(20002, "n2.node.meshlet")], id="rfc2782-tag"),
    pytest.param("_web._canary.meshlet", SRV, NOERROR, [(20002, "n2.node.meshlet")], id="rfc2782-tag-short"),
    pytest.param("v3.web.service.meshlet", A, NXDOMAIN, [], id="unknown-tag"),
    pytest.param("db.service.meshlet", A, NOERROR, ["127.0.0.5"], id="no-vip-endpoints"),
    pytest.param("db.service.meshlet", SRV, NOERROR, [(5432, "7f000005.addr.meshlet")], id="srv-off-node-addr"),
    pytest.param("idle.service.meshlet", A, NOERROR, ["127.10.0.3"], id="vip-without-ready"),
    pytest.param("idle.service.meshlet", SRV, NOERROR, [], id="vip-without-ready-srv-nodata"),
    pytest.param("down.service.meshlet", A, NXDOMAIN, [], id="nothing-ready-nxdomain"),
    pytest.param("nope.service.meshlet", A, NXDOMAIN, [], id="unknown-service"),
    pytest.param("api.service.meshlet", A, NOERROR, ["127.0.0.6", "127.0.0.7"], id="per-service-endpoints"),
    pytest.param("v6.service.meshlet", AAAA, NOERROR, ["fd00::10"], id="vip-v6"),
    pytest.param("v6.service.meshlet", A, NOERROR, [], id="vip-v6-A-nodata"),
    pytest.param("local.node.meshlet", A, NOERROR, ["127.0.0.1"], id="node-A"),
    pytest.param("n2.node.meshlet", TXT, NOERROR, ["('rack=r1',)"], id="node-meta-txt"),
    pytest.param("n2.node.meshlet", SRV, NOERROR, [], id="node-other-type-nodata"),
    pytest.param("ghost.node.meshlet", A, NXDOMAIN, [], id="unknown-node"),
    pytest.param("7f000009.addr.meshlet", A, NOERROR, ["127.0.0.9"], id="addr-v4"),
    pytest.param("0" * 31 + "1.addr.meshlet", AAAA, NOERROR, ["::1"], id="addr-v6"),
    pytest.param("zz.addr.meshlet", A, NXDOMAIN, [], id="addr-bad-hex"),
    pytest.param("meshlet", SOA, NOERROR, ["SoaData(mname='ns.meshlet', rname='hostmaster.meshlet', "
                                           "serial=7, refresh=3600, retry=600, expire=86400, minimum=5)"], id="soa"),
    pytest.param("meshlet", NS, NOERROR, ["ns.meshlet"], id="ns"),
    pytest.param("meshlet", A, NOERROR, [], id="apex-A-nodata"),
    pytest.param("service.meshlet", A, NOERROR, [], id="empty-non-terminal"),
    pytest.param("2.0.10.127.in-addr.arpa", PTR, NOERROR, ["web.service.meshlet"], id="ptr-vip"),
    pytest.param("9.9.10.127.in-addr.arpa", PTR, NXDOMAIN, [], id="ptr-miss-no-recursors"),
    pytest.param("example.com", A, REFUSED, [], id="outside-no-recursors"),
    pytest.param("web.service.meshlet", AXFR, NOTIMP, [], id="axfr"),
]


@pytest.mark.parametrize("qname,qtype,rcode,expected", CASES)
def test_answer_table(qname: str, qtype: int, rcode: int, expected: list) -> None:
    ans = run(qname, qtype)
    assert ans.rcode == rcode
    assert data(ans) == expected
    negative = rcode == NXDOMAIN or (rcode == NOERROR and not expected)
    soa_in_authority = [r for r in ans.authority if r.rtype == SOA]
    assert bool(soa_in_authority) == negative  # RFC 2308: negative answers carry the SOA
    if negative:
        assert soa_in_authority[0].ttl == 5 and soa_in_authority[0].rdata.minimum == 5


def test_answer_owner_echoes_the_question_spelling() -> None:
    ans = run("Web.SERVICE.meshlet.", A)
    assert [r.name for r in ans.answers] == ["Web.SERVICE.meshlet"]


def test_srv_targets_resolve_in_additional() -> None:
    ans = run("web.service.meshlet", SRV)
    extra = {(r.name, str(r.rdata)) for r in ans.additional}
    assert extra == {("local.node.meshlet", "127.0.0.1"), ("n2.node.meshlet", "127.0.0.2")}


def test_srv_target_off_node_uses_addr_name() -> None:
    view = View(services={"x": ServiceView("x", (inst("x", 1, "127.0.0.44"),))},
                nodes={"local": Node("local", "127.0.0.1")})
    ans = answer(build_zone(view, Settings()), "x.service.meshlet", SRV)
    assert [r.rdata.target for r in ans.answers] == ["7f00002c.addr.meshlet"]
    assert [(r.name, r.rdata) for r in ans.additional] == [("7f00002c.addr.meshlet", "127.0.0.44")]


def test_any_returns_every_type_at_the_name() -> None:
    ans = run("db.service.meshlet", ANY)
    assert {r.rtype for r in ans.answers} == {A, SRV}
    assert ans.additional


def test_include_warning_adds_warning_instances() -> None:
    zone = build_zone(VIEW, Settings(include_warning=True, mode="endpoints"))
    assert data(answer(zone, "web.service.meshlet", A)) == ["127.0.0.1", "127.0.0.2", "127.0.0.4"]
    strict = build_zone(VIEW, Settings(mode="endpoints"))
    assert data(answer(strict, "web.service.meshlet", A)) == ["127.0.0.1", "127.0.0.2"]


def test_mesh_wide_endpoints_mode_and_spec_override() -> None:
    zone = build_zone(VIEW, Settings(mode="endpoints"))
    assert data(answer(zone, "web.service.meshlet", A)) == ["127.0.0.1", "127.0.0.2"]
    vip_zone = build_zone(VIEW, Settings(mode="vip"))  # api's spec says endpoints
    assert data(answer(vip_zone, "api.service.meshlet", A)) == ["127.0.0.6", "127.0.0.7"]


def test_weight_zero_is_draining_and_srv_carries_weights() -> None:
    ans = run("api.service.meshlet", SRV)
    assert sorted(r.rdata.weight for r in ans.answers) == [1, 1]
    view = View(services={"w": ServiceView("w", (inst("w", 1, weight=3), inst("w", 2, weight=0)))})
    srv = answer(build_zone(view, Settings()), "w.service.meshlet", SRV)
    assert [(r.rdata.port, r.rdata.weight) for r in srv.answers] == [(20001, 3)]


def test_ttls_default_and_overrides() -> None:
    assert {r.ttl for r in run("web.service.meshlet", A).answers} == {0}
    assert {r.ttl for r in run("api.service.meshlet", A).answers} == {30}
    zone = build_zone(VIEW, Settings(ttl=10, negative_ttl=60))
    assert {r.ttl for r in answer(zone, "web.service.meshlet", SRV).answers} == {10}
    neg = answer(zone, "nope.service.meshlet", A)
    assert neg.authority[0].ttl == 60 and neg.authority[0].rdata.minimum == 60


def test_custom_domain() -> None:
    zone = build_zone(VIEW, Settings(domain="Mesh.Example."))
    assert data(answer(zone, "web.service.mesh.example", A)) == ["127.10.0.2"]
    assert answer(zone, "web.service.meshlet", A).rcode == REFUSED


def test_forwarding_flag_sends_foreign_names_and_reverse_misses_out() -> None:
    zone = build_zone(VIEW, Settings(forwarding=True))
    assert answer(zone, "example.com", A).forward
    assert answer(zone, "9.9.10.127.in-addr.arpa", PTR).forward
    assert not answer(zone, "2.0.10.127.in-addr.arpa", PTR).forward
    assert answer(zone, "nope.service.meshlet", A).rcode == NXDOMAIN  # our domain never leaves


def test_invalid_service_names_are_skipped_not_fatal() -> None:
    assert "Bad_Name!" not in ZONE.services
    assert "web" in ZONE.services


def test_ns_glue_from_listen_addresses() -> None:
    zone = build_zone(View(), Settings(ns_addresses=("127.0.0.53",)))
    ns = answer(zone, "meshlet", NS)
    assert [(r.name, r.rdata) for r in ns.additional] == [("ns.meshlet", "127.0.0.53")]
    assert data(answer(zone, "ns.meshlet", A)) == ["127.0.0.53"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        Settings(mode="roundrobin")
    with pytest.raises(ValueError, match="domain"):
        Settings(domain="bad domain")


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["web", "service", "node", "meshlet", "addr", "_tcp", "_web", "v1", "x", "",
                                 "in-addr", "arpa", "127", "2", "0", "10"]), max_size=6),
       st.sampled_from([A, AAAA, SRV, SOA, NS, PTR, TXT, ANY, 99]))
def test_answer_is_total_and_consistent(labels: list[str], qtype: int) -> None:
    """Any name gets an answer (never an exception); NXDOMAIN never carries records, and an
    answer with records always carries the asked type (or any type for ANY)."""
    ans = answer(ZONE, ".".join(labels), qtype)
    assert ans.rcode in (NOERROR, NXDOMAIN, REFUSED, NOTIMP)
    if ans.rcode == NXDOMAIN:
        assert not ans.answers
    for r in ans.answers:
        assert qtype == ANY or r.rtype == qtype


def test_spec_tags_apply_to_instances_of_the_applied_revision() -> None:
    old = Instance("s-1", "s", "local", "127.0.0.1", 1, meta={"revision": "old"})
    new = Instance("s-2", "s", "local", "127.0.0.2", 2, meta={"revision": "new"}, tags=("own",))
    foreign = Instance("s-3", "s", "local", "127.0.0.3", 3)  # registered by another tool
    view = View(services={"s": ServiceView("s", (old, new, foreign), spec=spec(tags=["blue"]), revision="new")})
    zone = build_zone(view, Settings())
    assert data(answer(zone, "blue.s.service.meshlet", A)) == ["127.0.0.2", "127.0.0.3"]
    assert data(answer(zone, "own.s.service.meshlet", A)) == ["127.0.0.2"]


def test_rebuild_reuses_unchanged_services_and_matches_a_fresh_build() -> None:
    """Incremental builds (previous zone given) answer exactly like a build from scratch."""
    changed = dict(VIEW.services)
    changed["db"] = ServiceView("db", (inst("db", 1, "127.0.0.5", node="n2", port=5432),
                                       inst("db", 2, "127.0.0.6", node="n2", port=5433)))
    del changed["idle"]
    view2 = View(services=changed, nodes=VIEW.nodes, index=8)
    incremental = build_zone(view2, Settings(), previous=ZONE)
    fresh = build_zone(view2, Settings())
    assert incremental.names == fresh.names
    assert incremental.parts["web"][1] is ZONE.parts["web"][1]      # reused
    assert incremental.parts["db"][1] is not ZONE.parts["db"][1]    # rebuilt
    assert answer(incremental, "idle.service.meshlet", A).rcode == NXDOMAIN
    assert data(answer(incremental, "db.service.meshlet", A)) == ["127.0.0.5", "127.0.0.6"]
    moved = View(services=changed, nodes={**VIEW.nodes, "n2": Node("n2", "127.0.0.5")}, index=9)
    assert build_zone(moved, Settings(), previous=incremental).names == build_zone(moved, Settings()).names
