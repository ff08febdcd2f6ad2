"""core.checks: what a valid config still gets wrong across services. One row per rule:
"config -> the problems (field path: words of the message)"."""

from __future__ import annotations

import textwrap

import pytest

import config
from supervisor.core.checks import check_mesh
from supervisor.daemon.components import vip_notes


def problems(text: str) -> list[tuple[str, str]]:
    cfg = config.loads(textwrap.dedent(text), base_dir="/")
    return [(p.path, p.message) for p in check_mesh(cfg)]


@pytest.mark.parametrize("text, expected", [
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: http, port: 7000}], update: {max_surge: 0}}
          b: {command: [y], ports: [{name: http, port: 7000}], update: {max_surge: 0}}
        """, [("services.b.ports[0].port", "port 7000 is also services.a.ports[0]'s")], id="two-services-one-port"),
    pytest.param("""
        services:
          a: {command: [x], replicas: 2, ports: [{name: http, port: 7000}]}
        """, [("services.a.replicas", "2 replicas with the fixed port 7000: each needs a node of its own, and 1 node")],
        id="fixed-port-more-replicas-than-nodes"),
    pytest.param("""
        mesh:
          nodes: [{name: n1}, {name: n2}, {name: n3}]
        services:
          a: {command: [x], replicas: 2, ports: [{name: http, port: 7000}]}
        """, [], id="fixed-port-a-node-each-and-one-spare"),
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: http, port: 7000}]}
        """, [("services.a.update.max_surge", "set update.max_surge: 0 (stop first) or strategy: recreate")],
        id="fixed-port-surge-without-a-spare-node"),
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: http, port: 7000}], update: {strategy: recreate}}
        """, [], id="fixed-port-recreate"),
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: http, port: 8080}], update: {max_surge: 0}}
        """, [("services.a.ports[0].port", "port 8080 is meshlet's own (mesh.proxy.listen)")],
        id="meshlets-own-listener"),
    pytest.param("""
        mesh: {catalog: "http://10.0.0.5:8500"}
        services:
          a: {command: [x], ports: [{name: http, port: 8500}], update: {max_surge: 0}}
        """, [], id="no-embedded-catalog-no-clash-on-its-port"),
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: http}], routes: {hosts: [shop.test], paths: [{prefix: /api}]}}
          b: {command: [y], ports: [{name: http}], routes: {hosts: [shop.test], paths: [{prefix: /api}]}}
          c: {command: [z], ports: [{name: http}], routes: {hosts: [shop.test], paths: [{prefix: /web}]}}
        """, [("services.b.routes.hosts[0]", "host shop.test with path /api is also services.a's")],
        id="two-services-one-host-and-path"),
    pytest.param("""
        services:
          a: {command: [x], ports: [{name: db, protocol: tcp, vip_port: 5432}], routes: {hosts: [x.test]}}
          b: {command: [y], ports: [{name: http}], routes: {hosts: [x.test]}}
        """, [], id="a-tcp-only-service-has-no-host-route"),
])
def test_check_mesh(text, expected) -> None:
    got = problems(text)
    assert [path for path, _ in got] == [path for path, _ in expected], got
    for (_, message), (_, words) in zip(got, expected):
        assert words in message, message


def test_the_examples_pass() -> None:
    from pathlib import Path
    examples = Path(config.__file__).parent / "examples"
    for path in sorted(examples.glob("*.yaml")):
        assert check_mesh(config.load(path)) == [], path


@pytest.mark.parametrize("euid, start, expected", [
    pytest.param(0, 1024, [], id="root"),
    pytest.param(1000, 1024, ["web (80)"], id="not-root"),
    pytest.param(1000, 0, [], id="not-root-but-every-port-allowed"),
])
def test_vip_notes(euid, start, expected) -> None:
    cfg = config.loads("services: {web: {command: [x], ports: [{name: http}]}, "
                       "api: {command: [y], ports: [{name: http, vip_port: 8081}]}}", base_dir="/")
    notes = vip_notes(cfg.services, euid, start)
    assert len(notes) == (1 if expected else 0)
    for words in expected:
        assert words in notes[0] and "api" not in notes[0]
