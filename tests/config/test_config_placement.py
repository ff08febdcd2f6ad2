"""What placement reads from meshlet.yaml: requests and limits (and their short form), the
placement strategy (and its older form), spread_over, and a node's reserved share."""

from __future__ import annotations

import pytest

import config

MiB = 2**20


def resources_of(text: str) -> tuple[tuple, tuple]:
    r = config.loads(f"services: {{w: {{command: [x], resources: {text}}}}}").services["w"].resources
    return (r.requests.cpu, r.requests.memory), (r.limits.cpu, r.limits.memory)


@pytest.mark.parametrize("text, requests, limits", [
    pytest.param("{}", (None, None), (None, None), id="none-best-effort"),
    pytest.param("{cpu: 500m, memory: 64Mi}", (0.5, 64 * MiB), (0.5, 64 * MiB), id="short-form-sets-both"),
    pytest.param("{requests: {cpu: 1, memory: 64Mi}}", (1.0, 64 * MiB), (1.0, 64 * MiB),
                 id="limits-default-to-requests"),
    pytest.param("{limits: {cpu: 2}}", (2.0, None), (2.0, None), id="requests-default-to-limits"),
    pytest.param("{requests: {cpu: 1}, limits: {cpu: 2, memory: 1Gi}}", (1.0, 2**30), (2.0, 2**30),
                 id="per-resource"),
    pytest.param("{requests: {cpu: 1, memory: 64Mi}, limits: {cpu: 1, memory: 64Mi}}",
                 (1.0, 64 * MiB), (1.0, 64 * MiB), id="equal"),
])
def test_requests_and_limits(text, requests, limits):
    assert resources_of(text) == (requests, limits)


def test_both_forms_make_the_same_spec_and_revision():
    short = config.loads("services: {w: {command: [x], resources: {cpu: 1, memory: 1G}}}").services["w"]
    full = config.loads("services: {w: {command: [x], resources: {requests: {cpu: 1, memory: 1G}}}}").services["w"]
    assert short == full and config.service_revision(short) == config.service_revision(full)
    assert config.ServiceSpec.from_dict(full.to_dict()) == full


@pytest.mark.parametrize("text, strategy", [
    pytest.param("{}", "spread", id="default-spread"),
    pytest.param("{strategy: binpack}", "binpack", id="binpack"),
    pytest.param("{spread: true}", "spread", id="older-spread-true"),
    pytest.param("{spread: false}", "binpack", id="older-spread-false"),
    pytest.param("{spread: null, strategy: binpack}", "binpack", id="older-null-is-absent"),
])
def test_strategy(text, strategy):
    placement = config.loads(f"services: {{w: {{command: [x], placement: {text}}}}}").services["w"].placement
    assert placement.strategy == strategy


def test_spread_over_and_reserved():
    cfg = config.loads("""
mesh:
  nodes: [{name: a, capacity: {cpu: 4, memory: 8Gi}, reserved: {cpu: 500m, memory: 1Gi}, labels: {zone: x}}]
services:
  w: {command: [x], placement: {spread_over: [zone, rack]}}
""")
    assert cfg.services["w"].placement.spread_over == ("zone", "rack")
    assert cfg.mesh.nodes[0].reserved == config.ResourceAmounts(cpu=0.5, memory=2**30)


# (id, YAML, the exact message); the YAML starts on line 2 (after the opening newline)
BAD = [
    pytest.param("""
services:
  w:
    command: [x]
    resources:
      cpu: 1
      limits: {cpu: 2}
""", "m.yaml:7 services.w.resources.limits: give cpu (the short form: requests = limits) or "
     "requests/limits, not both", id="forms-mixed"),
    pytest.param("""
services:
  w:
    command: [x]
    resources:
      requests: {cpu: 2}
      limits: {cpu: 1}
""", "m.yaml:6 services.w.resources.requests.cpu: must not be more than limits.cpu (1), got 2",
     id="request-above-limit"),
    pytest.param("""
services:
  w:
    command: [x]
    resources: {requests: {memory: 2Gi}, limits: {memory: 1Gi}}
""", "m.yaml:5 services.w.resources.requests.memory: must not be more than limits.memory "
     "(1073741824 bytes), got 2147483648 bytes", id="memory-request-above-limit"),
    pytest.param("""
services:
  w:
    command: [x]
    resources: {cpus: 2}
""", 'm.yaml:5 services.w.resources.cpus: unknown key (did you mean "cpu"?)', id="unknown-resource-key"),
    pytest.param("""
services:
  w:
    command: [x]
    resources: {requests: {cpu: 0}}
""", 'm.yaml:5 services.w.resources.requests.cpu: must be greater than 0, got 0', id="zero-request"),
    pytest.param("""
services:
  w:
    command: [x]
    placement:
      strategy: binpack
      spread: true
""", "m.yaml:7 services.w.placement.spread: give strategy (spread or binpack) or the older "
     "spread: true/false, not both", id="strategy-and-older-spread"),
    pytest.param("""
services:
  w:
    command: [x]
    placement: {strategy: pack}
""", 'm.yaml:5 services.w.placement.strategy: expected spread or binpack, got "pack"', id="bad-strategy"),
    pytest.param("""
services:
  w:
    command: [x]
    placement: {spread_over: [zone, zone]}
""", 'm.yaml:5 services.w.placement.spread_over[1]: "zone" is listed twice (also at [0])',
     id="label-twice"),
    pytest.param("""
services:
  w:
    command: [x]
    placement: {spred: true}
""", 'm.yaml:5 services.w.placement.spred: unknown key (did you mean "spread"?)', id="unknown-placement-key"),
    pytest.param("""
mesh:
  nodes:
    - name: a
      capacity: {cpu: 2}
      reserved: {cpu: 2}
""", "m.yaml:6 mesh.nodes[0].reserved.cpu: leaves nothing of capacity.cpu (2) for replicas, got 2",
     id="reserved-all"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_placement_settings(text, message):
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, filename="m.yaml")
    assert str(err.value) == message
