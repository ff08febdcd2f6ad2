from __future__ import annotations

import dataclasses

import pytest

import config
from supervisor.core.model import Replica
from supervisor.core.placement import Allocation, NodeInfo, Request, node_info, place
from supervisor.core.reconcile import allocations


def spec(name="web", cpu=None, memory=None, image=None, spread=True, constraints=()):
    amounts = config.ResourceAmounts(cpu=cpu, memory=memory)
    return config.ServiceSpec(
        name=name, image=image, command=None if image else ("app",),
        resources=config.Resources(requests=amounts, limits=amounts),
        placement=config.Placement(strategy="spread" if spread else "binpack", constraints=tuple(constraints)))


A = NodeInfo("a", "process", cpu=2, memory=1000)
B = NodeInfo("b", "process", cpu=2, memory=1000)
D = NodeInfo("d", "docker", cpu=2, memory=1000, labels={"disk": "ssd"})


def nodes_of(result):
    return [n for _, n in result.placed]


@pytest.mark.parametrize("s, count, nodes, existing, expected", [
    pytest.param(spec(), 2, [A, B], [], ["a", "b"], id="spread-two"),
    pytest.param(spec(), 3, [A, B], [Allocation("a", "web")], ["b", "a", "b"], id="spread-around-existing"),
    pytest.param(spec(cpu=1), 1, [A, B], [Allocation("a", "api", cpu=1)], ["b"], id="least-allocated"),
    pytest.param(spec(cpu=1, spread=False), 2, [A, B], [Allocation("b", "api", cpu=1)], ["b", "a"],
                 id="binpack-most-allocated"),
    pytest.param(spec(memory=600), 2, [A, B], [], ["a", "b"], id="memory-forces-spread"),
    pytest.param(spec(image="x"), 1, [A, D], [], ["d"], id="image-needs-docker"),
    pytest.param(spec(constraints=["node.name != a"]), 2, [A, B], [], ["b", "b"], id="constraint"),
])
def test_placement(s, count, nodes, existing, expected):
    result = place([Request(s, i) for i in range(count)], nodes, existing)
    assert nodes_of(result) == expected and not result.failed


def test_nothing_fits_says_why_for_every_node():
    result = place([Request(spec(cpu=3), 0)], [A, D], [])
    (req, reason), = result.failed
    assert req.slot == 0
    assert "a: cpu: 2 of 2 free, needs 3" in reason
    assert "d: docker node, service has no image" in reason


def test_capacity_is_used_up_by_earlier_placements():
    result = place([Request(spec(memory=600), i) for i in range(3)], [A, B], [])
    assert nodes_of(result) == ["a", "b"] and result.failed[0][0].slot == 2


def test_label_constraint():
    s = spec(image="x", constraints=["node.labels.disk == ssd"])
    plain = NodeInfo("e", "docker")
    assert nodes_of(place([Request(s, 0)], [plain, D], [])) == ["d"]


def test_a_nodes_reserve_is_never_offered():
    node = node_info(config.NodeSpec(name="n", capacity=config.NodeCapacity(cpu=2, memory=1000),
                                     reserved=config.ResourceAmounts(cpu=0.5, memory=100)))
    assert nodes_of(place([Request(spec(cpu=1.5, memory=900), 0)], [node], [])) == ["n"]
    (_, reason), = place([Request(spec(cpu=1.6), 0)], [node], []).failed
    assert "cpu: 1.5 of 1.5 free, needs 1.6" in reason


def test_running_replicas_take_their_requests_not_their_limits():
    s = dataclasses.replace(spec(), resources=config.Resources(
        requests=config.ResourceAmounts(cpu=0.5, memory=100), limits=config.ResourceAmounts(cpu=2, memory=900)))
    running = Replica("web-0", "web", 0, "r1", "a", True)
    assert allocations({"web": (s, "r1")}, [running]) == [Allocation("a", "web", 0.5, 100)]
