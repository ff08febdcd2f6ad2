"""The catalog's pure parts, tested directly: decoding, durations, filters, check rules,
key validation, wait times and the wake-up structure."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.catalog._checkdef import (
    SCRIPTS_DISABLED, SCRIPTS_DISABLED_REMOTE, alias_status, apply_result, check_definition, http_status,
    script_policy, script_result, truncate_output,
)
from discovery.catalog._connect import sidecar_definition
from discovery.catalog._decode import (
    DecodeError, decode_struct, format_go_duration, parse_bool, parse_go_duration, parse_uint,
)
from discovery.catalog._errors import BadRequest, CatalogError
from discovery.catalog._filter import FilterError, apply_filter, compile_filter
from discovery.catalog._kv import validate_key
from discovery.catalog._schemas import SERVICE_DEFINITION
from discovery.catalog._watch import Blocking, Subscriptions, WatchHub, wait_seconds
from discovery.catalog._wire import Reply


@pytest.mark.parametrize(
    "text, ns",
    [
        pytest.param("0", 0, id="zero"),
        pytest.param("300ms", 300_000_000, id="ms"),
        pytest.param("1h2m3s", 3_723_000_000_000, id="hms"),
        pytest.param("1.5s", 1_500_000_000, id="fraction"),
        pytest.param("-2m", -120_000_000_000, id="negative"),
        pytest.param("10us", 10_000, id="us"),
        pytest.param("10\u00b5s", 10_000, id="micro-sign"),
        pytest.param("7ns", 7, id="ns"),
    ],
)
def test_parse_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("", 'time: invalid duration ""', id="empty"),
        pytest.param("10", 'time: missing unit in duration "10"', id="no-unit"),
        pytest.param("10x", 'time: unknown unit "x" in duration "10x"', id="bad-unit"),
        pytest.param("s", 'time: invalid duration "s"', id="no-number"),
        pytest.param("1s2", 'time: missing unit in duration "1s2"', id="trailing-number"),
    ],
)
def test_parse_go_duration_errors(text: str, message: str) -> None:
    with pytest.raises(DecodeError) as err:
        parse_go_duration(text)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "ns, text",
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(100_000_000, "100ms", id="ms"),
        pytest.param(10_000_000_000, "10s", id="s"),
        pytest.param(90_000_000_000, "1m30s", id="m"),
        pytest.param(3_600_000_000_000, "1h0m0s", id="h"),
        pytest.param(1_500_000_000, "1.5s", id="fraction"),
        pytest.param(1_500, "1.5\u00b5s", id="us"),
        pytest.param(-1_000_000_000, "-1s", id="negative"),
    ],
)
def test_format_go_duration(ns: int, text: str) -> None:
    assert format_go_duration(ns) == text


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_duration_round_trip(ns: int) -> None:
    assert parse_go_duration(format_go_duration(ns)) == ns


def test_parse_bool_and_uint() -> None:
    assert [parse_bool(x) for x in ("1", "t", "TRUE", "0", "F", "false")] == [True, True, True, False, False, False]
    with pytest.raises(DecodeError):
        parse_bool("yes")
    assert parse_uint("18446744073709551615") == 2**64 - 1
    for bad in ("", "-1", "1.0", "18446744073709551616", "x"):
        with pytest.raises(DecodeError):
            parse_uint(bad)


def test_decode_struct_case_aliases_and_types() -> None:
    d = decode_struct(
        {"NAME": "web", "tagged_addresses": {"lan": {"address": "10.0.0.1", "PORT": 80}},
         "checks": [{"ttl": 5_000_000_000, "deregister_critical_service_after": "1m", "args": ["x"]}],
         "enable_tag_override": True, "Meta": None},
        SERVICE_DEFINITION,
    )
    assert d == {
        "Name": "web",
        "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 80}},
        "Checks": [{"TTL": 5_000_000_000, "DeregisterCriticalServiceAfter": 60_000_000_000, "ScriptArgs": ["x"]}],
        "EnableTagOverride": True,
    }


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param({"Name": "s", "x": 1}, 'json: unknown field "x"', id="unknown"),
        pytest.param({"Port": "80"}, "json: cannot unmarshal string into Go struct field structs.ServiceDefinition.Port of type int",
                     id="string-for-int"),
        pytest.param({"Port": 1.5}, "json: cannot unmarshal number 1.5 into Go struct field structs.ServiceDefinition.Port of type int",
                     id="float-for-int"),
        pytest.param({"Tags": "a"}, "json: cannot unmarshal string into Go struct field structs.ServiceDefinition.Tags of type []string",
                     id="string-for-list"),
        pytest.param({"Check": {"TTL": True}}, None, id="bool-duration"),
        pytest.param([], "json: cannot unmarshal array into Go value of type structs.ServiceDefinition", id="array"),
    ],
)
def test_decode_struct_errors(body, message: str | None) -> None:
    with pytest.raises(DecodeError) as err:
        decode_struct(body, SERVICE_DEFINITION)
    if message is not None:
        assert str(err.value) == message


@pytest.mark.parametrize(
    "key, refused",
    [
        pytest.param("meshlet/services/web", False, id="plain"),
        pytest.param("a/b.c/..d", False, id="dots-inside-a-segment"),
        pytest.param("a/../b", True, id="traversal"),
        pytest.param("..", True, id="dotdot"),
        pytest.param("a/%2e%2e/b", True, id="encoded"),
        pytest.param("a/%252e%252e/b", True, id="double-encoded"),
        pytest.param("a\\..\\b", True, id="backslashes"),
        pytest.param(" a", True, id="leading-space"),
        pytest.param("a\t", True, id="trailing-tab"),
    ],
)
def test_validate_key(key: str, refused: bool) -> None:
    assert (validate_key(key) is not None) == refused


@pytest.mark.parametrize(
    "wait, low, high",
    [
        pytest.param(None, 300, 300 * 17 / 16, id="default"),
        pytest.param("0", 300, 300 * 17 / 16, id="zero-is-default"),
        pytest.param("10s", 10, 10 * 17 / 16, id="given"),
        pytest.param("1h", 600, 600 * 17 / 16, id="clamped"),
    ],
)
def test_wait_seconds(wait: str | None, low: float, high: float) -> None:
    assert wait_seconds(wait, rand=lambda: 0.0) == low
    assert wait_seconds(wait, rand=lambda: 1.0) == pytest.approx(high)


def test_wait_seconds_rejects_bare_numbers() -> None:
    with pytest.raises(DecodeError):
        wait_seconds("10")


@pytest.mark.parametrize(
    "results, thresholds, expected",
    [
        pytest.param(["critical"], (0, 0, 0), ["critical"], id="no-thresholds"),
        pytest.param(["passing", "passing", "passing"], (2, 0, 0), [None, "passing", "passing"], id="success-before-passing"),
        pytest.param(["critical"] * 3, (0, 0, 3), [None, None, "critical"], id="failures-before-critical"),
        pytest.param(["critical"] * 3, (0, 1, 3), ["warning", "warning", "critical"], id="warning-first"),
        pytest.param(["critical", "passing", "critical"], (0, 0, 2), [None, "passing", None], id="reset-on-success"),
        pytest.param(["warning"], (0, 0, 0), ["warning"], id="warning-counts-as-success"),
    ],
)
def test_apply_result(results: list[str], thresholds: tuple[int, int, int], expected: list) -> None:
    counters = (0, 0)
    got = []
    for r in results:
        counters, status = apply_result(counters, r, *thresholds)
        got.append(status)
    assert got == expected


def test_http_status_and_truncation() -> None:
    assert [http_status(c) for c in (200, 204, 299, 429, 301, 404, 500)] == [
        "passing", "passing", "passing", "warning", "critical", "critical", "critical"]
    assert truncate_output("x" * 10, 20) == "x" * 10
    assert truncate_output("x" * 30, 20).startswith("x" * 20 + " ... (captured 20 of 30 bytes)")


@pytest.mark.parametrize(
    "check, error",
    [
        pytest.param({"TTL": 1, "Interval": 1, "HTTP": "u"}, BadRequest, id="ttl-and-interval"),
        pytest.param({"TCP": "h:1"}, BadRequest, id="tcp-no-interval"),
        pytest.param({}, BadRequest, id="nothing"),
        pytest.param({"TTL": 1, "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 1}, BadRequest, id="fbw-over-fbc"),
        pytest.param({"ScriptArgs": ["true"]}, BadRequest, id="script-no-interval"),
        pytest.param({"AliasService": "x", "TTL": 1}, BadRequest, id="alias-with-ttl"),
        pytest.param({"AliasService": "x", "Interval": 1, "TCP": "h:1"}, BadRequest, id="alias-with-interval"),
        pytest.param({"DockerContainerID": "c", "ScriptArgs": ["x"], "Interval": 1}, BadRequest, id="docker"),
        pytest.param({"GRPC": "h:1", "Interval": 1}, BadRequest, id="grpc"),
    ],
)
def test_check_definition_rejects(check: dict, error: type) -> None:
    with pytest.raises(error):
        check_definition(check)


@pytest.mark.parametrize(
    "source, remote_flag, local_flag, refused",
    [
        pytest.param("remote", False, False, SCRIPTS_DISABLED_REMOTE, id="remote-default"),
        pytest.param("remote", False, True, SCRIPTS_DISABLED_REMOTE, id="remote-local-flag-only"),
        pytest.param("remote", True, False, None, id="remote-enabled"),
        pytest.param("local", False, False, SCRIPTS_DISABLED, id="local-default"),
        pytest.param("local", False, True, None, id="local-flag"),
        pytest.param("local", True, False, None, id="local-by-script-flag"),
    ],
)
def test_script_policy(source: str, remote_flag: bool, local_flag: bool, refused: str | None) -> None:
    assert script_policy(source, remote_flag, local_flag) == refused


@pytest.mark.parametrize(
    "returncode, tail, total, timed_out, expected",
    [
        pytest.param(0, b"ok", 2, False, ("passing", "ok"), id="exit-0"),
        pytest.param(1, b"meh", 3, False, ("warning", "meh"), id="exit-1"),
        pytest.param(2, b"bad", 3, False, ("critical", "bad"), id="exit-2"),
        pytest.param(-9, b"", 0, False, ("critical", ""), id="killed-by-signal"),
        pytest.param(-9, b"part", 4, True, ("critical", "Timed out (1.5s) running check\n\npart"), id="timeout"),
        pytest.param(-9, b"", 0, True, ("critical", "Timed out (1.5s) running check"), id="timeout-silent"),
        pytest.param(0, b"cdef", 6, False, ("passing", "Captured 4 of 6 bytes\n...\ncdef"), id="cut"),
    ],
)
def test_script_result(returncode, tail: bytes, total: int, timed_out: bool, expected) -> None:
    assert script_result(returncode, tail, total, 4, timed_out, 1_500_000_000) == expected


def _chk(name: str, status: str, sid: str = "web", output: str = "") -> dict:
    return {"Name": name, "Status": status, "ServiceID": sid, "Output": output}


@pytest.mark.parametrize(
    "checks, exists, expected",
    [
        pytest.param([], True, ("passing", "No checks found."), id="no-checks"),
        pytest.param([], False, ("critical", "Service web could not be found on node n1"), id="no-service"),
        pytest.param([_chk("a", "passing")], True, ("passing", "All checks passing."), id="passing"),
        pytest.param([_chk("a", "warning", output="w"), _chk("b", "passing")], True,
                     ("warning", 'Aliased check "a" failing: w'), id="warning-kept"),
        pytest.param([_chk("a", "warning"), _chk("b", "critical", output="c"), _chk("z", "warning")], True,
                     ("critical", 'Aliased check "b" failing: c'), id="critical-wins"),
        pytest.param([_chk("maint", "critical", sid="")], True, ("critical", 'Aliased check "maint" failing: '),
                     id="node-check-counts"),
        pytest.param([_chk("other", "critical", sid="db")], True, ("passing", "No checks found."), id="other-service"),
    ],
)
def test_alias_status(checks: list, exists: bool, expected: tuple) -> None:
    assert alias_status(checks, exists, "web", "n1") == expected


@pytest.mark.parametrize(
    "parent, sidecar, used, current, expected",
    [
        pytest.param({"Name": "web", "Port": 80}, {}, [21000, 21002], None,
                     {"ID": "web-1-sidecar-proxy", "Name": "web-sidecar-proxy", "Port": 21001,
                      "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 80, "Address": ""}, id="defaults"),
        pytest.param({"Name": "web", "Port": 80, "Address": "10.0.0.5"}, {"Port": 30000}, [], None,
                     {"ID": "web-1-sidecar-proxy", "Name": "web-sidecar-proxy", "Port": 30000,
                      "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 80, "Address": "10.0.0.5"},
                     id="given-port-inherited-address"),
        pytest.param({"Name": "web", "Port": 80}, {"Name": "edge", "Proxy": {"LocalServicePort": 8443}}, [21000], 21007,
                     {"ID": "web-1-sidecar-proxy", "Name": "edge", "Port": 21007,
                      "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8443, "Address": ""},
                     id="keeps-its-port"),
    ],
)
def test_sidecar_definition(parent: dict, sidecar: dict, used: list, current, expected: dict) -> None:
    d = sidecar_definition(parent, "web-1", sidecar, used, current)
    got = {"ID": d["ID"], "Name": d["Name"], "Port": d["Port"], "Address": d["Address"],
           "LocalServiceAddress": d["Proxy"]["LocalServiceAddress"], "LocalServicePort": d["Proxy"]["LocalServicePort"]}
    assert got == expected
    assert d["Kind"] == "connect-proxy" and d["Proxy"]["DestinationServiceID"] == "web-1"
    if not sidecar.get("Check") and not sidecar.get("Checks"):
        assert [c["Name"] for c in d["Checks"]] == ["Connect Sidecar Listening", "Connect Sidecar Aliasing web-1"]
        assert d["Checks"][0]["TCP"].endswith(f":{d['Port']}")


def test_sidecar_ports_run_out() -> None:
    with pytest.raises(CatalogError, match=r"none left in the configured range \[21000, 21255\]"):
        sidecar_definition({"Name": "w", "Port": 1}, "w", {}, range(21000, 21256), None)


def test_check_definition_defaults() -> None:
    d = check_definition({"HTTP": "http://127.0.0.1/", "Interval": 10**9})
    assert d == {"kind": "http", "http": "http://127.0.0.1/", "method": "GET", "interval": 10**9,
                 "timeout": 10 * 10**9}
    assert check_definition({"TTL": 5 * 10**9, "DeregisterCriticalServiceAfter": 10**9}) == {
        "kind": "ttl", "ttl": 5 * 10**9, "deregister": 10**9}


ITEMS = [
    {"ID": "a", "Tags": ["x", "y"], "Meta": {"env": "prod"}, "Port": 80, "Check": [{"Status": "passing"}]},
    {"ID": "b", "Tags": [], "Meta": {"env": "dev"}, "Port": 81, "Check": [{"Status": "critical"}]},
]


@pytest.mark.parametrize(
    "expr, ids",
    [
        pytest.param('ID == "a"', ["a"], id="eq"),
        pytest.param("ID != `a`", ["b"], id="neq-raw-string"),
        pytest.param('"x" in Tags', ["a"], id="in"),
        pytest.param('"x" not in Tags', ["b"], id="not-in"),
        pytest.param("Tags is empty", ["b"], id="is-empty"),
        pytest.param("Tags is not empty", ["a"], id="is-not-empty"),
        pytest.param('Meta.env == "dev"', ["b"], id="map-dot"),
        pytest.param('Meta["env"] == "prod"', ["a"], id="map-index"),
        pytest.param("Port == 81", ["b"], id="number"),
        pytest.param('Check.Status == "critical"', ["b"], id="through-a-list"),
        pytest.param('ID matches "^[ab]$" and not (Port == 80)', ["b"], id="matches-not"),
        pytest.param('ID == "a" or ID == "b"', ["a", "b"], id="or"),
        pytest.param('Meta contains "env"', ["a", "b"], id="map-contains-key"),
    ],
)
def test_filter(expr: str, ids: list[str]) -> None:
    assert [i["ID"] for i in apply_filter(ITEMS, expr)] == ids


@pytest.mark.parametrize("expr", ["", "ID ==", "ID = 1", '(ID == "a"', 'ID == "a" and', "ID matches \"(\""])
def test_filter_errors(expr: str) -> None:
    with pytest.raises(FilterError):
        compile_filter(expr)


def test_subscriptions_wake_exact_topics_keys_and_prefixes() -> None:
    subs = Subscriptions()
    svc, key, prefix_a, prefix_b, root, both = "svc", "key", "prefix-a", "prefix-b", "root", "both"
    subs.add(svc, topics=["service.web"])
    subs.add(key, keys=["a/x"])
    subs.add(prefix_a, prefixes=["a/"])
    subs.add(prefix_b, prefixes=["b/"])
    subs.add(root, prefixes=[""])
    subs.add(both, topics=["service.web", "nodes"])
    assert sorted(subs.pop_woken(["service.db"], ["a/y/z"])) == [prefix_a, root]  # a/ and the root prefix
    # a member under two woken names is returned once
    assert sorted(subs.pop_woken(["service.web", "nodes"], ["a/x"])) == [both, key, svc]
    subs.remove(prefix_b, prefixes=["b/"])
    assert subs.count() == 0


def test_answers_are_encoded_once_per_query_and_store_version() -> None:
    version = [1]
    hub = WatchHub(version=lambda: version[0])
    evaluations = []

    def blocking(path: str, value: str) -> Blocking:
        def evaluate():
            evaluations.append(value)
            return 7, value
        return Blocking(evaluate, lambda index, data: Reply(200, data.encode(), "text/plain"), 0, 1.0, (path, ()))

    first = hub.answer(blocking("/q", "a"))
    assert first[0] == 7 and first[1].endswith(b"\r\n\r\na")
    assert hub.answer(blocking("/q", "b")) is not None and hub.answer(blocking("/q", "b"))[1] is first[1]
    assert evaluations == ["a"]  # same query, same version: the same bytes object
    hub.answer(blocking("/r", "c"))
    version[0] = 2
    assert hub.answer(blocking("/q", "d"))[1].endswith(b"d")  # a commit: evaluated again
    assert evaluations == ["a", "c", "d"] and hub.encodes == 3


def test_prepared_answers_count_only_once_their_commit_is_durable() -> None:
    version = [1]
    hub = WatchHub(version=lambda: version[0])
    state = {"value": "old"}
    q = Blocking(lambda: (5, state["value"]), lambda index, data: Reply(200, data.encode()), 0, 1.0, ("/q", ()))

    class Parked:  # stands for a parked waiter: only its query matters to prepare()
        pass

    w = Parked()
    w.q = q  # type: ignore[attr-defined]
    assert hub.answer(q)[1].endswith(b"old")
    hub.subs.add(w, topics=["service.web"])
    state["value"] = "new"  # the batch is applied in memory, not yet durable
    hub.prepare(["service.web"], [], version[0] + 1)  # (nothing answers while a batch is unsettled)
    hub.discard(version[0] + 1)  # the commit failed (and the batch is undone)
    state["value"] = "old"
    version[0] = 2  # a later commit reaches version 2: it must not find the discarded answer
    assert hub.answer(q)[1].endswith(b"old")
    state["value"] = "newer"
    hub.prepare(["service.web"], [], version[0] + 1)
    version[0] = 3  # durable
    assert hub.answer(q)[1].endswith(b"newer") and hub.encodes == 4


# -- write ops over in-memory tables (the store is never opened: no SQLite, no loop) --------
from discovery.catalog._catalog import register_service, set_check_status  # noqa: E402
from discovery.catalog._kv import TOMBSTONE_TTL, kv_delete, kv_set, reap_tombstones  # noqa: E402
from discovery.catalog._model import State  # noqa: E402
from discovery.catalog._store import Store, Tx  # noqa: E402


def _op(store: Store, fn):
    tx = Tx(store)
    tx._begin_op()
    result = fn(tx)
    tx._end_op()
    return result, tx


@pytest.fixture
def mem(tmp_path):
    st = State()
    return st, Store(str(tmp_path), st.tables())


def test_ops_bump_only_the_indexes_they_change(mem) -> None:
    st, store = mem
    _, tx = _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "web", "ID": "w1", "Tags": ["a"],
                                                                   "Check": {"TTL": 10**10}}))
    assert tx.topics == {"service.web", "services", "node.n1", "checks", "service_names"}
    # a second instance with the same tags does not change the service list
    _, tx = _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "web", "ID": "w2", "Tags": ["a"]}))
    assert "service_names" not in tx.topics and "service.web" in tx.topics
    # the same registration again writes nothing and takes no index
    index = store.index
    _, tx = _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "web", "ID": "w2", "Tags": ["a"]}))
    assert tx.topics == set() and store.index == index
    # a check result that repeats takes no index either
    _op(store, lambda tx: set_check_status(st, tx, ("n1", "service:w1"), "passing", "ok"))
    index = store.index
    wrote, tx = _op(store, lambda tx: set_check_status(st, tx, ("n1", "service:w1"), "passing", "ok"))
    assert wrote is False and store.index == index and tx.topics == set()


def test_kv_ops_and_failed_op_rollback(mem) -> None:
    st, store = mem
    ok, _ = _op(store, lambda tx: kv_set(st, tx, "a", b"1"))
    assert ok and st.kv.get("a")["ModifyIndex"] == store.index
    index = store.index
    ok, _ = _op(store, lambda tx: kv_set(st, tx, "a", b"2", cas=index - 1))
    assert ok is False and store.index == index  # a failed CAS takes no index
    tx = Tx(store)
    tx._begin_op()
    kv_set(st, tx, "b", b"x")
    kv_delete(st, tx, "a")
    tx._rollback_op()
    assert st.kv.get("b") is None and st.kv.get("a")["Value"] == b"1" and store.index == index
    assert "a" not in st.tombs


def test_reap_tombstones(mem) -> None:
    st, store = mem
    _op(store, lambda tx: kv_set(st, tx, "old", b"1"))
    _op(store, lambda tx: kv_delete(st, tx, "old"))
    stamp = st.tombs.get("old")["t"]
    n, _ = _op(store, lambda tx: reap_tombstones(st, tx, now=stamp + 1))
    assert n == 0 and "old" in st.tombs
    n, _ = _op(store, lambda tx: reap_tombstones(st, tx, now=stamp + TOMBSTONE_TTL + 1))
    assert n == 1 and "old" not in st.tombs


def test_blocking_index_of_a_service(mem) -> None:
    from discovery.catalog._catalog import deregister_service
    from discovery.catalog._h_catalog import service_index

    st, store = mem
    assert service_index(st, "web") == 1  # nothing ever happened: never 0
    _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "web", "ID": "w1"}))
    registered = store.index
    _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "db", "ID": "d1"}))
    assert service_index(st, "web") == registered  # db's write is not web's change
    _op(store, lambda tx: deregister_service(st, tx, "n1", "w1"))
    gone = store.index
    assert service_index(st, "web") == gone  # absent: the last extinction
    assert service_index(st, "never-there") == gone
    _op(store, lambda tx: register_service(st, tx, "n1", {"Name": "x", "ID": "x1"}))
    assert service_index(st, "web") == gone  # a new service elsewhere does not move it


def test_a_failing_answer_is_an_error_reply_sent_at_once() -> None:
    from discovery.catalog._watch import ERROR_INDEX

    hub = WatchHub(on_error=lambda exc: Reply(500, f"failed: {exc}".encode()))

    def evaluate():
        raise RuntimeError("boom")

    index, wire = hub.answer(Blocking(evaluate, lambda i, d: Reply(200), 5, 1.0, ("/q", ())))
    assert index == ERROR_INDEX and index > 2**64 - 1  # past any index a client holds: never parked
    assert wire.startswith(b"HTTP/1.1 500 ") and wire.endswith(b"failed: boom")
