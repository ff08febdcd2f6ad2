"""Node loss, return and drain in the pure core: placement skips a node that takes no new
replica, reconcile replaces what ran on a lost node, stops what comes back with it, and
moves replicas off a draining node one surge at a time, each replacement ready first."""
from __future__ import annotations

import pytest

import config
from supervisor.core.placement import NodeInfo, Request, explain, place
from supervisor.core.reconcile import (DRAINED, DUPLICATE, NODE_RETURNED, Deregister, Kill, Observed, Register,
                                       Replica, Start, Stop, Unplaceable, reconcile)

NOW = 1000.0


def spec(replicas=2, surge="25%"):
    return config.ServiceSpec(name="web", command=("app",), replicas=replicas,
                              update=config.UpdateStrategy(max_surge=surge))


def rep(iid, slot, node, ready=True, **kw):
    return Replica(iid, "web", slot, "r1", node, True, ready=ready, started_at=kw.pop("started_at", 1.0), **kw)


def nodes(**state):
    """Nodes a, b, c; keyword arguments give a node's state: lost, down, cordoned, draining."""
    out = []
    for name in "abc":
        s = state.get(name)
        out.append(NodeInfo(name, "process", unavailable=None if s is None else s,
                            lost=s == "lost", draining=s == "draining"))
    return tuple(out)


def kinds(actions):
    out = []
    for a in actions:
        if isinstance(a, Start):
            out.append(f"start {a.slot}@{a.node}")
        elif isinstance(a, Stop):
            out.append(f"stop {a.instance_id} ({a.reason})")
        elif isinstance(a, Kill):
            out.append(f"kill {a.instance_id}")
        elif isinstance(a, Register):
            out.append(f"register {a.instance_id}")
        elif isinstance(a, Deregister):
            out.append(f"deregister {a.instance_id} ({a.reason})")
        elif isinstance(a, Unplaceable):
            out.append(f"unplaceable {a.slot}: {a.reason}")
    return out


@pytest.mark.parametrize("state, replicas, registered, expected", [
    pytest.param({"a": "down"}, [rep("x", 0, "a"), rep("y", 1, "b")], {"x": "web", "y": "web"},
                 [], id="down-within-grace-keeps-its-replicas"),
    pytest.param({"a": "lost"}, [rep("x", 0, "a"), rep("y", 1, "b")], {"x": "web", "y": "web"},
                 ["start 0@c", "deregister x (its node is lost)"], id="lost-replaced-elsewhere"),
    pytest.param({}, [rep("x", 0, "a", stale=True), rep("z", 0, "c", ready=False), rep("y", 1, "b")],
                 {"x": "web", "y": "web", "z": "web"},
                 [f"stop x ({NODE_RETURNED})"], id="returned-stale-stopped-even-before-replacement-ready"),
    pytest.param({}, [rep("x", 0, "a", stale=True), rep("y", 1, "b")], {"x": "web", "y": "web"},
                 [], id="returned-stale-alone-kept"),
    pytest.param({"a": "cordoned"}, [rep("x", 0, "a"), rep("y", 1, "b")], {"x": "web", "y": "web"},
                 [], id="cordon-moves-nothing"),
    pytest.param({"a": "draining"}, [rep("x", 0, "a"), rep("y", 1, "b")], {"x": "web", "y": "web"},
                 ["start 0@c"], id="drain-starts-replacement-first"),
    pytest.param({"a": "draining"}, [rep("x", 0, "a"), rep("z", 0, "c", ready=False), rep("y", 1, "b")],
                 {"x": "web", "y": "web", "z": "web"},
                 [], id="drain-waits-for-replacement-ready"),
    pytest.param({"a": "draining"}, [rep("x", 0, "a"), rep("z", 0, "c"), rep("y", 1, "b")],
                 {"x": "web", "y": "web", "z": "web"},
                 [f"stop x ({DRAINED})"], id="drain-stops-old-once-replacement-ready"),
    pytest.param({"a": "draining"}, [rep("x", 0, "a"), rep("z", 0, "c"), rep("w", 0, "b")],
                 {"x": "web", "z": "web", "w": "web"},
                 [f"stop x ({DRAINED})", f"stop w ({DUPLICATE})", "start 1@b"],
                 id="drain-extra-replica-off-node-is-duplicate"),
])
def test_node_states(state, replicas, registered, expected):
    desired = {"web": (spec(2), "r1")}
    got = kinds(reconcile(desired, Observed(replicas=tuple(replicas), registered=registered,
                                            nodes=nodes(**state)), NOW))
    assert sorted(got) == sorted(expected)


def test_drain_moves_one_surge_at_a_time():
    # 4 replicas on a, surge 25% -> 1 at a time; 50% -> 2
    replicas = tuple(rep(f"x{i}", i, "a") for i in range(4))
    reg = {r.instance_id: "web" for r in replicas}
    for surge, moving in (("25%", 1), ("50%", 2), (0, 1), (3, 3)):
        acts = reconcile({"web": (spec(4, surge), "r1")},
                         Observed(replicas=replicas, registered=reg, nodes=nodes(a="draining")), NOW)
        starts = [a for a in acts if isinstance(a, Start)]
        assert len(starts) == moving, surge
        assert all(a.node != "a" for a in starts)
        assert not [a for a in acts if isinstance(a, Stop)]   # nothing stops before its replacement is ready
    # one move in flight (replacement not ready) with surge 1: no second move yet
    busy = replicas + (rep("n0", 0, "b", ready=False),)
    acts = reconcile({"web": (spec(4, 1), "r1")},
                     Observed(replicas=busy, registered=reg, nodes=nodes(a="draining")), NOW)
    assert [a for a in acts if isinstance(a, (Start, Stop))] == []


def test_drain_with_nowhere_to_go_says_why_and_keeps_serving():
    ns = (NodeInfo("a", "process", unavailable="draining", draining=True),
          NodeInfo("b", "docker"))   # a docker node cannot run a command
    acts = reconcile({"web": (spec(1), "r1")},
                     Observed(replicas=(rep("x", 0, "a"),), registered={"x": "web"}, nodes=ns), NOW)
    assert kinds(acts) == ["unplaceable 0: cannot move off its node: no node fits "
                           "(a: draining; b: docker node, service has no image)"]


def test_unavailable_node_is_filtered_with_its_reason():
    ns = (NodeInfo("a", "process", unavailable="unreachable since 12:00:00"), NodeInfo("b", "process"),
          NodeInfo("c", "process", unavailable="cordoned"))
    got = place([Request(spec(1), 0)], ns, [])
    assert [n for _, n in got.placed] == ["b"]
    verdicts = {v.node: v.reason for v in explain(Request(spec(1), 0), ns, []).verdicts}
    assert verdicts == {"b": None, "a": "unreachable since 12:00:00", "c": "cordoned"}
    assert place([Request(spec(1), 0)], ns[:1], []).failed[0][1] == "no node fits (a: unreachable since 12:00:00)"
