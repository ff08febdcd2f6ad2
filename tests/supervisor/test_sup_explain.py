"""core.explain: per slot of a service, what placement would decide now and why, from the
fleet as observed (the slot's own replicas leave their room to it)."""

from __future__ import annotations

import config
from supervisor.core.explain import explain_service, format_explanation
from supervisor.core.model import Observed, Replica
from supervisor.core.placement import node_info

CFG = config.loads("""
mesh:
  nodes:
    - {name: a, capacity: {cpu: 2}}
    - {name: b, capacity: {cpu: 1}}
services:
  web: {command: [x], replicas: 2, resources: {requests: {cpu: 1.5}}}
  other: {command: [y], resources: {requests: {cpu: 1}}}
""", base_dir="/")
DESIRED = {n: (s, "r1") for n, s in CFG.services.items()}
NODES = tuple(node_info(n) for n in CFG.mesh.nodes)


def run(*replicas: Replica):
    return explain_service("web", DESIRED, Observed(replicas=replicas, nodes=NODES))


def test_a_slots_own_replica_leaves_its_room_and_others_take_theirs() -> None:
    doc = run(Replica("web-0-x", "web", 0, "r1", "a", True))
    s0, s1 = doc["slots"]
    assert s0["running_on"] == ["a"] and s0["chosen"] == "a"        # its own 1.5 is room for itself
    assert s1["chosen"] is None                                      # a holds 0.5 free, b has 1
    assert {n["node"]: n["filtered"] for n in s1["nodes"]} == {
        "a": "cpu: 0.5 of 2 free, needs 1.5", "b": "cpu: 1 of 1 free, needs 1.5"}


def test_the_node_a_slot_just_failed_on_is_named_and_ranked_below_equals() -> None:
    doc = run(Replica("web-1-y", "web", 1, "r1", "a", False, finished_at=5.0, exit_code=2))
    s1 = doc["slots"][1]
    assert s1["failed_on"] == "a" and s1["running_on"] == []
    clean = run(Replica("web-1-y", "web", 1, "r1", "a", False, finished_at=5.0, exit_code=0))
    assert clean["slots"][1]["failed_on"] is None                    # a clean exit avoids no node


def test_not_desired_is_none_and_the_text_marks_the_choice() -> None:
    assert explain_service("nope", DESIRED, Observed(nodes=NODES)) is None
    lines = format_explanation(run())
    assert lines[0] == "web: 2 replicas"
    assert lines[1] == "slot 0: not running; placement now: a"
    assert lines[2].startswith("  * a: fit") and lines[3] == "    b: filtered out: cpu: 1 of 1 free, needs 1.5"


def test_room_of_a_start_under_way_is_not_given_twice() -> None:
    """Two services synced at once: the first one's start, decided but not yet a replica,
    holds its room, so the second one is pending rather than over-committing the node."""
    from supervisor.core.model import Start, Unplaceable
    from supervisor.core.placement import Allocation
    from supervisor.core.reconcile import reconcile_service
    one = config.loads("""
mesh: {nodes: [{name: only, capacity: {cpu: 2}}]}
services:
  a: {command: [x], resources: {requests: {cpu: 1.5}}}
  b: {command: [y], resources: {requests: {cpu: 1.5}}}
""", base_dir="/")
    desired = {n: (s, "r1") for n, s in one.services.items()}
    nodes = tuple(node_info(n) for n in one.mesh.nodes)
    free = reconcile_service("b", desired, Observed(nodes=nodes), now=0.0)
    assert [type(a) for a in free] == [Start]
    held = reconcile_service("b", desired, Observed(nodes=nodes, starting=(Allocation("only", "a", 1.5),)), now=0.0)
    assert [type(a) for a in held] == [Unplaceable] and "cpu" in held[0].reason
