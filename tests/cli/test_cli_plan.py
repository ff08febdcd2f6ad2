"""plan_apply / txn_chunks / diff_fields: the pure decisions of `meshlet apply`."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from supervisor.commands.apply import txn_chunks
from supervisor.core.apply_plan import (CREATED, DELETED, UNCHANGED, UPDATED, ApplyError, ApplyPlan,
                                        ServiceChange, VipRangeExhausted, diff_fields, format_change,
                                        lowest_free_vip, plan_apply, resolve_catalog_url)
from supervisor.core.rollout_history import restart_revision
from supervisor.core.revisions import template_revision


def spec(name: str, *, ports: bool = True, replicas: int = 1) -> config.ServiceSpec:
    port = ", ports: [{name: http}]" if ports else ""
    text = f"services: {{{name}: {{command: [x], replicas: {replicas}{port}}}}}"
    return config.loads(text, base_dir="/").services[name]


def doc(s: config.ServiceSpec, vip: str | None) -> dict[str, Any]:
    return json.loads(json.dumps(config.service_document(s, vip)))


RANGE = "127.10.0.0/29"  # usable: .1 .. .6


def summary(plan: ApplyPlan) -> dict[str, tuple[str, str | None]]:
    return {c.name: (c.action, c.vip) for c in plan.changes}


@pytest.mark.parametrize(
    "desired, current, in_use, prune, expected, claims, releases",
    [
        pytest.param(
            {"web": spec("web"), "api": spec("api")}, {}, {}, False,
            {"api": (CREATED, "127.10.0.1"), "web": (CREATED, "127.10.0.2")},
            {"127.10.0.1": "api", "127.10.0.2": "web"}, {},
            id="new-services-get-lowest-free-in-name-order"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "127.10.0.5")}, {"127.10.0.5": "web"}, False,
            {"web": (UNCHANGED, "127.10.0.5")}, {}, {},
            id="unchanged-keeps-vip"),
        pytest.param(
            {"web": spec("web", replicas=3)}, {"web": doc(spec("web"), "127.10.0.5")}, {"127.10.0.5": "web"},
            False, {"web": (UPDATED, "127.10.0.5")}, {}, {},
            id="update-keeps-vip"),
        pytest.param(
            {"new": spec("new")}, {}, {"127.10.0.1": "old", "127.10.0.3": "x"}, False,
            {"new": (CREATED, "127.10.0.2")}, {"127.10.0.2": "new"}, {},
            id="skips-reserved-addresses"),
        pytest.param(
            {"new": spec("new")}, {"other": doc(spec("other"), "127.10.0.1")}, {}, False,
            {"new": (CREATED, "127.10.0.2")}, {"127.10.0.2": "new"}, {},
            id="skips-vips-of-documents-without-reservation"),
        pytest.param(
            {"worker": spec("worker", ports=False)}, {}, {}, False,
            {"worker": (CREATED, None)}, {}, {},
            id="no-ports-no-vip"),
        pytest.param(
            {"web": spec("web", ports=False)}, {"web": doc(spec("web"), "127.10.0.4")}, {"127.10.0.4": "web"},
            False, {"web": (UPDATED, None)}, {}, {"127.10.0.4": "web"},
            id="losing-ports-gives-vip-back"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web", ports=False), None)}, {}, False,
            {"web": (UPDATED, "127.10.0.1")}, {"127.10.0.1": "web"}, {},
            id="gaining-ports-gets-vip"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "127.10.0.5"), "old": doc(spec("old"), "127.10.0.1")},
            {"127.10.0.5": "web", "127.10.0.1": "old"}, False,
            {"web": (UNCHANGED, "127.10.0.5")}, {}, {},
            id="without-prune-others-stay"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "127.10.0.5"), "old": doc(spec("old"), "127.10.0.1")},
            {"127.10.0.5": "web", "127.10.0.1": "old"}, True,
            {"web": (UNCHANGED, "127.10.0.5"), "old": (DELETED, None)}, {}, {"127.10.0.1": "old"},
            id="prune-deletes-and-gives-vip-back"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "127.10.0.5")}, {}, False,
            {"web": (UNCHANGED, "127.10.0.5")}, {"127.10.0.5": "web"}, {},
            id="missing-reservation-is-taken-again"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "127.10.0.5")}, {"127.10.0.5": "intruder"}, False,
            {"web": (UPDATED, "127.10.0.1")}, {"127.10.0.1": "web"}, {},
            id="vip-reserved-by-another-service-is-not-kept"),
        pytest.param(
            {"web": spec("web")}, {"web": doc(spec("web"), "10.0.0.9")}, {"10.0.0.9": "web"}, False,
            {"web": (UNCHANGED, "10.0.0.9")}, {}, {},
            id="vip-outside-a-changed-range-is-kept"),
        pytest.param(
            {"web": spec("web")}, {"web": {}}, {}, False,
            {"web": (UPDATED, "127.10.0.1")}, {"127.10.0.1": "web"}, {},
            id="unreadable-document-is-rewritten"),
        pytest.param(
            {"b": spec("b", ports=False), "c": spec("c")},
            {"a": doc(spec("a"), "127.10.0.1"), "b": doc(spec("b"), "127.10.0.2")},
            {"127.10.0.1": "a", "127.10.0.2": "b"}, True,
            {"a": (DELETED, None), "b": (UPDATED, None), "c": (CREATED, "127.10.0.3")},
            {"127.10.0.3": "c"}, {"127.10.0.1": "a", "127.10.0.2": "b"},
            id="addresses-given-back-are-not-reused-in-the-same-apply"),
    ],
)
def test_plan_apply(desired, current, in_use, prune, expected, claims, releases) -> None:
    plan = plan_apply(desired, current, in_use, RANGE, prune)
    assert summary(plan) == expected
    assert dict(plan.claims) == claims
    assert dict(plan.releases) == releases
    assert [c.name for c in plan.changes] == sorted(expected)


def test_documents_carry_the_config_revision() -> None:
    plan = plan_apply({"web": spec("web")}, {}, {}, RANGE, False)
    (change,) = plan.changes
    assert change.new == doc(spec("web"), "127.10.0.1")
    assert change.revision == config.service_revision(spec("web"))


def test_a_scale_keeps_the_replicas_revision() -> None:
    old = doc(spec("web"), "127.10.0.1")
    plan = plan_apply({"web": spec("web", replicas=4)}, {"web": old}, {"127.10.0.1": "web"}, RANGE, False)
    (change,) = plan.changes
    assert change.old_revision == old["revision"] != change.revision      # the documents differ
    rev = template_revision(spec("web"))
    assert change.old_replica_revision == change.replica_revision == rev   # the replicas do not
    assert format_change(change) == [f"web: scaled (replicas 1 → 4, revision {rev})"]
    assert format_change(change, dry_run=True) == [
        f"web: would scale (replicas 1 → 4, revision {rev})", "    replicas: 1 → 4"]


def test_a_template_change_reports_the_replicas_revisions() -> None:
    old, new = doc(spec("web"), "127.10.0.1"), doc(spec("web", ports=False), None)
    change = ServiceChange("web", UPDATED, old, new)
    a, b = template_revision(spec("web")), template_revision(spec("web", ports=False))
    assert a != b
    assert format_change(change) == [f"web: updated (revision {a} → {b}, vip released)"]
    with_token = ServiceChange("web", UPDATED, old, doc(spec("web", replicas=2), "127.10.0.1"), token="t")
    assert format_change(with_token) == [f"web: scaled (replicas 1 → 2, revision {restart_revision(a, 't')})"]
    # the same document with only its VIP claimed anew: no rollout, nothing scaled
    same = ServiceChange("web", UPDATED, dict(old, vip="127.10.0.3"), old)
    assert format_change(same) == [f"web: updated (revision {a} unchanged, vip 127.10.0.1)"]


def test_exhausted_range_is_a_clear_error() -> None:
    desired = {f"s{i}": spec(f"s{i}") for i in range(7)}  # 6 usable addresses
    with pytest.raises(VipRangeExhausted, match=r"127\.10\.0\.0/29.*'s6'.*all 6 usable"):
        plan_apply(desired, {}, {}, RANGE, False)


def test_no_usable_address_in_a_tiny_range() -> None:
    with pytest.raises(VipRangeExhausted):
        plan_apply({"web": spec("web")}, {}, {}, "127.10.0.0/31", False)


def test_invalid_range_is_an_apply_error() -> None:
    with pytest.raises(ApplyError, match="vip_range"):
        plan_apply({"web": spec("web")}, {}, {}, "nonsense", False)


@pytest.mark.parametrize(
    "taken, expected",
    [
        pytest.param([], "127.10.0.1", id="skips-network-address"),
        pytest.param(["127.10.0.1", "127.10.0.2"], "127.10.0.3", id="next"),
        pytest.param(["127.10.0.2"], "127.10.0.1", id="fills-holes"),
        pytest.param(["127.10.0.%d" % i for i in range(1, 7)], None, id="full-never-broadcast"),
        pytest.param(["10.0.0.1", "junk"], "127.10.0.1", id="ignores-outsiders"),
    ],
)
def test_lowest_free_vip(taken: list[str], expected: str | None) -> None:
    assert lowest_free_vip(RANGE, taken) == expected


@settings(max_examples=60, deadline=None)
@given(
    existing=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.booleans(), max_size=5),
    wanted=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]), st.booleans(), max_size=7),
    prune=st.booleans(),
)
def test_vips_are_unique_and_in_range(existing: dict[str, bool], wanted: dict[str, bool], prune: bool) -> None:
    """Safety: after applying a plan on top of any consistent state, no two services share
    a VIP, every service with ports has one inside the range, and reservations match."""
    rng = "127.10.0.0/28"
    current, in_use = {}, {}
    for name, ports in sorted(existing.items()):
        vip = lowest_free_vip(rng, in_use) if ports else None
        current[name] = doc(spec(name, ports=ports), vip)
        if vip:
            in_use[vip] = name
    plan = plan_apply({n: spec(n, ports=p) for n, p in wanted.items()}, current, in_use, rng, prune)
    after = {n: d for n, d in current.items()}
    for c in plan.changes:
        if c.action == DELETED:
            del after[c.name]
        else:
            after[c.name] = c.new
    reserved = {ip: n for ip, n in in_use.items() if ip not in plan.releases} | dict(plan.claims)
    vips = [d["vip"] for d in after.values() if d["vip"]]
    assert len(vips) == len(set(vips))
    for name, d in after.items():
        has_ports = bool(d["spec"]["ports"])
        assert (d["vip"] is not None) == has_ports
        if d["vip"]:
            assert reserved[d["vip"]] == name
            net = ipaddress.ip_network(rng)
            assert ipaddress.ip_address(d["vip"]) in net
            assert d["vip"] not in (str(net.network_address), str(net.broadcast_address))


def _decode(ops: list[dict]) -> list[tuple[str, str, int, str | None]]:
    out = []
    for op in ops:
        kv = op["KV"]
        value = base64.b64decode(kv["Value"]).decode() if "Value" in kv else None
        out.append((kv["Verb"], kv["Key"], kv["Index"], value))
    return out


def test_txn_ops_cas_every_key() -> None:
    old_web = doc(spec("web"), "127.10.0.1")
    current = {"web": old_web, "old": doc(spec("old"), "127.10.0.2")}
    in_use = {"127.10.0.1": "web", "127.10.0.2": "old"}
    plan = plan_apply({"web": spec("web", ports=False), "new": spec("new")}, current, in_use, RANGE, True)
    (chunk,) = txn_chunks(plan, {"web": 11, "old": 12}, {"127.10.0.1": 21, "127.10.0.2": 22})
    ops = {name: _decode(group) for name, group in chunk}
    new_doc = next(c.new for c in plan.changes if c.name == "new")
    assert ops["new"] == [("cas", "meshlet/services/new", 0, json.dumps(new_doc, sort_keys=True, separators=(",", ":"))),
                          ("cas", "meshlet/vips/127.10.0.3", 0, "new")]
    assert ops["old"] == [("delete-cas", "meshlet/services/old", 12, None),
                          ("delete-cas", "meshlet/vips/127.10.0.2", 22, None)]
    assert [o[:3] for o in ops["web"]] == [("cas", "meshlet/services/web", 11),
                                          ("delete-cas", "meshlet/vips/127.10.0.1", 21)]


def test_unchanged_plan_writes_nothing() -> None:
    current = {"web": doc(spec("web"), "127.10.0.1")}
    plan = plan_apply({"web": spec("web")}, current, {"127.10.0.1": "web"}, RANGE, False)
    assert not plan.writes
    assert txn_chunks(plan, {"web": 3}, {"127.10.0.1": 4}) == []


def test_large_plans_split_between_services_only() -> None:
    desired = {f"s{i:02d}": spec(f"s{i:02d}") for i in range(40)}  # 2 ops each: 80 > 64
    plan = plan_apply(desired, {}, {}, "127.10.0.0/24", False)
    chunks = txn_chunks(plan, {}, {})
    assert len(chunks) == 2
    assert all(sum(len(ops) for _, ops in chunk) <= 64 for chunk in chunks)
    assert sorted(name for chunk in chunks for name, _ in chunk) == sorted(desired)
    assert all(len(ops) == 2 for chunk in chunks for _, ops in chunk)  # doc + VIP stay together


def test_diff_fields() -> None:
    old = {"replicas": 1, "env": {"A": "1"}, "ports": [{"name": "http", "port": 0}]}
    new = {"replicas": 2, "env": {"A": "1", "B": "2"}, "ports": [{"name": "http", "port": 8080}]}
    assert diff_fields(old, new) == ['env.B: (absent) → "2"', "ports[0].port: 0 → 8080", "replicas: 1 → 2"]
    assert diff_fields(old, old) == []


@pytest.mark.parametrize("old, new, expected", [
    pytest.param({"env": {"DB_PASSWORD": "a1"}}, {"env": {"DB_PASSWORD": "b2"}},
                 ["env.DB_PASSWORD: changed (value not shown)"], id="changed"),
    pytest.param({"env": {"A": "1"}}, {"env": {"A": "1", "API_TOKEN": "t0k"}},
                 ["env.API_TOKEN: added (value not shown)"], id="added"),
    pytest.param({"env": {"A": "1", "AUTH": "x"}}, {"env": {"A": "1"}}, ["env.AUTH: removed (value not shown)"],
                 id="removed"),
    pytest.param({"probes": {"http": {"headers": {"Authorization": "Bearer a"}}}},
                 {"probes": {"http": {"headers": {"Authorization": "Bearer b"}}}},
                 ["probes.http.headers.Authorization: changed (value not shown)"], id="probe-header"),
    pytest.param({"env": {"GREETING": "hi"}}, {"env": {"GREETING": "ho"}}, ['env.GREETING: "hi" → "ho"'],
                 id="plain-shown"),
])
def test_diff_fields_never_shows_a_secret_looking_value(old, new, expected) -> None:
    """`meshlet apply --dry-run` says such a value changed, never what it was or became."""
    lines = diff_fields(old, new)
    assert lines == expected
    for secret in ("a1", "b2", "t0k", "Bearer"):
        assert all(secret not in line for line in lines if "GREETING" not in line)
    many = diff_fields({}, {f"k{i:02d}": i for i in range(25)}, limit=20)
    assert len(many) == 21 and many[-1] == "... and 5 more"


def test_format_lines() -> None:
    created = ServiceChange("web", CREATED, None, {"revision": "9f86d081884c", "vip": "127.10.0.2"})
    assert format_change(created) == ["web: created (revision 9f86d081884c, vip 127.10.0.2)"]
    assert format_change(ServiceChange("w", CREATED, None, {"revision": "ab", "vip": None})) == \
        ["w: created (revision ab)"]
    assert format_change(ServiceChange("web", UNCHANGED, {}, {})) == ["web: unchanged"]
    assert format_change(ServiceChange("web", DELETED, {}, None)) == ["web: deleted"]
    assert format_change(ServiceChange("web", DELETED, {}, None), dry_run=True) == ["web: would delete"]
    unreadable = ServiceChange("web", UPDATED, {}, {"revision": "b", "vip": None})
    assert format_change(unreadable) == ["web: updated (revision (unreadable) → b)"]


@pytest.mark.parametrize(
    "cli, env, catalog, expected",
    [
        pytest.param(None, {}, "embedded", "http://127.0.0.1:8500", id="embedded-default"),
        pytest.param(None, {}, "http://10.0.0.5:8500", "http://10.0.0.5:8500", id="file-url"),
        pytest.param(None, {"CONSUL_HTTP_ADDR": "127.0.0.1:9999"}, "embedded", "http://127.0.0.1:9999", id="env"),
        pytest.param("http://127.0.0.1:1", {"CONSUL_HTTP_ADDR": "x:2"}, "embedded", "http://127.0.0.1:1",
                     id="flag-wins"),
    ],
)
def test_resolve_catalog_url(cli, env, catalog, expected) -> None:
    assert resolve_catalog_url(cli, env, catalog, "127.0.0.1:8500") == expected
