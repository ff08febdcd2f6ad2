"""The rollout's bookkeeping around the engine, pure (core/rollout_plan.py): when a rollout
begins, what the engine observes, where a rollout's new replica goes, and what a step
does to history. Rows read "replicas (facts) -> what the core decides".

Replica facts are written ``<rev><slot><state>``: rev ``o`` (old) or ``n`` (the target),
state ``A`` serving (passing in the catalog), ``S`` running, not yet serving, ``R`` ready
but not acknowledged by the catalog, ``X`` exited, ``T`` being retired."""

from __future__ import annotations

import dataclasses

import pytest

import config
from supervisor.core.model import Observed, Replica, SetWeight, Start, Stop, Unplaceable, Wait
from supervisor.core.placement import Allocation, NodeInfo, Request, place_beside
from supervisor.core.rollout_plan import Counts, begin, observe, plan_step, spec_of_revision
from supervisor.core.rollout_types import (COMPLETE, EXITED, FAILED, PAUSED, PROGRESSING, READY,
                                           REVERTING, STARTING, TERMINATING, RolloutState)

OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
NOW = 1000.0
NODES = (NodeInfo("a", "process"), NodeInfo("b", "process"))


def spec(replicas: int = 3, policy: str = "always", **update) -> config.ServiceSpec:
    return config.ServiceSpec.from_dict({"name": "web", "command": ["app"], "replicas": replicas,
                                         "restart": {"policy": policy}, "update": update})


def facts(*codes: str, node: str = "a") -> tuple[Replica, ...]:
    out = []
    for code in codes:
        rev, slot, st = code[0], int(code[1]), code[2]
        revision = NEW if rev == "n" else OLD
        out.append(Replica(f"{rev}{slot}", "web", slot, revision, node, running=st not in "X",
                           ready=st in "AR", serving=st == "A", ready_since=NOW - 100 if st == "A" else None,
                           started_at=NOW - 200, finished_at=NOW - 1 if st == "X" else None,
                           exit_code=1 if st == "X" else None, terminating=st == "T"))
    return tuple(out)


def state(**kw) -> RolloutState:
    base = dict(service="web", revision=NEW, phase=PROGRESSING, started_at=NOW - 10, last_progress_at=NOW - 10,
                revert_to=OLD)
    base.update(kw)
    return RolloutState(**base)


# ---------------------------------------------------------------- observe

@pytest.mark.parametrize("replicas, policy, expected", [
    pytest.param(("o0A", "n0S"), "always", {"o0": READY, "n0": STARTING}, id="serving-is-ready"),
    pytest.param(("n0R",), "always", {"n0": STARTING}, id="ready-not-acknowledged-is-starting"),
    pytest.param(("o0T", "n0A"), "always", {"o0": TERMINATING, "n0": READY}, id="retired"),
    pytest.param(("n0X",), "always", {"n0": STARTING}, id="exited-target-restarted"),
    pytest.param(("n0X",), "never", {"n0": EXITED}, id="exited-target-not-restarted"),
    pytest.param(("n0X", "n0S"), "always", {"n0": STARTING}, id="exited-beside-a-running-one-is-not-seen"),
    pytest.param(("o1X",), "always", {"o1": EXITED}, id="exited-old"),
])
def test_observe_phases(replicas, policy, expected) -> None:
    seen = observe(state(), facts(*replicas), spec(policy=policy), Counts(), {}, NOW)
    got: dict[str, str] = {}
    for r in seen:
        got[r.instance_id] = r.phase
    assert got == expected


def test_observe_counts_restarts_and_last_exit_of_the_target_only() -> None:
    counts = Counts(crashes={0: 2}, last_exit={0: 137})
    seen = {r.instance_id: r for r in observe(state(), facts("o0A", "n0S"), spec(), counts, {}, NOW)}
    assert (seen["n0"].restarts, seen["n0"].last_exit) == (2, 137)
    assert (seen["o0"].restarts, seen["o0"].last_exit) == (0, None)


def test_observe_the_newest_exit_stands_for_its_slot() -> None:
    older = dataclasses.replace(facts("n0X")[0], instance_id="n0-old", finished_at=NOW - 50)
    seen = observe(state(), (older, *facts("n0X")), spec(policy="never"), Counts(), {}, NOW)
    assert [r.instance_id for r in seen] == ["n0"]


# ---------------------------------------------------------------- begin

@pytest.mark.parametrize("st, replicas, paused, expect", [
    pytest.param(None, (), None, "no-state", id="first-deploy-no-rollout"),
    pytest.param(None, ("n0A", "n1A", "n2A"), None, COMPLETE, id="first-deploy-all-ready-is-complete"),
    pytest.param(None, ("o0A", "o1A", "o2A"), None, PROGRESSING, id="others-running-start-a-rollout"),
    pytest.param(None, ("o0A",), "maintenance window", PAUSED, id="paused-by-the-cli-starts-paused"),
    pytest.param(state(revision=NEW, phase=COMPLETE), ("o0A",), None, None, id="already-the-target"),
    pytest.param(state(revision=OLD, phase=COMPLETE, reverted_from=NEW), ("o0A",), None, None,
                 id="the-revision-reverted-from-starts-nothing"),
])
def test_begin(st, replicas, paused, expect) -> None:
    history = [{"number": 1, "revision": OLD, "status": "complete", "created_at": 1.0, "spec": None}]
    got = begin("web", spec(), NEW, None, st, history, facts(*replicas), paused, NOW)
    if expect is None:
        assert got is None
        return
    if expect == "no-state":
        assert got.state is None and not got.started
    else:
        assert got.state.phase == expect and got.state.revision == NEW
        assert got.started == (expect in (PROGRESSING, PAUSED))
        if got.started:
            assert got.state.revert_to == OLD                     # the last complete revision
    assert [e["revision"] for e in got.history] == [OLD, NEW]      # recorded, numbered next
    assert got.history[-1]["number"] == 2
    if expect == COMPLETE:
        assert got.history[-1]["status"] == "complete"


def test_begin_records_a_restart_token_and_what_changed() -> None:
    history = [{"number": 1, "revision": OLD, "status": "complete", "created_at": 1.0,
                "spec": spec().to_dict(), "restart_token": None}]
    got = begin("web", spec(), NEW, "t1", None, history, facts("o0A"), None, NOW)
    assert got.history[-1]["restart_token"] == "t1" and got.state.restart_token == "t1"
    assert got.history[-1]["change"] == "rolling restart"


def test_a_corrupt_history_is_replaced_and_said() -> None:
    got = begin("web", spec(), NEW, None, None, [{"number": "one"}], facts("o0A"), None, NOW)
    assert got.problem and "starting a new history" in got.problem
    assert [e["number"] for e in got.history] == [1]


# ---------------------------------------------------------------- placement of a rollout's replica

@pytest.mark.parametrize("beside, cpu_b, expected", [
    pytest.param(["b"], None, "b", id="beside-its-predecessor"),
    pytest.param(["gone", "b"], None, "b", id="first-known-node"),
    pytest.param([], None, "a", id="placed-anew-least-allocated"),
    pytest.param(["gone"], None, "a", id="predecessor-node-gone"),
    pytest.param(["b"], 1.0, "a", id="predecessor-node-full"),
])
def test_place_beside(beside, cpu_b, expected) -> None:
    nodes = (NodeInfo("a", "process"), NodeInfo("b", "process", cpu=cpu_b))
    existing = [Allocation("b", "other", 0.75, 0)]
    half = config.ResourceAmounts(cpu=0.5)
    request = Request(dataclasses.replace(spec(), resources=config.Resources(requests=half, limits=half)), 0)
    result = place_beside(request, beside, nodes, existing)
    assert [node for _, node in result.placed] == [expected]


# ---------------------------------------------------------------- plan_step

def _observed(replicas, holds=None, nodes=NODES) -> Observed:
    return Observed(replicas=replicas, nodes=nodes, holds=holds or {})


def _plan(st, replicas, s=None, holds=None, counts=Counts(), nodes=NODES, history=None):
    s = s or spec(replicas=3, max_surge=1, max_unavailable=0)
    history = history if history is not None else [
        {"number": 1, "revision": OLD, "status": "complete", "created_at": 1.0, "spec": s.to_dict(),
         "restart_token": None},
        {"number": 2, "revision": NEW, "status": "active", "created_at": 2.0, "spec": s.to_dict(),
         "restart_token": None}]
    return plan_step("web", st, history, s, s, {"web": (s, NEW)}, _observed(replicas, holds, nodes),
                     counts, {}, NOW)


def test_a_start_goes_beside_the_slots_old_replica() -> None:
    plan = _plan(state(), facts("o0A", "o1A", node="b") + facts("o2A", node="a"))
    (start,) = plan.actions
    assert isinstance(start, Start) and (start.slot, start.node, start.revision) == (0, "b", NEW)


def test_a_held_slot_waits_instead_of_starting() -> None:
    plan = _plan(state(), facts("o0A", "o1A", "o2A"), holds={("web", 0): NOW + 5})
    assert plan.actions == (Wait("web", 0, NOW + 5, plan.actions[0].reason),)


def test_nothing_fits_is_unplaceable_with_the_reason() -> None:
    small = (NodeInfo("a", "docker"),)
    plan = _plan(state(), facts("o0A", "o1A", "o2A"), nodes=small)
    assert isinstance(plan.actions[0], Unplaceable) and "no image" in plan.actions[0].reason


def test_a_retire_is_a_stop_and_a_weight_a_setweight() -> None:
    plan = _plan(state(), facts("o0A", "o1A", "o2A", "n0A"))
    assert [type(a) for a in plan.actions] == [Stop]
    assert plan.actions[0].instance_id == "o0" and plan.actions[0].reason.startswith("retired: ")
    canary = spec(replicas=3, max_surge=1, max_unavailable=0, canary=[{"weight": 10}])
    plan = _plan(state(), facts("o0A", "o1A", "o2A", "n0S"), s=canary)
    assert {type(a) for a in plan.actions} == {SetWeight}


def test_a_crash_marks_failed_and_reverts_with_the_targets_token() -> None:
    history = [{"number": 1, "revision": OLD, "status": "complete", "created_at": 1.0,
                "spec": spec().to_dict(), "restart_token": "t0"},
               {"number": 2, "revision": NEW, "status": "active", "created_at": 2.0,
                "spec": spec().to_dict(), "restart_token": None}]
    plan = _plan(state(), facts("o0A", "o1A", "o2A", "n0S"), counts=Counts(crashes={0: 2}), history=history)
    assert plan.reverted and plan.failed and "restarted 2 times" in plan.failed
    assert plan.state.phase == REVERTING and plan.state.revision == OLD and plan.state.restart_token == "t0"
    assert [(e["number"], e["revision"], e["status"]) for e in plan.history] == [
        (2, NEW, "failed"), (3, OLD, "active")]


def test_refused_starts_fail_the_rollout_with_the_runtimes_reason() -> None:
    s = spec(replicas=3, max_surge=1, max_unavailable=0, auto_revert=False)
    history = [{"number": 1, "revision": NEW, "status": "active", "created_at": 2.0, "spec": s.to_dict(),
                "restart_token": None}]
    plan = plan_step("web", state(revert_to=None), history, s, s, {"web": (s, NEW)},
                     _observed(facts("o0A", "o1A", "o2A")), Counts(refused={0: 2}),
                     {0: "image web:9 not found on node a"}, NOW)
    assert plan.state.phase == FAILED
    assert "web-0 of revision bbbbbbbbbbbb could not be started (2 attempts): image web:9 not found" \
        in plan.failed


def test_not_progressing_is_no_step() -> None:
    assert _plan(state(phase=PAUSED), facts("o0A")) is None


def test_spec_of_revision() -> None:
    applied = spec(replicas=5)
    old = dataclasses.replace(spec(replicas=2), env=config.FrozenDict({"V": "1"}))
    history = [{"number": 1, "revision": OLD, "spec": old.to_dict()}, {"number": 2, "revision": "bad", "spec": {"x": 1}}]
    got, problem = spec_of_revision(applied, NEW, history, OLD)
    assert got.env == {"V": "1"} and got.replicas == 5 and problem is None     # the template, the scale now
    assert spec_of_revision(applied, NEW, history, NEW) == (applied, None)
    got, problem = spec_of_revision(applied, NEW, history, "bad")
    assert got is applied and "history entry 2" in problem
    assert spec_of_revision(applied, NEW, history, "unknown") == (applied, None)


def test_observed_replicas_of_other_services_take_room() -> None:
    """Placement of a rollout's start counts every running replica's request."""
    big = config.ServiceSpec.from_dict({"name": "web", "command": ["app"], "replicas": 1,
                                        "resources": {"cpu": 1}, "update": {"max_surge": 1, "max_unavailable": 0}})
    nodes = (NodeInfo("a", "process", cpu=1.0), NodeInfo("b", "process", cpu=1.0))
    history = [{"number": 1, "revision": NEW, "status": "active", "created_at": 2.0, "spec": big.to_dict(),
                "restart_token": None}]
    other = Replica("db-0", "db", 0, "x", "a", True)
    db = config.ServiceSpec.from_dict({"name": "db", "command": ["db"], "resources": {"cpu": 1}})
    replicas = (Replica("o0", "web", 0, OLD, "b", True, ready=True, serving=True, ready_since=NOW - 100), other)
    plan = plan_step("web", state(), history, big, big, {"web": (big, NEW), "db": (db, "x")},
                     _observed(replicas, nodes=nodes), Counts(), {}, NOW)
    assert isinstance(plan.actions[0], Unplaceable)   # b is full with o0 (a surge needs room); a holds db
    assert "cpu: 0 of 1 free, needs 1" in plan.actions[0].reason
