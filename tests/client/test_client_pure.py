"""Pure helpers of discovery.consul: index rules, health -> Instance, KV document reading."""

from __future__ import annotations

import json

import pytest

import config
from discovery.consul import Backoff, instances_from_health, next_index, read_service_document, split_url
from discovery.view import CRITICAL, PASSING, WARNING


@pytest.mark.parametrize(
    "previous, returned, expected",
    [
        pytest.param(0, 7, 7, id="first-answer"),
        pytest.param(7, 7, 7, id="timeout-unchanged"),
        pytest.param(7, 9, 9, id="moved-forward"),
        pytest.param(50, 5, 0, id="went-backwards-resets"),
        pytest.param(0, 0, 1, id="zero-treated-as-one"),
        pytest.param(3, 0, 0, id="backwards-to-zero-resets"),
    ],
)
def test_next_index(previous: int, returned: int, expected: int) -> None:
    assert next_index(previous, returned) == expected


def test_backoff_doubles_to_five_seconds_with_jitter() -> None:
    b = Backoff()
    delays = [b.next() for _ in range(12)]
    assert 0.025 <= delays[0] <= 0.05
    assert all(d <= 5.0 for d in delays)
    assert delays[-1] >= 2.5  # reached the cap (jitter keeps it in [2.5, 5])
    b.reset()
    assert b.next() <= 0.05


def _entry(sid: str, *, address: str = "", port: int = 8080, meta: dict | None = None,
           checks: list[str] = (), node_addr: str = "127.0.0.1") -> dict:
    return {
        "Node": {"Node": "n1", "Address": node_addr},
        "Service": {"ID": sid, "Service": "web", "Tags": ["v1"], "Address": address, "Port": port,
                    "Meta": meta or {}},
        "Checks": [{"CheckID": f"c{i}", "Status": s} for i, s in enumerate(checks)],
    }


def test_instances_from_health_status_weight_ports_address() -> None:
    got = instances_from_health([
        _entry("a", checks=["passing", "warning"], meta={"weight": "5", "port_http": "8080", "port_admin": "9"}),
        _entry("b", address="127.0.0.9", checks=["passing", "critical", "warning"], meta={"weight": "x"}),
        _entry("c", checks=[], meta={"weight": "-3", "port_bad": "nope"}),
    ])
    a, b, c = got
    assert (a.id, a.status, a.weight, dict(a.ports), a.address, a.tags) == (
        "a", WARNING, 5, {"http": 8080, "admin": 9}, "127.0.0.1", ("v1",))
    assert a.port_for("admin") == 9 and a.port_for(None) == 8080
    assert (b.status, b.weight, b.address) == (CRITICAL, 1, "127.0.0.9")  # service address wins
    assert (c.status, c.weight, dict(c.ports)) == (PASSING, 0, {})  # no checks = passing
    assert instances_from_health(None) == ()


WEB = config.loads("services: {web: {command: [x], replicas: 2, ports: [{name: http}]}}").services["web"]


def _doc(**over) -> bytes:
    doc = config.service_document(WEB, "127.10.0.1")
    doc.update(over)
    return json.dumps(doc).encode()


def test_read_service_document_ok() -> None:
    spec, vip, revision = read_service_document("web", _doc())
    assert spec == WEB   # typed: the spec config validated, not a dict to re-read
    assert (spec.replicas, spec.ports[0].name, vip) == (2, "http", "127.10.0.1")
    assert revision == config.service_revision(WEB)


def _spec(**over) -> dict:
    spec = WEB.to_dict()
    spec.update(over)
    return spec


@pytest.mark.parametrize(
    "raw, message",
    [
        pytest.param(b"{", "not valid JSON", id="not-json"),
        pytest.param(b"[]", "JSON object", id="not-object"),
        pytest.param(_doc(format=3), "format 3", id="future-format"),
        pytest.param(_doc(name="api"), "does not match", id="wrong-name"),
        pytest.param(_doc(spec=[1]), "spec", id="spec-not-object"),
        pytest.param(_doc(vip=5), "vip", id="vip-not-string"),
        pytest.param(_doc(revision=None), "revision", id="no-revision"),
        pytest.param(_doc(spec={"name": "web", "replicas": "two"}), "replicas", id="invalid-spec"),
        pytest.param(None, "not valid JSON", id="empty"),
        # what the data plane would otherwise have to re-check and default by hand
        pytest.param(_doc(spec=_spec(ports=[{"name": "http", "vip_port": "eighty"}])), r"ports\[0\].vip_port",
                     id="vip-port"),
        pytest.param(_doc(spec=_spec(ports=[{"name": "x", "protocol": "udp"}])), r"ports\[0\].protocol",
                     id="protocol"),
        pytest.param(_doc(spec=_spec(routes={"policy": "fastest"})), "routes.policy", id="policy"),
        pytest.param(_doc(spec=_spec(routes={"hash_on": {"header": "a", "cookie": "b"}})), "hash_on",
                     id="hash-on-two"),
        pytest.param(_doc(spec=_spec(routes={"retries": {"attempts": "two"}})), "routes.retries.attempts",
                     id="retries"),
        pytest.param(_doc(spec=_spec(routes={"timeouts": "soon"})), "routes.timeouts", id="timeouts"),
        pytest.param(_doc(spec=_spec(routes={"max_pending": True})), "routes.max_pending", id="max-pending"),
        pytest.param(_doc(spec=_spec(routes={"hosts": ["bad host"]})), r"routes.hosts\[0\]", id="host"),
        pytest.param(_doc(spec=_spec(routes={"paths": [{"prefix": "nope"}]})), r"routes.paths\[0\].prefix",
                     id="path"),
        pytest.param(_doc(spec=_spec(dns={"mode": "magic"})), "dns.mode", id="dns-mode"),
    ],
)
def test_read_service_document_rejects(raw: bytes | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_service_document("web", raw)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("127.0.0.1:9000", ("http", "127.0.0.1", 9000)),
        ("https://consul.example:8501", ("https", "consul.example", 8501)),
        ("http://[::1]:8500", ("http", "::1", 8500)),
    ],
)
def test_split_url(url: str, expected: tuple) -> None:
    assert split_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://x:1", "http://:80", "http://h:notaport"])
def test_split_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        split_url(url)
