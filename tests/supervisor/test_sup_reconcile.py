from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from supervisor.core.backoff import BackoffState
from supervisor.core.placement import NodeInfo
from supervisor.core.reconcile import (DUPLICATE, ORPHAN, OUTDATED, PROBE_FAILED, SCALE_DOWN, Deregister,
                                  Kill, Observed, Register, Replica, Start, Stop, Unplaceable, Wait,
                                  reconcile)

NODES = (NodeInfo("local", "process"),)
NOW = 1000.0


def spec(replicas=2, policy="always", name="web"):
    return config.ServiceSpec(name=name, command=("app",), replicas=replicas,
                              restart=config.RestartPolicy(policy=policy))


def rep(iid, slot, rev="r1", running=True, ready=True, service="web", **kw):
    return Replica(iid, service, slot, rev, "local", running, ready=ready and running,
                   started_at=kw.pop("started_at", 1.0), **kw)


def kinds(actions):
    out = []
    for a in actions:
        if isinstance(a, Start):
            out.append(f"start {a.service}/{a.slot}@{a.node}")
        elif isinstance(a, Stop):
            out.append(f"stop {a.instance_id} ({a.reason})")
        elif isinstance(a, Kill):
            out.append(f"kill {a.instance_id}")
        elif isinstance(a, Register):
            out.append(f"register {a.instance_id}")
        elif isinstance(a, Deregister):
            out.append(f"deregister {a.instance_id}")
        elif isinstance(a, Wait):
            out.append(f"wait {a.service}/{a.slot} until {a.at:g}")
        elif isinstance(a, Unplaceable):
            out.append(f"unplaceable {a.service}/{a.slot}")
    return out


REG = {"a": "web", "b": "web"}


@pytest.mark.parametrize("desired, replicas, registered, backoff, expected", [
    pytest.param({"web": (spec(2), "r1")}, [], {}, {},
                 ["start web/0@local", "start web/1@local"], id="fresh"),
    pytest.param({"web": (spec(2), "r1")}, [rep("a", 0), rep("b", 1)], REG, {},
                 [], id="steady"),
    pytest.param({"web": (spec(2), "r1")}, [rep("a", 0), rep("b", 1)], {}, {},
                 ["register a", "register b"], id="adopted-unregistered"),
    pytest.param({"web": (spec(1), "r1")}, [rep("a", 0), rep("b", 1)], REG, {},
                 [f"stop b ({SCALE_DOWN})"], id="scale-down-highest-slot"),
    pytest.param({"web": (spec(3), "r1")}, [rep("a", 0), rep("b", 1)], REG, {},
                 ["start web/2@local"], id="scale-up"),
    pytest.param({}, [rep("a", 0)], {"a": "web", "z": "web"}, {},
                 [f"stop a ({ORPHAN})", "deregister z"], id="orphan"),
    pytest.param({"web": (spec(1), "r1")}, [rep("a", 0, ready=False), rep("b", 0)], {"a": "web"}, {},
                 [f"stop a ({DUPLICATE})", "register b"], id="duplicate-keeps-ready"),
    pytest.param({"web": (spec(1), "r2")}, [rep("a", 0, rev="r1")], {"a": "web"}, {},
                 [f"stop a ({OUTDATED})", "start web/0@local"], id="outdated-replaced"),
    pytest.param({"web": (spec(1), "r2")}, [rep("a", 0, rev="r1"), rep("b", 0, rev="r2")], REG, {},
                 [f"stop a ({OUTDATED})"], id="old-and-new-in-slot"),
    pytest.param({"web": (spec(1), "r1")}, [rep("a", 0, alive=False)], {"a": "web"}, {},
                 ["kill a"], id="liveness-kill"),
    pytest.param({"web": (spec(1), "r1")},
                 [rep("a", 0, running=False, exit_code=137, finished_at=NOW - 1)], {"a": "web"}, {},
                 ["stop a (exited; replaced by a new replica)", "start web/0@local"], id="first-crash-immediate"),
    pytest.param({"web": (spec(1), "r1")},
                 [rep("a", 0, running=False, exit_code=1, started_at=NOW - 5, finished_at=NOW - 1)],
                 {"a": "web"}, {("web", 0): BackoffState(failures=3, restarts=3)},
                 ["wait web/0 until 1003", "deregister a"], id="backoff-wait"),
    pytest.param({"web": (spec(1, policy="never"), "r1")},
                 [rep("a", 0, running=False, exit_code=1, finished_at=NOW - 1)], {}, {},
                 [], id="never-restart"),
    pytest.param({"web": (spec(1, policy="on-failure"), "r1")},
                 [rep("a", 0, running=False, exit_code=0, finished_at=NOW - 1)], {}, {},
                 [], id="on-failure-clean-exit"),
    pytest.param({"web": (config.ServiceSpec(name="web", image="x"), "r1")}, [], {}, {},
                 ["unplaceable web/0"], id="unplaceable"),
])
def test_reconcile_table(desired, replicas, registered, backoff, expected):
    observed = Observed(tuple(replicas), registered, NODES, backoff)
    assert kinds(reconcile(desired, observed, NOW)) == expected


ROLL = frozenset({"web"})


@pytest.mark.parametrize("desired, replicas, registered, backoff, expected", [
    pytest.param({"web": (spec(2), "r2")}, [rep("a", 0, rev="r1"), rep("b", 1, rev="r1")], REG, {},
                 [], id="old-revision-left-to-the-engine"),
    pytest.param({"web": (spec(2), "r2")},
                 [rep("a", 0, rev="r1"), rep("n", 0, rev="r2"), rep("b", 1, rev="r1")], REG, {},
                 ["register n"], id="old-and-new-in-a-slot-both-kept"),
    pytest.param({"web": (spec(1), "r2")}, [rep("a", 0, rev="r1"), rep("b", 1, rev="r1")], REG, {},
                 [], id="surplus-slot-not-scaled-down"),
    pytest.param({"web": (spec(2), "r2")}, [], {}, {},
                 [], id="free-slots-not-started"),
    pytest.param({"web": (spec(1), "r2")},
                 [rep("a", 0, rev="r1"), rep("n", 0, rev="r2", running=False, exit_code=1, finished_at=NOW - 1)],
                 {"a": "web", "n": "web"}, {},
                 ["stop n (exited; replaced by a new replica)", "start web/0@local"], id="crashed-new-restarted"),
    pytest.param({"web": (spec(1), "r2")},
                 [rep("a", 0, rev="r1"), rep("n", 0, rev="r2", running=False, exit_code=1,
                                            started_at=NOW - 5, finished_at=NOW - 1)],
                 {"a": "web"}, {("web", 0): BackoffState(failures=3, restarts=3)},
                 ["wait web/0 until 1003"], id="crashed-new-backs-off"),
    pytest.param({"web": (spec(1, policy="never"), "r2")},
                 [rep("a", 0, rev="r1"), rep("n", 0, rev="r2", running=False, exit_code=1, finished_at=NOW - 1)],
                 {"a": "web"}, {}, [], id="crashed-new-never-restarted"),
    pytest.param({"web": (spec(1), "r2")},
                 [rep("a", 0, rev="r1", running=False, exit_code=1, finished_at=NOW - 1), rep("n", 0, rev="r2")],
                 {"a": "web", "n": "web"}, {},
                 ["deregister a"], id="exited-old-left-to-the-engine"),
    pytest.param({"web": (spec(1), "r2")}, [rep("a", 0, rev="r1", alive=False), rep("n", 0, rev="r2")],
                 REG | {"n": "web"}, {}, ["kill a", "deregister b"], id="dead-old-killed"),
])
def test_reconcile_leaves_revisions_of_a_rolling_service_to_the_engine(desired, replicas, registered,
                                                                      backoff, expected):
    observed = Observed(tuple(replicas), registered, NODES, backoff, rolling=ROLL)
    assert kinds(reconcile(desired, observed, NOW)) == expected


def test_restart_carries_the_next_backoff_state():
    observed = Observed((rep("a", 0, running=False, exit_code=1, started_at=NOW - 20,
                             finished_at=NOW - 10),), {}, NODES,
                        {("web", 0): BackoffState(failures=2, restarts=2)})
    start = next(a for a in reconcile({"web": (spec(1), "r1")}, observed, NOW) if isinstance(a, Start))
    assert start.backoff == BackoffState(failures=3, restarts=3)


def test_probe_killed_replica_restarts_under_on_failure():
    observed = Observed((rep("a", 0, running=False, exit_code=0, killed=True, finished_at=NOW),), {}, NODES)
    actions = reconcile({"web": (spec(1, policy="on-failure"), "r1")}, observed, NOW)
    assert any(isinstance(a, Start) and PROBE_FAILED.split("/")[0] in a.reason for a in actions)


# --- properties -----------------------------------------------------------------------------

replica_st = st.builds(
    lambda i, svc, slot, rev, running, ready, alive, code: Replica(
        f"i{i}", svc, slot, rev, "local", running, ready=ready and running, alive=alive,
        started_at=float(i), finished_at=None if running else NOW - 0.5, exit_code=code),
    st.integers(0, 10_000), st.sampled_from(["web", "api", "old"]), st.integers(0, 5),
    st.sampled_from(["r1", "r2"]), st.booleans(), st.booleans(), st.booleans(),
    st.sampled_from([None, 0, 1, 137]))


def apply_actions(replicas, actions):
    live = {r.instance_id: r for r in replicas}
    n = 0
    for a in actions:
        if isinstance(a, Stop):
            live.pop(a.instance_id)
        elif isinstance(a, Kill):
            r = live[a.instance_id]
            live[a.instance_id] = Replica(r.instance_id, r.service, r.slot, r.revision, r.node, False)
        elif isinstance(a, Start):
            n += 1
            live[f"new{n}"] = Replica(f"new{n}", a.service, a.slot, a.revision, a.node, True)
    return list(live.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(replica_st, max_size=12, unique_by=lambda r: r.instance_id),
       st.integers(0, 4), st.integers(0, 4), st.sampled_from(["always", "on-failure", "never"]))
def test_at_most_one_running_replica_per_slot_and_no_extra_slots(replicas, web_n, api_n, policy):
    desired = {"web": (spec(web_n, policy), "r2"), "api": (spec(api_n, policy, "api"), "r1")}
    registered = {r.instance_id: r.service for r in replicas[::2]}
    actions = reconcile(desired, Observed(tuple(replicas), registered, NODES), NOW)
    after = apply_actions(replicas, actions)
    seen = set()
    for r in after:
        if r.running:
            assert (r.service, r.slot) not in seen
            seen.add((r.service, r.slot))
        assert r.service in desired, "orphans are stopped"
        assert r.slot < desired[r.service][0].replicas, "never more than replicas slots"
    # idempotent for what is kept: a second pass starts nothing where a replica runs
    for a in reconcile(desired, Observed(tuple(after), {}, NODES), NOW):
        if isinstance(a, Start):
            assert (a.service, a.slot) not in seen
    # a service under rollout: nothing running is stopped except the dead, nothing of
    # the target started except in a slot whose target replica exited
    rolling = Observed(tuple(replicas), registered, NODES, rolling=frozenset({"web"}))
    for a in reconcile(desired, rolling, NOW):
        if isinstance(a, Stop) and a.service == "web":
            r = next(r for r in replicas if r.instance_id == a.instance_id)
            assert not r.running and r.revision == "r2"
        if isinstance(a, Start) and a.service == "web":
            assert any(r.service == "web" and r.slot == a.slot and r.revision == "r2" and not r.running
                       for r in replicas)
    # every desired slot is filled or has a reason (wait / policy) not to be
    for name, (s, _) in desired.items():
        for slot in range(s.replicas):
            assert any(r.service == name and r.slot == slot for r in after)


# --- where a restart goes ---------------------------------------------------------------------

TWO = (NodeInfo("a", "process"), NodeInfo("b", "process"))


def on(node, iid, slot, running=True, exit_code=None, **kw):
    return Replica(iid, "web", slot, "r1", node, running, ready=running, started_at=1.0,
                   finished_at=None if running else NOW - 1, exit_code=exit_code, **kw)


WITH_VOLUME = config.ServiceSpec(name="web", command=("app",), replicas=2,
                                 volumes=(config.VolumeMount(name="data", target="/data"),))


@pytest.mark.parametrize("service, replicas, nodes, expected", [
    pytest.param(spec(2), [on("a", "x", 0, False, 1), on("b", "y", 1)], TWO, "b",
                 id="failed-node-avoided"),
    pytest.param(spec(2), [on("a", "x", 0, False, None), on("b", "y", 1)], TWO, "b",
                 id="unknown-exit-counts-as-failed"),
    pytest.param(spec(2), [on("a", "x", 0, False, 0, killed=True), on("b", "y", 1)], TWO, "b",
                 id="probe-kill-counts-as-failed"),
    pytest.param(spec(2), [on("a", "x", 0, False, 0), on("b", "y", 1)], TWO, "a",
                 id="clean-exit-placed-freely"),
    pytest.param(spec(2), [on("a", "x", 0, False, 1), on("a", "y", 1)], (TWO[0],), "a",
                 id="failed-node-when-it-is-the-only-one"),
    pytest.param(WITH_VOLUME, [on("a", "x", 0, False, 1), on("b", "y", 1)], TWO, "a",
                 id="volumes-restart-where-their-data-is"),
    pytest.param(spec(2), [on("gone", "x", 0, False, 1), on("b", "y", 1)], TWO, "a",
                 id="node-gone-placed-anew"),
])
def test_a_restart_is_placed_away_from_the_node_it_failed_on(service, replicas, nodes, expected):
    actions = reconcile({"web": (service, "r1")}, Observed(tuple(replicas), {}, nodes), NOW)
    start, = [a for a in actions if isinstance(a, Start)]
    assert (start.slot, start.node) == (0, expected)
    assert start.backoff.restarts == 1 and "restart #1" in start.reason
