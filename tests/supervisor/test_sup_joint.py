"""A whole config placed at once by the supervisor packs as `meshlet plan` does: the
joint placement of every waiting replica is handed to each service's reconcile."""
from __future__ import annotations

import config
from supervisor.core.joint import joint_hints, waiting_slots
from supervisor.core.placement import NodeInfo, Request, place
from supervisor.core.reconcile import Observed, Replica, Start, reconcile

NOW = 1000.0


def svc(name, replicas, cpu, mem=0, strategy="binpack"):
    return config.ServiceSpec(name=name, command=("app",), replicas=replicas,
                              placement=config.Placement(strategy=strategy),
                              resources=config.Resources(requests=config.ResourceAmounts(cpu=cpu, memory=mem or None)))


NODES = (NodeInfo("big", "process", cpu=8.0), NodeInfo("m1", "process", cpu=3.0), NodeInfo("m2", "process", cpu=3.0),
         NodeInfo("small", "process", cpu=2.0))


def starts(actions):
    return sorted((a.service, a.slot, a.node) for a in actions if isinstance(a, Start))


def _one_by_one(desired, order, hints=None):
    """Each service's sync in ``order``, each seeing what the previous ones started."""
    running, out = [], []
    for name in order:
        acts = reconcile(desired, Observed(nodes=NODES, replicas=tuple(running), hints=hints or {}), NOW)
        mine = [a for a in starts(acts) if a[0] == name]
        out += mine
        running += [Replica(f"{s}{slot}", s, slot, "r", n, True, ready=True) for s, slot, n in mine]
    return sorted(out)


def _capacity_used(placed):
    cpu = {n.name: n.cpu for n in NODES}
    return sum(cpu[n] for n in {node for _, _, node in placed})


def test_services_synced_one_by_one_land_where_one_joint_placement_puts_them():
    desired = {"a": (svc("a", 1, 2.5), "r"), "b": (svc("b", 3, 1.0), "r"), "c": (svc("c", 2, 2.5), "r")}
    hints = joint_hints(desired, Observed(nodes=NODES))
    joint = place([Request(desired[n][0], s) for n in sorted(desired) for s in range(desired[n][0].replicas)],
                  NODES, [])
    assert hints == {(r.spec.name, r.slot): node for r, node in joint.placed}
    expected = sorted((s, slot, n) for (s, slot), n in hints.items())
    # whatever order the syncs run in, the hints give the joint placement
    for order in ("abc", "cba", "bca"):
        assert _one_by_one(desired, order, hints) == expected
    # without them, syncs a, b, c open three nodes (14 CPUs) where the joint placement uses two (11)
    alone = _one_by_one(desired, "abc")
    assert (_capacity_used(alone), _capacity_used(expected)) == (14.0, 11.0)


def test_a_hint_that_no_longer_fits_is_placed_anew():
    desired = {"a": (svc("a", 1, 2.0), "r")}
    full = (Replica("x", "other", 0, "r", "small", True, ready=True),)
    other = {"other": (svc("other", 1, 2.0), "r"), **desired}
    acts = reconcile(other, Observed(replicas=full, nodes=NODES, hints={("a", 0): "small"}), NOW)
    alone = reconcile(other, Observed(replicas=full, nodes=NODES), NOW)
    assert starts(acts) == starts(alone) and starts(acts)[0][2] != "small"


def test_only_slots_with_no_replica_and_two_or_more_services_wait():
    desired = {"a": (svc("a", 2, 1.0), "r"), "b": (svc("b", 1, 1.0), "r")}
    running = (Replica("x", "a", 0, "r", "big", True, ready=True),)
    assert waiting_slots(desired, Observed(replicas=running, nodes=NODES)) == [("a", 1), ("b", 0)]
    assert joint_hints({"a": desired["a"]}, Observed(nodes=NODES)) == {}      # one service: its own sync
    assert joint_hints(desired, Observed(nodes=NODES, rolling=frozenset({"b"}))) == {}
