"""Table tests of the rollout engine: one call of ``rollout_step`` per row.

A row reads "replicas, surge, unavailable, old replicas, new replicas -> expected actions".
Replicas are written as letters, one per slot from 0: ``A`` available, ``R`` ready but not
yet for min_ready, ``S`` starting, ``T`` terminating, ``X`` exited for good, ``.`` no
replica in that slot. Old replica ids are ``o<slot>``, new ones ``n<slot>``."""

from __future__ import annotations

import dataclasses
import json

import pytest

import config
from supervisor.core.rollout import (AVAILABLE, COMPLETE, EXITED, FAILED, PAUSED, PROGRESSING, READY,
                                     REVERTING, STARTING, TERMINATING, MarkComplete, MarkFailed,
                                     ObservedReplica, RetireReplica, Revert, RolloutState, SetWeight,
                                     RolloutError, SlotRefusal, StartReplica, Strategy, canary_count,
                                     describe, pause, resolve_fenceposts, resume, rollout_step,
                                     start_rollout)

OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
NOW = 1000.0
_PHASE = {"A": AVAILABLE, "R": READY, "S": STARTING, "T": TERMINATING, "X": EXITED}


def replicas(old: str = "", new: str = "", restarts: int = 0) -> list[ObservedReplica]:
    out = []
    for prefix, rev, letters in (("o", OLD, old), ("n", NEW, new)):
        for slot, ch in enumerate(letters):
            if ch == ".":
                continue
            since = {"A": 0.0, "R": NOW - 1.0}.get(ch)
            out.append(ObservedReplica(f"{prefix}{slot}", slot, rev, _PHASE[ch], since,
                                       restarts if prefix == "n" else 0))
    return out


def state(**kw) -> RolloutState:
    base = dict(service="web", revision=NEW, started_at=NOW - 10, last_progress_at=NOW - 10,
                revert_to=OLD)
    base.update(kw)
    return RolloutState(**base)


def text(actions) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, StartReplica):
            out.append(f"start {a.slot}")
        elif isinstance(a, RetireReplica):
            out.append(f"retire {a.instance_id}")
        elif isinstance(a, SetWeight):
            out.append(f"weight {a.instance_id}={a.weight}")
        elif isinstance(a, MarkFailed):
            out.append("failed")
        elif isinstance(a, MarkComplete):
            out.append("complete")
        elif isinstance(a, Revert):
            out.append(f"revert {a.to_revision[:1]}")
    return out


# ---------------------------------------------------------------- fenceposts

@pytest.mark.parametrize("replicas, max_surge, max_unavailable, expected", [
    pytest.param(10, "25%", "25%", (3, 2), id="10-25%-25%-max13-min8"),
    pytest.param(1, "25%", "25%", (1, 0), id="1-25%-25%-start-new-first"),
    pytest.param(3, "25%", "25%", (1, 0), id="3-25%-25%"),
    pytest.param(2, 0, "1%", (0, 1), id="2-0-1%-forced-to-kill-first"),
    pytest.param(4, 0, 0, (0, 1), id="both-zero-becomes-1-unavailable"),
    pytest.param(3, 2, 5, (2, 3), id="unavailable-capped-at-replicas"),
    pytest.param(0, "25%", "25%", (0, 0), id="zero-replicas"),
    pytest.param(12, "25%", "25%", (3, 3), id="exact-percent-no-float-error"),
    pytest.param(5, "100%", "0%", (5, 0), id="blue-green"),
    pytest.param(10, "1", "3", (1, 3), id="counts-as-strings"),
])
def test_resolve_fenceposts(replicas, max_surge, max_unavailable, expected):
    assert resolve_fenceposts(replicas, max_surge, max_unavailable) == expected


def test_strategy_from_the_config_model():
    u = config.UpdateStrategy(max_surge="50%", max_unavailable=0, min_ready=5.0,
                              canary=(config.CanaryStep(weight=10, pause=60.0),
                                      config.CanaryStep(weight=50)))
    s = Strategy.from_spec(4, u)
    assert (s.replicas, s.surge, s.unavailable, s.min_ready) == (4, 2, 0, 5.0)
    assert s.canary == ((10, 60.0), (50, 0.0)) and s.auto_revert and s.kind == "rolling"


# ---------------------------------------------------------------- one rolling step

@pytest.mark.parametrize("r, surge, unavail, old, new, expected", [
    pytest.param(3, 1, 0, "AAA", "", ["start 0"], id="surge-first"),
    pytest.param(3, 1, 0, "AAA", "S", [], id="at-max-total-wait-for-new"),
    pytest.param(3, 1, 0, "AAA", "A", ["retire o0"], id="new-available-retire-its-pair"),
    pytest.param(3, 1, 0, "TAA", "A", [], id="retiring-replica-counts-against-surge"),
    pytest.param(3, 1, 0, ".AA", "A", ["start 1"], id="retired-gone-start-next"),
    pytest.param(1, 0, 1, "A", "", ["retire o0"], id="kill-first-one-replica"),
    pytest.param(1, 0, 1, "T", "", [], id="kill-first-wait-until-gone"),
    pytest.param(1, 0, 1, ".", "", ["start 0"], id="kill-first-then-start"),
    pytest.param(4, 1, 1, "AAAS", "S", ["retire o3"], id="unhealthy-old-first"),
    pytest.param(4, 1, 1, "AAAA", "S", ["retire o0"], id="down-to-min-available"),
    pytest.param(4, 1, 1, "AAA.", "SS..", [], id="never-below-min-available"),
    pytest.param(4, 1, 1, "AAAR", "S", ["retire o3"], id="ready-short-of-min-ready-is-unhealthy"),
    pytest.param(10, 3, 2, "AAAAAAAAAA", "", ["start 0", "start 1", "start 2"], id="10-surge-3-at-once"),
    pytest.param(2, 1, 0, "X.", "AA", ["retire o0"], id="cleanup-exited-old"),
    pytest.param(2, 1, 0, "", "AAA", ["retire n2"], id="scaled-down-surplus-new"),
    pytest.param(5, "100%", 0, "AAAAA", "", ["start 0", "start 1", "start 2", "start 3", "start 4"],
                 id="blue-green-all-at-once"),
])
def test_rolling_step(r, surge, unavail, old, new, expected):
    su, un = resolve_fenceposts(r, surge, unavail)
    result = rollout_step(state(), replicas(old, new), Strategy(r, su, un, min_ready=5.0), NOW)
    assert text(result.actions) == expected
    assert result.state.phase == PROGRESSING


def test_kubernetes_10_replica_example_step_by_step():
    """10 replicas, 25%/25%: surge 3, unavailable 2 -> at most 13 replicas, at least 8
    available. Each row is the world the supervisor reports and what the engine decides."""
    s = Strategy(10, *resolve_fenceposts(10, "25%", "25%"))
    rows = [
        # old          new         -> expected
        ("AAAAAAAAAA", "",          ["start 0", "start 1", "start 2"]),     # 13 = 10 + 3
        ("AAAAAAAAAA", "SSS",       ["retire o0", "retire o1"]),            # 10 - 8 = 2 may go
        ("TTAAAAAAAA", "SSS",       []),                                    # 13 incl. terminating
        ("..AAAAAAAA", "SSS",       ["start 3", "start 4"]),                # back to 11
        ("..AAAAAAAA", "SSSSS",     []),                                    # 8 available: no more
        # 11 - 8 = 3 may go: old replicas whose slot has a new one first, lowest slot first
        ("..AAAAAAAA", "AAASS",     ["retire o2", "retire o3", "retire o4"]),
        (".....AAAAA", "AAASS",     ["start 5", "start 6", "start 7"]),
        # 13 available, 8 needed: every old one goes, paired ones first, the rest from the top
        (".....AAAAA", "AAAAAAAA",  ["retire o5", "retire o6", "retire o7", "retire o9", "retire o8"]),
        ("..........", "AAAAAAAA",  ["start 8", "start 9"]),
        ("..........", "AAAAAAAAAA", ["complete"]),
    ]
    st = state()
    for i, (old, new, expected) in enumerate(rows):
        world = replicas(old, new)
        result = rollout_step(st, world, s, NOW + i)
        assert text(result.actions) == expected, f"row {i}: {old} / {new}"
        available = sum(r.phase == AVAILABLE for r in world)
        assert len(world) <= 13 and available >= 8
        st = result.state
    assert st.phase == COMPLETE


def test_waiting_for_min_ready_asks_to_look_again_when_it_expires():
    s = Strategy(1, 1, 0, min_ready=5.0)
    result = rollout_step(state(), replicas("A", "R"), s, NOW)
    assert result.actions == ()
    assert result.followup_at == NOW - 1.0 + 5.0
    later = rollout_step(result.state, replicas("A", "R"), s, NOW + 4.0)
    assert text(later.actions) == ["retire o0"]


# ---------------------------------------------------------------- failure, revert, pause

@pytest.mark.parametrize("auto_revert, revert_to, phase, expected, reason", [
    pytest.param(True, OLD, REVERTING, ["failed", "revert a"], "restarted 2 times", id="auto-revert"),
    pytest.param(False, OLD, FAILED, ["failed"], "auto_revert is off", id="no-auto-revert"),
    pytest.param(True, None, FAILED, ["failed"], "no complete revision", id="nothing-to-revert-to"),
])
def test_crashing_new_replica_fails_the_rollout(auto_revert, revert_to, phase, expected, reason):
    s = Strategy(3, 1, 0, auto_revert=auto_revert)
    result = rollout_step(state(revert_to=revert_to), replicas("AAA", "S", restarts=2), s, NOW)
    assert text(result.actions) == expected
    assert result.state.phase == phase
    assert "web-0 (n0) of revision bbbbbbbbbbbb restarted 2 times" in result.actions[0].reason
    assert reason in (result.state.reason if phase == FAILED else result.actions[0].reason)


def test_a_slot_the_runtime_refuses_fails_the_rollout_with_the_runtimes_reason():
    why = "image web:9 not found on node a and could not be pulled"
    once = rollout_step(state(), replicas("AAA"), Strategy(3, 1, 0), NOW, {0: SlotRefusal(1, why)})
    assert text(once.actions) == ["start 0"]          # one refusal: tried again (after its hold)
    assert describe(state(), replicas("AAA"), Strategy(3, 1, 0), NOW, {0: SlotRefusal(1, why)}).endswith(
        f"web-0 could not be started (1 attempt): {why}")
    result = rollout_step(state(), replicas("AAA"), Strategy(3, 1, 0), NOW, {0: SlotRefusal(2, why)})
    assert text(result.actions) == ["failed", "revert a"]
    # the slot is named; no replica exists there, so no instance id is invented for it
    assert f"web-0 of revision bbbbbbbbbbbb could not be started (2 attempts): {why}" in result.actions[0].reason
    # a slot whose new replica runs now is no longer refused
    fine = rollout_step(state(), [*replicas("AAA"), *replicas("", "S")], Strategy(3, 1, 0), NOW,
                        {0: SlotRefusal(2, why)})
    assert "failed" not in text(fine.actions)


def test_the_failure_reason_gives_the_last_exit_code():
    crashing = dataclasses.replace(replicas("", "S", restarts=2)[0], last_exit=137)
    result = rollout_step(state(), [*replicas("AAA"), crashing], Strategy(3, 1, 0), NOW)
    assert ("web-0 (n0) of revision bbbbbbbbbbbb restarted 2 times without becoming available "
            "(last exit: code 137 (SIGKILL))") in result.actions[0].reason
    exited = dataclasses.replace(replicas("", "X")[0], last_exit=3)
    result = rollout_step(state(), [*replicas("AAA"), exited], Strategy(3, 1, 0), NOW)
    assert "web-0 (n0) of revision bbbbbbbbbbbb exited and is not restarted (last exit: code 3)" \
        in result.actions[0].reason


def test_exited_new_replica_fails_at_once():
    result = rollout_step(state(), replicas("AAA", "X"), Strategy(3, 1, 0), NOW)
    assert text(result.actions) == ["failed", "revert a"]
    assert "exited and is not restarted" in result.actions[0].reason


def test_revert_rolls_the_failed_replicas_back_by_the_same_rules():
    s = Strategy(3, 1, 0)
    st = rollout_step(state(), replicas("AAA", "S", restarts=3), s, NOW).state
    assert (st.phase, st.revision, st.reverted_from) == (REVERTING, OLD, NEW)
    # the failed revision's replica is now "old" and unhealthy: it goes first
    result = rollout_step(st, replicas("AAA", "S", restarts=3), s, NOW + 1)
    assert text(result.actions) == ["retire n0"]
    done = rollout_step(result.state, replicas("AAA"), s, NOW + 2)
    assert text(done.actions) == ["complete"] and done.state.phase == COMPLETE
    assert "reverted to aaaaaaaaaaaa" in done.state.reason


def test_progress_deadline_fails_and_progress_resets_it():
    s = Strategy(3, 1, 0, progress_deadline=60.0)
    st = state(last_progress_at=NOW - 61)
    assert st.marks is None
    # first look of this supervisor: marks are set, no progress yet -> past the deadline
    result = rollout_step(st, replicas("AAA", "S"), s, NOW)
    assert text(result.actions) == ["failed", "revert a"]
    assert "no progress for 60s (progress_deadline): 1 of 3 updated, 3 available" in result.actions[0].reason
    # a new replica became available since the last look: progress, the clock restarts
    seen = rollout_step(state(last_progress_at=NOW - 50), replicas("AAA", "S"), s, NOW - 50).state
    moved = rollout_step(seen, replicas("AAA", "A"), s, NOW)
    assert moved.state.last_progress_at == NOW and text(moved.actions) == ["retire o0"]


def test_paused_rollout_changes_nothing_and_has_no_deadline():
    s = Strategy(3, 1, 0, progress_deadline=60.0)
    st = pause(state(last_progress_at=NOW - 1000))
    result = rollout_step(st, replicas("AAA", ""), s, NOW)
    assert result.actions == () and result.state.phase == PAUSED and result.followup_at is None
    resumed = resume(st, NOW)
    assert resumed.phase == PROGRESSING and resumed.last_progress_at == NOW
    assert text(rollout_step(resumed, replicas("AAA", ""), s, NOW).actions) == ["start 0"]


def test_complete_and_failed_rollouts_do_nothing_more():
    s = Strategy(3, 1, 0)
    for phase in (COMPLETE, FAILED):
        result = rollout_step(state(phase=phase), replicas("AAA", ""), s, NOW)
        assert result.actions == () and result.state.phase == phase


# ---------------------------------------------------------------- recreate, canary

@pytest.mark.parametrize("old, new, expected", [
    pytest.param("AAA", "", ["retire o0", "retire o1", "retire o2"], id="retire-all-old"),
    pytest.param("TT.", "", [], id="wait-until-old-gone"),
    pytest.param("", "", ["start 0", "start 1", "start 2"], id="start-all-new"),
    pytest.param("", "SSS", [], id="wait-for-new"),
    pytest.param("", "AAA", ["complete"], id="complete"),
])
def test_recreate_step(old, new, expected):
    s = Strategy(3, 1, 0, kind="recreate")
    assert text(rollout_step(state(), replicas(old, new), s, NOW).actions) == expected


@pytest.mark.parametrize("weight, replicas_, expected", [
    pytest.param(10, 3, 1, id="10%-of-3"), pytest.param(50, 3, 2, id="50%-of-3"),
    pytest.param(100, 3, 3, id="100%"), pytest.param(1, 10, 1, id="at-least-one"),
    pytest.param(25, 0, 0, id="no-replicas"),
])
def test_canary_count(weight, replicas_, expected):
    assert canary_count(weight, replicas_) == expected


def test_canary_step_weights_pause_and_promotion():
    s = Strategy(3, 1, 0, canary=((10, 30.0), (50, 0.0)))
    st = state()
    assert text(rollout_step(st, replicas("AAA", ""), s, NOW).actions) == ["start 0"]
    start = rollout_step(st, replicas("AAA", ""), s, NOW).actions[0]
    # 1 new, 2 old: new weight 10*2=20 vs old 90*1=90 -> 2 : 9, i.e. 2/(2+9+9) = 10%
    assert start.weight == 2
    world = replicas("AAA", "A")
    r = rollout_step(st, world, s, NOW)
    assert text(r.actions) == ["weight n0=2", "weight o0=9", "weight o1=9", "weight o2=9"]
    world = [ObservedReplica(x.instance_id, x.slot, x.revision, x.phase, x.ready_since,
                             weight=2 if x.revision == NEW else 9) for x in world]
    r = rollout_step(r.state, world, s, NOW)
    assert text(r.actions) == ["retire o0"]                      # 3 old -> 2 old
    world = [x for x in world if x.instance_id != "o0"]
    r = rollout_step(r.state, world, s, NOW + 1)
    assert r.actions == () and r.state.step_ready_at == NOW + 1  # the pause starts
    assert r.followup_at == NOW + 1 + 30.0
    r = rollout_step(r.state, world, s, NOW + 20)
    assert r.actions == () and r.state.canary_step == 0          # still pausing
    r = rollout_step(r.state, world, s, NOW + 31)
    assert r.state.canary_step == 1 and r.followup_at == NOW + 31
    # 50% of 3 is 2 new and 1 old: each new one 50*1, the old one 50*2 -> 1 : 2 (half each side
    # once the step's second new replica runs)
    r = rollout_step(r.state, world, s, NOW + 31)
    assert text(r.actions) == ["weight n0=1", "weight o1=2", "weight o2=2"]


def test_canary_failure_reverts():
    s = Strategy(3, 1, 0, canary=((10, 30.0),))
    result = rollout_step(state(), replicas("AAA", "S", restarts=2), s, NOW)
    assert text(result.actions) == ["failed", "revert a"]


# ---------------------------------------------------------------- state, description

def test_start_rollout_takes_the_last_complete_revision_as_revert_target():
    history = [{"number": 1, "revision": "r1", "status": "complete", "created_at": 0},
               {"number": 2, "revision": "r2", "status": "complete", "created_at": 1},
               {"number": 3, "revision": "r3", "status": "failed", "created_at": 2},
               {"number": 4, "revision": "r4", "status": "active", "created_at": 3}]
    st = start_rollout("web", "r4", history, NOW)
    assert (st.revert_to, st.phase, st.last_progress_at) == ("r2", PROGRESSING, NOW)
    assert start_rollout("web", "r1", history[:1], NOW).revert_to is None


def test_state_survives_a_json_round_trip():
    st = state(marks=(1, 2, 3), step_ready_at=5.0, restart_token="t1")
    assert RolloutState.from_dict(json.loads(json.dumps(st.to_dict()))) == st


@pytest.mark.parametrize("data, message", [
    pytest.param([], "expected an object", id="not-an-object"),
    pytest.param({"revision": "r"}, "service: expected a non-empty string", id="no-service"),
    pytest.param({"service": "web", "revision": "r", "phase": "dancing"}, "phase", id="phase"),
    pytest.param({"service": "web", "revision": "r", "last_progress_at": "soon"},
                 "last_progress_at: expected a number", id="time"),
    pytest.param({"service": "web", "revision": "r", "marks": [1, 2]}, "marks", id="marks"),
    pytest.param({"service": "web", "revision": "r", "canary_step": -1}, "canary_step", id="step"),
])
def test_a_bad_stored_state_is_refused_with_the_field_named(data, message):
    with pytest.raises(RolloutError, match=message):
        RolloutState.from_dict(data)


@pytest.mark.parametrize("st, old, new, strategy, expected", [
    pytest.param(state(), "AAA", "AAR", Strategy(3, 1, 0, min_ready=5.0),
                 "web: 3 of 3 updated, 5 available, waiting for web-2 to be available (min_ready 5s)",
                 id="min-ready"),
    pytest.param(state(), "AAA", "S", Strategy(3, 1, 0),
                 "web: 1 of 3 updated, 3 available, waiting for web-0 to be ready", id="starting"),
    pytest.param(state(), "TAA", "A", Strategy(3, 1, 0),
                 "web: 1 of 3 updated, 3 available, waiting for web-0 to stop", id="terminating"),
    pytest.param(state(phase=FAILED, reason="web-0 crashed"), "AAA", "", Strategy(3, 1, 0),
                 "web: 0 of 3 updated, 3 available, failed: web-0 crashed", id="failed"),
    pytest.param(state(step_ready_at=NOW - 5), "AA.", "A",
                 Strategy(3, 1, 0, canary=((10, 60.0), (100, 0.0))),
                 "web: 1 of 3 updated, 3 available, canary step 1 of 2 (10%), pausing 60s since 995",
                 id="canary-pause"),
    pytest.param(state(phase=REVERTING, revision=OLD, reverted_from=NEW), "AAS", "A", Strategy(3, 1, 0),
                 "web: 3 of 3 updated, 3 available, reverting from bbbbbbbbbbbb, "
                 "waiting for web-2 to be ready",
                 id="reverting"),
])
def test_describe(st, old, new, strategy, expected):
    assert describe(st, replicas(old, new), strategy, NOW) == expected
