"""meshlet rebalance in the pure core: the plan moves only what placement would now put
elsewhere for a reason of its strategy, and reconcile carries the moves out like a drain."""
from __future__ import annotations

import pytest

import config
from supervisor.core.placement import NodeInfo
from supervisor.core.rebalance import plan_rebalance
from supervisor.core.reconcile import REBALANCED, Observed, Replica, Start, Stop, reconcile

NOW = 1000.0


def spec(replicas=2, strategy="spread", cpu=None, surge="25%", name="web"):
    return config.ServiceSpec(name=name, command=("app",), replicas=replicas,
                              placement=config.Placement(strategy=strategy),
                              resources=config.Resources(requests=config.ResourceAmounts(cpu=cpu)),
                              update=config.UpdateStrategy(max_surge=surge))


def rep(iid, slot, node, service="web", ready=True, rev="r1"):
    return Replica(iid, service, slot, rev, node, True, ready=ready, started_at=1.0)


def nodes(*names, cpu=4.0):
    return tuple(NodeInfo(n, "process", cpu=cpu) for n in names)


def moves(desired, replicas, ns):
    plan = plan_rebalance(desired, Observed(replicas=tuple(replicas), nodes=ns))
    return [m.describe() for m in plan]


@pytest.mark.parametrize("desired, replicas, ns, expected", [
    pytest.param({"web": (spec(2), "r1")}, [rep("x", 0, "a"), rep("y", 1, "b")], nodes("a", "b", "c"),
                 [], id="balanced-spread-moves-nothing"),
    pytest.param({"web": (spec(3), "r1")}, [rep("x", 0, "a"), rep("y", 1, "a"), rep("z", 2, "b")],
                 nodes("a", "b", "c"), ["web slot 0: a -> c"], id="spread-onto-a-new-node"),
    pytest.param({"web": (spec(4), "r1")}, [rep(f"x{i}", i, "a") for i in range(4)], nodes("a", "b"),
                 ["web slot 0: a -> b", "web slot 1: a -> b"], id="spread-halves"),
    pytest.param({"web": (spec(2, strategy="binpack", cpu=1.0), "r1")}, [rep("x", 0, "a"), rep("y", 1, "b")],
                 nodes("a", "b"), ["web slot 0: a -> b"], id="binpack-consolidates"),
    pytest.param({"web": (spec(2, strategy="binpack", cpu=3.0), "r1")}, [rep("x", 0, "a"), rep("y", 1, "b")],
                 nodes("a", "b"), [], id="binpack-no-room-no-move"),
    pytest.param({"web": (spec(3), "r1")}, [rep("x", 0, "a"), rep("y", 1, "a", ready=False), rep("z", 2, "b")],
                 nodes("a", "b", "c"), ["web slot 0: a -> c"], id="a-replica-not-ready-stays"),
    pytest.param({"web": (spec(3), "r2")}, [rep("x", 0, "a"), rep("y", 1, "a"), rep("z", 2, "b")],
                 nodes("a", "b", "c"), [], id="outdated-replicas-are-the-rollouts"),
])
def test_plan(desired, replicas, ns, expected):
    assert moves(desired, replicas, ns) == expected


def test_unavailable_and_lost_nodes_take_nothing_and_give_nothing():
    ns = (NodeInfo("a", "process"), NodeInfo("b", "process"), NodeInfo("c", "process", unavailable="node cordoned"))
    replicas = [rep("x", 0, "a"), rep("y", 1, "a")]
    assert moves({"web": (spec(2), "r1")}, replicas, ns) == ["web slot 0: a -> b"]
    ns = (NodeInfo("a", "process", unavailable="node lost", lost=True), NodeInfo("b", "process"))
    assert moves({"web": (spec(2), "r1")}, replicas, ns) == []


def test_reconcile_carries_a_move_out_replacement_first():
    desired = {"web": (spec(2, surge=1), "r1")}
    ns = nodes("a", "b", "c")
    base = [rep("x", 0, "a"), rep("y", 1, "a")]
    reg = {"x": "web", "y": "web"}
    obs = Observed(replicas=tuple(base), registered=reg, nodes=ns, moves={("web", 0): "c"})
    acts = reconcile(desired, obs, NOW)
    assert [(a.slot, a.node) for a in acts if isinstance(a, Start)] == [(0, "c")]
    assert not [a for a in acts if isinstance(a, Stop)]
    # replacement starting: both stay
    starting = Observed(replicas=tuple(base) + (rep("n", 0, "c", ready=False),), registered=reg, nodes=ns,
                        moves={("web", 0): "c"})
    assert [a for a in reconcile(desired, starting, NOW) if isinstance(a, (Start, Stop))] == []
    # replacement ready: the old one goes
    ready = Observed(replicas=tuple(base) + (rep("n", 0, "c"),), registered=reg, nodes=ns, moves={("web", 0): "c"})
    stops = [a for a in reconcile(desired, ready, NOW) if isinstance(a, Stop)]
    assert [(a.instance_id, a.reason) for a in stops] == [("x", REBALANCED)]
