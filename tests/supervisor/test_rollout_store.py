"""How the supervisor keeps a rollout in KV (daemon/rollouts.py): state, history and the
target's crash counts written together, in one transaction, and only what changed; a
catalog that is away gets the write later; a restarted supervisor reads the counts back.
And the pure counting and history recording those stores carry (core/rollout_plan.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

import config
from discovery.consul import connect
from supervisor.core.rollout_types import RolloutState
from supervisor.core.model import Replica
from supervisor.core.rollout_history import record
from supervisor.core.rollout_plan import Counts, count_exit, count_start, crash_doc, read_crash_doc
from supervisor.daemon.rollouts import Rollouts
from supervisor.core.rollout import COMPLETE
from supervisor.commands.rollout import history_table

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)



async def _entry(client, key: str) -> tuple[int, object] | None:
    _, e = await client.kv.get(key)
    return None if e is None else (int(e["ModifyIndex"]), json.loads(e["Value"]))


async def test_state_and_history_go_in_one_transaction(catalog) -> None:
    client = connect(catalog.access)
    try:
        driver = Rollouts(client)
        history = [{"number": 1, "revision": "r1", "status": "complete"},
                   {"number": 2, "revision": "r2", "status": "progressing"}]
        driver.histories["web"] = history
        driver.states["web"] = RolloutState("web", "r2", started_at=1.0)
        await driver.store("web")
        st, hist = await _entry(client, config.rollout_key("web", "state")), await _entry(client, config.rollout_key("web", "history"))
        assert st and hist and st[0] == hist[0]              # one write: one ModifyIndex for both
        assert st[1]["revision"] == "r2" and hist[1] == history

        driver.states["web"] = RolloutState("web", "r2", started_at=1.0, reason="2 of 3 ready")
        await driver.store("web")                            # only the state moved
        st2, hist2 = await _entry(client, config.rollout_key("web", "state")), await _entry(client, config.rollout_key("web", "history"))
        assert st2 and st2[0] > st[0] and st2[1]["reason"] == "2 of 3 ready"
        assert hist2 == hist

        index = (await client.kv.get(config.rollout_key("web", "state")))[0]
        await driver.store("web")                            # nothing changed: no write at all
        assert (await client.kv.get(config.rollout_key("web", "state")))[0] == index

        del driver.states["web"]
        driver.histories["web"] = [dict(e, status="complete") for e in history]
        catalog.stop()
        await driver.store("web")                            # catalog away: logged, kept for later
        catalog.restart()                                    # same port: the same client
        await driver.store("web")
        assert await _entry(client, config.rollout_key("web", "state")) is None           # deleted, with the
        hist3 = await _entry(client, config.rollout_key("web", "history"))                 # history's last change
        assert hist3 and hist3[1][-1]["status"] == "complete"
    finally:
        await client.close()


def _exited(iid: str, revision: str, slot: int = 0) -> Replica:
    return Replica(iid, "web", slot, revision, "local", running=False, exit_code=3)


async def _load(client) -> Rollouts:
    """The bookkeeping as a restarted supervisor makes it: from what KV holds."""
    _, entries = await client.kv.get(config.ROLLOUT_PREFIX, recurse=True)
    driver = Rollouts(client)
    driver.load({e["Key"]: e.get("Value") or b"" for e in entries or ()}, now=1.0)
    return driver


async def test_crash_counts_are_stored_with_the_state_and_outlive_the_driver(catalog) -> None:
    """A restarted supervisor goes on counting the rollout target's crashes where the last
    one stopped: each exit once, old revisions never, another rollout's counts not at all."""
    client = connect(catalog.access)
    try:
        a, b, old = _exited("web-0-a", "r2"), _exited("web-0-b", "r2"), _exited("web-1-o", "r1", slot=1)
        live = {a.instance_id, b.instance_id, old.instance_id}
        driver = Rollouts(client)
        driver.states["web"] = RolloutState("web", "r2", started_at=1.0)
        driver.note_exit(a)
        driver.note_exit(a)                                  # the same exit, seen twice
        driver.note_exit(old)                                # not the target: never counts
        driver.note_start("web", 2, started=False)
        await driver.store("web", live)
        st, crashes = await _entry(client, config.rollout_key("web", "state")), await _entry(client, config.rollout_key("web", "crashes"))
        assert st and crashes and st[0] == crashes[0]        # one transaction
        assert crashes[1] == {"revision": "r2", "crashes": {"0": 1}, "refused": {"2": 1},
                              "counted": ["web-0-a"]}

        driver = await _load(client)
        assert (driver.counts["web"].crashes, driver.counts["web"].refused) == ({0: 1}, {2: 1})
        driver.note_exit(a)                                  # counted before the restart
        driver.note_exit(b)
        assert driver.counts["web"].crashes == {0: 2}
        index = (await client.kv.get(config.rollout_key("web", "crashes")))[0]
        await driver.store("web", live)
        assert (await client.kv.get(config.rollout_key("web", "crashes")))[0] > index

        # another rollout (r3) does not inherit r2's counts, and drops them at its first store
        await client.kv.put(config.rollout_key("web", "state"), json.dumps(RolloutState("web", "r3", started_at=2.0).to_dict()))
        driver = await _load(client)
        assert "web" not in driver.counts
        await driver.store("web", live)
        assert await _entry(client, config.rollout_key("web", "crashes")) is None

        # the rollout completes: nothing more to keep
        driver.note_exit(_exited("web-0-c", "r3"))
        await driver.store("web", live | {"web-0-c"})
        assert (await _entry(client, config.rollout_key("web", "crashes")))[1]["counted"] == ["web-0-c"]
        driver.states["web"] = dataclasses.replace(driver.states["web"], phase=COMPLETE)
        await driver.store("web", live)
        assert await _entry(client, config.rollout_key("web", "crashes")) is None
    finally:
        await client.close()


async def test_an_unreadable_crash_document_is_ignored(catalog) -> None:
    client = connect(catalog.access)
    try:
        await client.kv.put(config.rollout_key("web", "state"), json.dumps(RolloutState("web", "r2").to_dict()))
        for bad in ('{"revision": "r2", "crashes": {"zero": 1}}', '[1, 2]', '{"revision": "r2", "counted": 3}'):
            await client.kv.put(config.rollout_key("web", "crashes"), bad)
            driver = await _load(client)
            assert "web" not in driver.counts and driver.states["web"].revision == "r2"
    finally:
        await client.close()


def test_crash_doc_round_trip() -> None:
    doc = crash_doc("r2", Counts({0: 2, 1: 1}, {}, {0: 3}, frozenset({"b", "a"})))
    assert doc == {"revision": "r2", "crashes": {"0": 2, "1": 1}, "refused": {}, "counted": ["a", "b"]}
    assert read_crash_doc(json.loads(json.dumps(doc)), "r2") == Counts({0: 2, 1: 1}, {}, {}, frozenset({"a", "b"}))
    assert read_crash_doc(doc, "r3") is None
    assert crash_doc("r2", Counts()) is None
    # an id that no longer exists is not kept (it is never observed, nor counted, again)
    assert crash_doc("r2", Counts({0: 1}, {}, {}, frozenset({"a", "gone"})), live={"a"})["counted"] == ["a"]
    with pytest.raises(ValueError, match="crashes"):
        read_crash_doc({"revision": "r2", "crashes": {"0": -1}}, "r2")


def test_each_entry_keeps_what_it_changed_through_a_rollback() -> None:
    """``rollout history``'s CHANGE is what an entry changed against the revision running
    when it was recorded, not against whatever a rollback's renumbering put before it."""
    v1 = {"command": ["app"], "env": {"GREETING": "hello"}, "replicas": 2}
    v2 = dict(v1, env={"GREETING": "hi"})
    history: list = []
    for revision, spec, token, now in [("r1", v1, None, 1.0), ("r2", v2, None, 2.0),
                                       ("r2t", v2, "t1", 3.0),    # meshlet restart
                                       ("r1", v1, None, 4.0)]:    # meshlet rollback --to 1: moves to number 4
        history, problem = record(history, revision, spec, token, now, 10)
        assert problem is None
    assert [(e["number"], e["revision"], e.get("change")) for e in history] == [
        (2, "r2", "env (GREETING)"), (3, "r2t", "rolling restart"), (4, "r1", "env (GREETING)")]
    table = history_table(history, 10.0)
    # number 2 is listed first now; it still says what it changed
    assert [row.split()[0] + " " + row.split("ago")[1].strip() for row in table[1:]] == [
        "2 env (GREETING)", "3 rolling restart", "4 env (GREETING)"]


@pytest.mark.parametrize("phase, revision, terminating, counted", [
    pytest.param("progressing", "r2", False, True, id="target-crash-counts"),
    pytest.param("progressing", "r1", False, False, id="old-revision-never"),
    pytest.param("progressing", "r2", True, False, id="retired-never"),
    pytest.param("complete", "r2", False, False, id="no-rollout-running"),
    pytest.param("paused", "r2", False, True, id="paused-still-counts"),
])
def test_count_exit_table(phase, revision, terminating, counted) -> None:
    st = RolloutState("web", "r2", phase=phase)
    r = dataclasses.replace(_exited("x", revision), terminating=terminating)
    after = count_exit(Counts(), st, r)
    assert (after.crashes == {0: 1}) is counted
    assert count_exit(after, st, r) is after    # once per instance


def test_count_start_refusals_and_unwitnessed_exits() -> None:
    c = count_start(count_start(Counts(), 1, started=False), 1, started=False)
    assert c.refused == {1: 2}
    assert count_start(c, 1, started=True).refused == {}
    st = RolloutState("web", "r2")
    crashed = count_exit(Counts(), st, dataclasses.replace(_exited("a", "r2"), exit_code=3))
    assert crashed.last_exit == {0: 3}
    # an exit nobody witnessed (adopted) clears the code rather than repeat an older one
    assert count_exit(crashed, st, dataclasses.replace(_exited("b", "r2"), exit_code=None)).last_exit == {}
