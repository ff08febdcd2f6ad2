from __future__ import annotations

import pytest

import config
from supervisor.daemon.probes import (LIVENESS, READINESS, STARTUP, Health, due_kinds, initial_health,
                               on_result, resolve_port)


def probe(**kw) -> config.Probe:
    return config.Probe(tcp=config.TcpProbe(port="http"), **kw)


def run(probes: config.Probes, results: list[tuple[str, bool]]) -> list[str]:
    h = initial_health(probes)
    out = []
    for kind, ok in results:
        h = on_result(probes, h, kind, ok)
        out.append(h.describe())
    return out


@pytest.mark.parametrize("probes, results, states", [
    pytest.param(config.Probes(readiness=probe(failure_threshold=3, success_threshold=1)),
                 [(READINESS, True), (READINESS, False), (READINESS, False), (READINESS, False),
                  (READINESS, True)],
                 ["ready", "ready", "ready", "not-ready", "ready"], id="readiness-threshold"),
    pytest.param(config.Probes(readiness=probe(success_threshold=2, failure_threshold=1)),
                 [(READINESS, True), (READINESS, True), (READINESS, False), (READINESS, True),
                  (READINESS, True)],
                 ["not-ready", "ready", "not-ready", "not-ready", "ready"], id="readiness-success-2"),
    pytest.param(config.Probes(liveness=probe(failure_threshold=2)),
                 [(LIVENESS, False), (LIVENESS, True), (LIVENESS, False), (LIVENESS, False)],
                 ["ready", "ready", "ready", "failed"], id="liveness-consecutive"),
    pytest.param(config.Probes(startup=probe(failure_threshold=2), readiness=probe(),
                               liveness=probe(failure_threshold=1)),
                 [(LIVENESS, False), (READINESS, True), (STARTUP, False), (STARTUP, True),
                  (READINESS, True), (LIVENESS, False)],
                 ["starting", "starting", "starting", "not-ready", "ready", "failed"],
                 id="startup-holds-off-others"),
    pytest.param(config.Probes(startup=probe(failure_threshold=2)),
                 [(STARTUP, False), (STARTUP, False), (STARTUP, True)],
                 ["starting", "failed", "failed"], id="startup-gives-up"),
    pytest.param(config.Probes(startup=probe()),
                 [(STARTUP, True)], ["ready"], id="startup-only-then-ready"),
])
def test_probe_state_machine(probes, results, states):
    assert run(probes, results) == states


def test_without_probes_an_instance_is_ready_at_once():
    assert initial_health(config.Probes()) == Health()


def test_due_kinds_follow_the_state():
    probes = config.Probes(startup=probe(), liveness=probe(), readiness=probe())
    h = initial_health(probes)
    assert due_kinds(probes, h) == (STARTUP,)
    h = on_result(probes, h, STARTUP, True)
    assert due_kinds(probes, h) == (LIVENESS, READINESS)


def test_ports_resolve_by_name_number_or_first():
    spec = config.ServiceSpec(name="web", command=("x",), ports=(
        config.PortSpec(name="http", port=0), config.PortSpec(name="admin", port=7000)))
    ports = {"http": 20001, "admin": 7000}
    assert resolve_port(None, spec, ports) == 20001
    assert resolve_port("admin", spec, ports) == 7000
    assert resolve_port(7000, spec, ports) == 7000
    with pytest.raises(ValueError):
        resolve_port("nope", spec, ports)
