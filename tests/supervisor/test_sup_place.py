"""Placement rules (supervisor/core/placement.py): one table, one checker; explain; and
the properties every placement keeps (never over a node's room, never against a
constraint, deterministic, pending only when nothing can hold it)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from supervisor.core.model import Replica
from supervisor.core.placement import Allocation, NodeInfo, Request, explain, node_info, place
from supervisor.core.reconcile import allocations

G = 2**30


def spec(name="web", cpu=None, memory=None, image=None, strategy="spread", constraints=(), spread_over=(),
         limit_cpu=None):
    requests = config.ResourceAmounts(cpu=cpu, memory=memory)
    limits = config.ResourceAmounts(cpu=limit_cpu or cpu, memory=memory)
    return config.ServiceSpec(
        name=name, image=image, command=None if image else ("app",),
        resources=config.Resources(requests=requests, limits=limits),
        placement=config.Placement(strategy=strategy, constraints=tuple(constraints),
                                   spread_over=tuple(spread_over)))


def binpack(**kw):
    return spec(strategy="binpack", **kw)


A = NodeInfo("a", "process", cpu=2, memory=1000)
B = NodeInfo("b", "process", cpu=2, memory=1000)
D = NodeInfo("d", "docker", cpu=2, memory=1000, labels={"disk": "ssd"})
RESERVED = NodeInfo("r", "process", cpu=2, memory=1000, reserved_cpu=0.5)
UNBOUNDED = NodeInfo("u", "process")
# zones: a1, a2 in zone a; b1 in zone b; x without the label
Z = [NodeInfo("a1", "process", labels={"zone": "a"}), NodeInfo("a2", "process", labels={"zone": "a"}),
     NodeInfo("b1", "process", labels={"zone": "b"})]
NOZONE = NodeInfo("x", "process")
# shapes of nodes: cpu-heavy, memory-heavy, small
CPU16 = NodeInfo("c16", "process", cpu=16, memory=16 * G)
MEM32 = NodeInfo("m32", "process", cpu=4, memory=32 * G)
SMALL = NodeInfo("s2", "process", cpu=2, memory=4 * G)


def reqs(s, count, failed_on=None):
    return [Request(s, i, failed_on) for i in range(count)]


@pytest.mark.parametrize("requests, nodes, existing, expected", [
    # spread: fewest replicas of the service, then least allocated
    pytest.param(reqs(spec(), 2), [A, B], [], ["a", "b"], id="spread-two"),
    pytest.param(reqs(spec(), 3), [A, B], [Allocation("a", "web")], ["b", "a", "b"], id="spread-around-existing"),
    pytest.param(reqs(spec(cpu=1), 1), [A, B], [Allocation("a", "api", cpu=1)], ["b"], id="least-allocated"),
    # binpack: most allocated first, a node in use before an empty one
    pytest.param(reqs(binpack(cpu=1), 2), [A, B], [Allocation("b", "api", cpu=1)], ["b", "a"],
                 id="binpack-most-allocated"),
    pytest.param(reqs(binpack(cpu=0.5), 4), [A, B], [], ["a", "a", "a", "a"], id="binpack-fills-one-node"),
    pytest.param(reqs(binpack(cpu=0.5), 1), [A, NodeInfo("big", "process", cpu=8, memory=1000)],
                 [Allocation("big", "api", cpu=0.5)], ["big"], id="binpack-node-in-use-before-empty"),
    # BestFit: of two nodes equally full after it, the one whose cpu and memory are used evenly
    pytest.param(reqs(binpack(cpu=0.5, memory=250), 1), [A, B],
                 [Allocation("a", "x", cpu=1.5, memory=0), Allocation("b", "x", cpu=0.5, memory=500)], ["b"],
                 id="binpack-balanced"),
    # an empty node is chosen by what it would hold for its size: cpu-heavy replicas fill
    # the 16-core node; the 4-core, 32 GiB one would strand its memory
    pytest.param(reqs(binpack(cpu=2, memory=G), 8), [MEM32, SMALL, CPU16], [], ["c16"] * 8,
                 id="binpack-empty-node-shaped-for-the-work"),
    pytest.param(reqs(binpack(cpu=0.25, memory=4 * G), 8), [CPU16, SMALL, MEM32], [], ["m32"] * 8,
                 id="binpack-memory-heavy-on-the-memory-node"),
    # fit: requests against the room left
    pytest.param(reqs(spec(memory=600), 2), [A, B], [], ["a", "b"], id="memory-forces-spread"),
    pytest.param(reqs(spec(cpu=1, limit_cpu=4), 2), [A], [], ["a", "a"], id="requests-not-limits"),
    pytest.param(reqs(spec(cpu=1.5), 1), [RESERVED], [], ["r"], id="reserve-leaves-room"),
    pytest.param(reqs(spec(cpu=64, memory=64 * G), 2), [UNBOUNDED], [], ["u", "u"], id="unbounded-node"),
    pytest.param([Request(spec("small", cpu=1), 0), Request(spec("big", cpu=2), 0)],
                 [A, NodeInfo("b", "process", cpu=1, memory=1000)], [], ["a", "b"], id="largest-first"),
    # hard filters
    pytest.param(reqs(spec(image="x"), 1), [A, D], [], ["d"], id="image-needs-docker"),
    pytest.param(reqs(spec(constraints=["node.name != a"]), 2), [A, B], [], ["b", "b"], id="constraint"),
    pytest.param(reqs(spec(image="x", constraints=["node.labels.disk == ssd"]), 1),
                 [NodeInfo("e", "docker"), D], [], ["d"], id="label-constraint"),
    # spread_over: fewest replicas of the service in the node's group of the label first
    pytest.param(reqs(spec(spread_over=["zone"]), 4), Z, [], ["a1", "b1", "a2", "b1"], id="spread-over-zone"),
    pytest.param(reqs(binpack(cpu=0.1, spread_over=["zone"]), 3), Z, [], ["a1", "b1", "a1"],
                 id="spread-over-zone-binpack-within"),
    pytest.param(reqs(spec(spread_over=["zone"]), 3), [Z[0], NOZONE], [Allocation("a1", "web")],
                 ["x", "a1", "x"], id="no-label-is-a-group-of-its-own"),
    # the node where the slot's replica just failed: below every equally good node
    pytest.param(reqs(spec(), 1, failed_on="a"), [A, B], [Allocation("b", "web")], ["b"],
                 id="failed-node-avoided-over-spread"),
    pytest.param(reqs(spec(), 1, failed_on="a"), [A], [], ["a"], id="failed-node-when-alone"),
    # nodes alike in room and use rank alike but for their names: each still fills only
    # to its room (a and b take 2 replicas each; u, unbounded in memory, the rest)
    pytest.param(reqs(spec(memory=250), 6), [NodeInfo("a", "process", memory=1000), NodeInfo("b", "process", memory=1000),
                                             NodeInfo("u", "process", cpu=1)],
                 [Allocation("a", "api", memory=500), Allocation("b", "api", memory=500),
                  Allocation("u", "api", cpu=1), Allocation("u", "web")], ["a", "b", "a", "b", "u", "u"],
                 id="alike-nodes-fill-to-their-room"),
    pytest.param(reqs(spec(spread_over=["zone"]), 1, failed_on="b1"), Z,
                 [Allocation("a1", "web"), Allocation("a2", "web")], ["b1"], id="zone-spread-before-failed-node"),
    pytest.param(reqs(binpack(cpu=1), 1, failed_on="b"), [A, B], [Allocation("b", "api", cpu=0.5)], ["a"],
                 id="failed-node-avoided-over-binpack"),
])
def test_placement(requests, nodes, existing, expected):
    result = place(requests, nodes, existing)
    assert [n for _, n in result.placed] == expected and not result.failed


def test_nothing_fits_says_why_for_every_node():
    result = place([Request(spec(cpu=3), 0)], [A, D], [])
    (req, reason), = result.failed
    assert req.slot == 0
    assert reason == "no node fits (a: cpu: 2 of 2 free, needs 3; d: docker node, service has no image)"


def test_on_a_large_fleet_the_reason_counts_nodes_per_cause():
    nodes = [NodeInfo(f"n{i}", "process", cpu=1) for i in range(12)] + [NodeInfo("d", "docker")]
    (_, reason), = place([Request(spec(cpu=2), 0)], nodes, []).failed
    assert reason == "no node fits (0 of 13 nodes: 12 lack cpu, 1: docker node, service has no image)"


def test_capacity_is_used_up_by_earlier_placements():
    result = place(reqs(spec(memory=600), 3), [A, B], [])
    assert [n for _, n in result.placed] == ["a", "b"] and result.failed[0][0].slot == 2


def test_a_nodes_reserve_is_never_offered():
    node = node_info(config.NodeSpec(name="n", capacity=config.NodeCapacity(cpu=2, memory=1000),
                                     reserved=config.ResourceAmounts(cpu=0.5, memory=100)))
    assert [n for _, n in place([Request(spec(cpu=1.5, memory=900), 0)], [node], []).placed] == ["n"]
    (_, reason), = place([Request(spec(cpu=1.6), 0)], [node], []).failed
    assert reason == "no node fits (n: cpu: 1.5 of 1.5 free, needs 1.6)"


def test_running_replicas_take_their_requests_not_their_limits():
    s = dataclasses.replace(spec(), resources=config.Resources(
        requests=config.ResourceAmounts(cpu=0.5, memory=100), limits=config.ResourceAmounts(cpu=2, memory=900)))
    running = Replica("web-0", "web", 0, "r1", "a", True)
    assert allocations({"web": (s, "r1")}, [running]) == [Allocation("a", "web", 0.5, 100)]


# --- explain ---------------------------------------------------------------------------------

def test_explain_lists_each_node_filtered_out_or_scored_best_first():
    s = spec(cpu=1, constraints=["node.name != b"])
    nodes = [A, B, D, NodeInfo("c", "process", cpu=2, memory=1000)]
    got = explain(Request(s, 0, failed_on="c"), nodes, [Allocation("a", "api", cpu=1.5)])
    assert got.chosen == "c"
    assert [(v.node, v.reason) for v in got.verdicts] == [
        ("c", None), ("a", "cpu: 0.5 of 2 free, needs 1"), ("b", "constraint 'node.name != b'"),
        ("d", "docker node, service has no image")]
    assert got.verdicts[0].score.failed_here and got.verdicts[0].score.fit == 0.75   # (0.5 + 1) / 2
    assert got.lines()[0] == ("* c: fit 0.750 (LeastAllocated), 0 of the service here, "
                              "its replica just failed here")


def test_explain_of_an_unplaceable_replica_chooses_nothing():
    got = explain(Request(spec(cpu=5), 0), [A], [])
    assert got.chosen is None and got.lines() == ["  a: filtered out: cpu: 2 of 2 free, needs 5"]


# --- properties ----------------------------------------------------------------------------

LABELS = st.fixed_dictionaries({}, optional={"zone": st.sampled_from(["a", "b", "c"]),
                                             "disk": st.sampled_from(["ssd", "hdd"])})
NODE = st.builds(lambda i, rt, cpu, mem, rc, labels: NodeInfo(
    f"n{i}", rt, cpu=cpu, memory=mem, labels=labels,
    reserved_cpu=min(rc, cpu / 2) if cpu else 0.0),
    st.integers(0, 99), st.sampled_from(["process", "docker"]),
    st.one_of(st.none(), st.sampled_from([1.0, 2.0, 4.0, 16.0])),
    st.one_of(st.none(), st.sampled_from([1000, 4000, 32000])), st.sampled_from([0.0, 0.5]), LABELS)
SERVICE = st.builds(
    lambda i, image, cpu, mem, strategy, cons, over: spec(
        f"s{i}", cpu=cpu, memory=mem, image="img" if image else None, strategy=strategy,
        constraints=cons, spread_over=over),
    st.integers(0, 5), st.booleans(), st.one_of(st.none(), st.sampled_from([0.1, 0.5, 1.0, 3.0])),
    st.one_of(st.none(), st.sampled_from([100, 500, 2000])), st.sampled_from(["spread", "binpack"]),
    st.lists(st.sampled_from(["node.labels.disk == ssd", "node.labels.zone != c", "node.name != n1"]),
             unique=True, max_size=2),
    st.lists(st.sampled_from(["zone", "disk"]), unique=True, max_size=2))


@st.composite
def problems(draw):
    nodes = draw(st.lists(NODE, max_size=8, unique_by=lambda n: n.name))
    services = draw(st.lists(SERVICE, min_size=1, max_size=4, unique_by=lambda s: s.name))
    requests = [Request(s, slot, draw(st.one_of(st.none(), st.sampled_from([n.name for n in nodes] or ["gone"]))))
                for s in services for slot in range(draw(st.integers(1, 6)))]
    existing = [Allocation(n.name, draw(st.sampled_from(["s0", "other"])), draw(st.sampled_from([0.0, 0.5])), 100)
                for n in nodes if draw(st.booleans())]
    return requests, nodes, existing


def _from(result, existing):
    return list(existing) + [Allocation(node, r.spec.name, r.spec.resources.requests.cpu or 0.0,
                                        r.spec.resources.requests.memory or 0) for r, node in result.placed]


@settings(max_examples=300, deadline=None)
@given(problems())
def test_placement_keeps_its_promises(problem):
    requests, nodes, existing = problem
    result = place(requests, nodes, existing)
    by_name = {n.name: n for n in nodes}
    # every request once: placed or pending
    assert sorted(id(r) for r, _ in result.placed + result.failed) == sorted(id(r) for r in requests)
    # never against the runtime or a constraint
    for r, node in result.placed:
        n = by_name[node]
        assert (n.runtime == "docker") == bool(r.spec.image)
        for c in r.spec.placement.constraints:
            key, _, value = c.partition(" != ") if "!=" in c else c.partition(" == ")
            actual = n.name if key == "node.name" else n.labels.get(key.removeprefix("node.labels."))
            assert (actual != value) if "!=" in c else (actual == value)
    # a node given a replica ends within its room (capacity less its reserve)
    final = _from(result, existing)
    for n in {node for _, node in result.placed}:
        here = [a for a in final if a.node == n]
        if by_name[n].room_cpu is not None:
            assert sum(a.cpu for a in here) <= by_name[n].room_cpu + 1e-6
        if by_name[n].room_memory is not None:
            assert sum(a.memory for a in here) <= by_name[n].room_memory
    # pending only when, in the end, no node can hold it
    for r, _ in result.failed:
        assert explain(Request(r.spec, r.slot), nodes, final).chosen is None
    # deterministic
    assert place(requests, nodes, existing) == result


@settings(max_examples=200, deadline=None)
@given(problems())
def test_one_replica_goes_where_explain_says(problem):
    requests, nodes, existing = problem
    request = requests[0]
    placed = place([request], nodes, existing).placed
    assert explain(request, nodes, existing).chosen == (placed[0][1] if placed else None)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_a_batch_of_spread_replicas_goes_where_one_at_a_time_would(problem):
    """The heap with lazy re-keying decides as ranking every node for each replica would."""
    requests, nodes, existing = problem
    requests = [dataclasses.replace(r, spec=dataclasses.replace(
        r.spec, placement=dataclasses.replace(r.spec.placement, strategy="spread"))) for r in requests]
    specs = {r.spec.name: r.spec for r in requests}
    requests = [dataclasses.replace(r, spec=specs[r.spec.name]) for r in requests]
    batch = place(requests, nodes, existing)
    so_far = list(existing)
    for r, node in batch.placed:
        one = place([r], nodes, so_far).placed
        assert one and one[0][1] == node
        so_far = _from(place([r], nodes, so_far), so_far)
