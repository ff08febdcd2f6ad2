"""The rollout engine driven to the end over a tiny in-memory world, plus Hypothesis
properties over random strategies and random readiness/crash sequences.

The world is pure data: ``StartReplica`` appends a starting replica, ``RetireReplica``
marks it terminating (gone one tick later), ``SetWeight`` sets its weight. Each tick a
starting replica of a good revision becomes ready (or not yet, when the drawn readiness
sequence says so); one of a bad revision crashes and is restarted (restarts + 1), or
hangs forever without becoming ready. One tick is one second."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.core.rollout import (AVAILABLE, COMPLETE, FAILED, PAUSED, PROGRESSING, READY,
                                REVERTING, STARTING, TERMINATING, MarkComplete, MarkFailed, ObservedReplica,
                                RetireReplica, Revert, RolloutState, SetWeight, StartReplica,
                                Strategy, is_available, resolve_fenceposts, rollout_step,
                                start_rollout)

OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
HISTORY = [{"number": 1, "revision": OLD, "created_at": 0.0, "status": "complete"},
           {"number": 2, "revision": NEW, "created_at": 100.0, "status": "active"}]


@dataclass
class World:
    replicas: list[ObservedReplica]
    bad: dict[str, str] = field(default_factory=dict)     # revision -> "crash" | "hang"
    readiness: list[bool] = field(default_factory=list)   # per tick: may starting ones get ready
    crashes: list[int | None] = field(default_factory=list)  # per tick: index of a replica that crashes
    seq: int = 0
    marks: list[object] = field(default_factory=list)

    @classmethod
    def running(cls, n: int, revision: str = OLD, **kw) -> World:
        return cls([ObservedReplica(f"{revision[:1]}{i}", i, revision, AVAILABLE, 0.0)
                    for i in range(n)], **kw)

    def apply(self, actions, now: float) -> None:
        by_id = {r.instance_id: i for i, r in enumerate(self.replicas)}
        for a in actions:
            if isinstance(a, StartReplica):
                self.seq += 1
                self.replicas.append(ObservedReplica(f"{a.revision[:1]}{a.slot}-{self.seq}", a.slot,
                                                     a.revision, STARTING, weight=a.weight))
            elif isinstance(a, RetireReplica):
                i = by_id[a.instance_id]
                assert self.replicas[i].phase != TERMINATING, f"retired twice: {a}"
                self.replicas[i] = replace(self.replicas[i], phase=TERMINATING)
            elif isinstance(a, SetWeight):
                i = by_id[a.instance_id]
                self.replicas[i] = replace(self.replicas[i], weight=a.weight)
            else:
                self.marks.append(a)

    def advance(self, now: float) -> None:
        may = self.readiness.pop(0) if self.readiness else True
        crash = self.crashes.pop(0) if self.crashes else None
        if crash is not None and self.replicas:
            i = crash % len(self.replicas)
            r = self.replicas[i]
            if r.phase in (READY, AVAILABLE):     # restarted by its runtime: starting again
                self.replicas[i] = replace(r, phase=STARTING, ready_since=None, restarts=r.restarts + 1)
        out = []
        for r in self.replicas:
            if r.phase == TERMINATING:
                continue
            if r.phase == STARTING:
                how = self.bad.get(r.revision)
                if how == "crash":
                    r = replace(r, restarts=r.restarts + 1)
                elif how is None and may:
                    r = replace(r, phase=READY, ready_since=now)
            out.append(r)
        self.replicas = out

    def observed(self) -> tuple[ObservedReplica, ...]:
        return tuple(self.replicas)


def alive(world: World) -> int:
    return sum(r.phase != "failed" for r in world.replicas)


def available(world: World, now: float, s: Strategy) -> int:
    return sum(is_available(r, now, s.min_ready) for r in world.replicas if r.phase != TERMINATING)


def run(world: World, s: Strategy, state: RolloutState | None = None, max_ticks: int = 500,
        check_bounds: bool = True):
    """Tick until the rollout ends or pauses, asserting after every step that the engine's
    own actions never took the world past replicas + surge replicas (terminating ones
    included) nor below replicas - unavailable available. The world may crash replicas by
    itself: then the engine must not make it worse (it never removes an available one
    while below the floor, never adds one while at or above the ceiling)."""
    state = state or start_rollout("web", NEW, HISTORY, 0.0)
    now = 0.0
    log = []
    floor = s.replicas - s.unavailable
    ceiling = s.replicas + (s.surge if s.kind == "rolling" else 0)
    for _ in range(max_ticks):
        alive_before, avail_before = alive(world), available(world, now, s)
        result = rollout_step(state, world.observed(), s, now)
        world.apply(result.actions, now)
        log.append((now, result.actions))
        state = result.state
        assert alive(world) <= max(ceiling, alive_before), (now, result.actions, world.replicas)
        if check_bounds:
            assert available(world, now, s) >= min(floor, avail_before), (now, result.actions, world.replicas)
        if state.phase in (COMPLETE, FAILED, PAUSED):
            return state, world, log
        now += 1.0
        world.advance(now)
    raise AssertionError(f"no end after {max_ticks} ticks: {state}")


def strat(replicas, surge="25%", unavailable="25%", **kw) -> Strategy:
    su, un = resolve_fenceposts(replicas, surge, unavailable)
    return Strategy(replicas, su, un, **kw)


def final_revisions(world: World) -> list[str]:
    return sorted({r.revision for r in world.replicas})


@pytest.mark.parametrize("replicas, surge, unavailable", [
    pytest.param(3, "25%", "25%", id="3-replicas-25%-25%"),
    pytest.param(10, "25%", "25%", id="10-replicas-25%-25%"),
    pytest.param(1, 0, 1, id="1-replica-kill-first"),
    pytest.param(3, 1, 0, id="3-replicas-surge-first"),
    pytest.param(5, "100%", 0, id="blue-green"),
])
def test_rolling_update_completes_on_the_new_revision(replicas, surge, unavailable):
    s = strat(replicas, surge, unavailable, min_ready=2.0)
    state, world, log = run(World.running(replicas), s)
    assert state.phase == COMPLETE
    assert final_revisions(world) == [NEW]
    assert sorted(r.slot for r in world.replicas) == list(range(replicas))
    assert all(is_available(r, 1e9, 2.0) for r in world.replicas)
    assert world.marks == [MarkComplete(NEW)]


def test_recreate_stops_every_old_replica_before_starting_new_ones():
    s = strat(3, kind="recreate")
    state, world, log = run(World.running(3), s, check_bounds=False)
    assert state.phase == COMPLETE and final_revisions(world) == [NEW]
    starts = [t for t, acts in log if any(isinstance(a, StartReplica) for a in acts)]
    retires = [t for t, acts in log if any(isinstance(a, RetireReplica) for a in acts)]
    assert len(retires) == 1 and len(starts) == 1 and retires[0] < starts[0]
    assert sum(len(acts) for t, acts in log if t == starts[0]) == 3


def test_canary_10_50_100_moves_traffic_in_steps():
    s = strat(4, 1, 0, canary=((10, 5.0), (50, 5.0), (100, 0.0)))
    state = start_rollout("web", NEW, HISTORY, 0.0)
    world = World.running(4)
    now, seen = 0.0, []
    for _ in range(200):
        result = rollout_step(state, world.observed(), s, now)
        world.apply(result.actions, now)
        state = result.state
        news = [r for r in world.replicas if r.revision == NEW and r.phase != TERMINATING]
        olds = [r for r in world.replicas if r.revision == OLD and r.phase != TERMINATING]
        if news and olds:
            share = sum(r.weight for r in news) / sum(r.weight for r in news + olds)
            seen.append((len(news), round(share, 2)))
        if state.phase == COMPLETE:
            break
        now += 1.0
        world.advance(now)
    assert state.phase == COMPLETE and final_revisions(world) == [NEW]
    assert all(r.weight == 1 for r in world.replicas)
    # 10% of 4 -> 1 new replica with 10% of the traffic, 50% -> 2 with half of it
    assert (1, 0.1) in seen and (2, 0.5) in seen
    steady_10 = [t for t in seen if t == (1, 0.1)]
    assert len(steady_10) >= 5          # held for the step's 5 s pause


def test_crashing_revision_is_reverted_to_the_last_complete_one():
    s = strat(3, 1, 0)
    state, world, log = run(World.running(3, bad={NEW: "crash"}), s)
    assert state.phase == COMPLETE and state.revision == OLD
    assert final_revisions(world) == [OLD] and len(world.replicas) == 3
    kinds = [type(m).__name__ for m in world.marks]
    assert kinds == ["MarkFailed", "Revert", "MarkComplete"]
    assert "restarted 2 times" in world.marks[0].reason
    assert world.marks[1] == Revert(OLD, world.marks[0].reason)


def test_revision_that_never_gets_ready_fails_at_the_progress_deadline():
    s = strat(3, 1, 0, progress_deadline=30.0, auto_revert=False)
    state, world, log = run(World.running(3, bad={NEW: "hang"}), s)
    assert state.phase == FAILED
    assert "no progress for 30s (progress_deadline)" in state.reason
    assert "auto_revert is off" in state.reason
    failed_at = next(t for t, acts in log if any(isinstance(a, MarkFailed) for a in acts))
    assert 30.0 < failed_at <= 32.0
    # the old replicas keep serving: stopped, not torn down
    assert sum(r.revision == OLD for r in world.replicas) == 3


def test_failing_revert_pauses_instead_of_reverting_again():
    # reverting to OLD after NEW failed, and OLD crashes too: pause, do not revert the revert
    world = World([ObservedReplica("b0", 0, NEW, STARTING, restarts=5)], bad={NEW: "crash", OLD: "crash"})
    state = RolloutState("web", OLD, REVERTING, 0.0, 0.0, revert_to=NEW, reverted_from=NEW)
    state, world, log = run(world, strat(1, 1, 0), state)
    assert state.phase == PAUSED
    assert "revert to aaaaaaaaaaaa failed" in state.reason and "a revert is not reverted" in state.reason
    assert [type(m).__name__ for m in world.marks] == ["MarkFailed"]
    assert world.marks[0].revision == OLD


# ---------------------------------------------------------------- properties

counts = st.one_of(st.integers(0, 4), st.sampled_from(["0%", "10%", "25%", "50%", "100%"]))


@st.composite
def strategies(draw):
    replicas = draw(st.integers(0, 8))
    surge, unavailable = resolve_fenceposts(replicas, draw(counts), draw(counts))
    canary = draw(st.one_of(st.just(()), st.lists(
        st.tuples(st.integers(1, 100), st.sampled_from([0.0, 2.0])), min_size=1, max_size=3).map(tuple)))
    return Strategy(replicas, surge, unavailable,
                    kind=draw(st.sampled_from(["rolling", "rolling", "recreate"])),
                    min_ready=draw(st.sampled_from([0.0, 1.0, 3.0])),
                    progress_deadline=draw(st.sampled_from([20.0, 60.0])),
                    auto_revert=draw(st.booleans()), canary=canary)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=strategies(), readiness=st.lists(st.booleans(), max_size=40),
       bad=st.sampled_from([None, "crash", "hang"]), start_below=st.integers(0, 2))
def test_rollout_keeps_its_bounds_and_always_ends(s, readiness, bad, start_below):
    world = World.running(max(s.replicas - start_below, 0), readiness=list(readiness),
                          bad={NEW: bad} if bad else {})
    state, world, log = run(world, s, max_ticks=400, check_bounds=s.kind == "rolling")
    if state.phase == COMPLETE:
        assert len(world.replicas) == s.replicas
        assert final_revisions(world) in ([state.revision], [])
        assert all(r.weight == 1 for r in world.replicas)
    if state.phase == COMPLETE and state.revision == OLD:
        assert any(isinstance(m, Revert) for m in world.marks)
    if bad is not None and s.replicas > 0:
        if s.auto_revert:
            # auto-revert ends on the last complete revision, every replica back and available
            assert state.phase == COMPLETE and state.revision == OLD, state
            assert final_revisions(world) == [OLD]
            assert [type(m).__name__ for m in world.marks] == ["MarkFailed", "Revert", "MarkComplete"]
        else:
            assert state.phase == FAILED and state.revision == NEW
            assert [type(m).__name__ for m in world.marks] == ["MarkFailed"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=strategies(), readiness=st.lists(st.booleans(), max_size=10),
       crashes=st.lists(st.one_of(st.none(), st.integers(0, 20)), max_size=30))
def test_a_good_revision_completes_and_a_crashing_world_never_loops(s, readiness, crashes):
    """With a patient deadline the new revision completes, or (when the world's own crashes
    hit a new replica repeatedly) the rollout fails/reverts; it never runs forever."""
    s = replace(s, progress_deadline=600.0)
    world = World.running(s.replicas, readiness=list(readiness), crashes=list(crashes))
    state, world, log = run(world, s, max_ticks=300, check_bounds=s.kind == "rolling")
    if not crashes:
        assert state.phase == COMPLETE and state.revision == NEW
        assert len(world.replicas) == s.replicas and final_revisions(world) in ([NEW], [])
    else:
        assert state.phase in (COMPLETE, FAILED, PAUSED)
        if state.phase == FAILED:
            assert "restarted" in state.reason and not s.auto_revert


@settings(max_examples=150, deadline=None)
@given(s=strategies(), new_replicas=st.integers(0, 8), at=st.integers(0, 15))
def test_replicas_changed_mid_rollout_ends_with_exactly_the_new_count(s, new_replicas, at):
    s = replace(s, progress_deadline=600.0)
    world = World.running(s.replicas)
    state = start_rollout("web", NEW, HISTORY, 0.0)
    now, changed = 0.0, False
    for tick in range(400):
        if tick == at:
            s = replace(s, replicas=new_replicas, **dict(zip(
                ("surge", "unavailable"), resolve_fenceposts(new_replicas, "25%", "25%"))))
            changed = True
        result = rollout_step(state, world.observed(), s, now)
        world.apply(result.actions, now)
        state = result.state
        if state.phase != PROGRESSING:
            break
        now += 1.0
        world.advance(now)
    if not changed:
        return                  # done before the change: scaling is reconcile's business then
    assert state.phase == COMPLETE, state
    assert len(world.replicas) == new_replicas and final_revisions(world) in ([NEW], [])
    assert sorted(r.slot for r in world.replicas) == list(range(new_replicas))
