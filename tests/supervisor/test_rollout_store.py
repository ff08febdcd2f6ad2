"""How the supervisor keeps a rollout in KV: state, history and the target's crash counts
written together, in one transaction, and only what changed; a catalog that is away gets
the write later; a restarted supervisor reads the counts back."""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace

import pytest

from discovery.consul import connect
from supervisor._rollout_types import RolloutState
from supervisor.rolling import RolloutDriver, crash_doc, read_crash_doc
from supervisor.rollout import COMPLETE
from supervisor.rollout_cli import history_table
from supervisor.rollout_keys import ROLLOUT_PREFIX, crashes_key, history_key, state_key


async def _entry(client, key: str) -> tuple[int, object] | None:
    _, e = await client.kv.get(key)
    return None if e is None else (int(e["ModifyIndex"]), json.loads(e["Value"]))


async def test_state_and_history_go_in_one_transaction(catalog) -> None:
    client = connect(catalog.url)
    try:
        driver = RolloutDriver(SimpleNamespace(_client=client, clock=time.monotonic))  # type: ignore[arg-type]
        history = [{"number": 1, "revision": "r1", "status": "complete"},
                   {"number": 2, "revision": "r2", "status": "progressing"}]
        driver.histories["web"] = history
        driver.states["web"] = RolloutState("web", "r2", started_at=1.0)
        await driver.store("web")
        st, hist = await _entry(client, state_key("web")), await _entry(client, history_key("web"))
        assert st and hist and st[0] == hist[0]              # one write: one ModifyIndex for both
        assert st[1]["revision"] == "r2" and hist[1] == history

        driver.states["web"] = RolloutState("web", "r2", started_at=1.0, reason="2 of 3 ready")
        await driver.store("web")                            # only the state moved
        st2, hist2 = await _entry(client, state_key("web")), await _entry(client, history_key("web"))
        assert st2 and st2[0] > st[0] and st2[1]["reason"] == "2 of 3 ready"
        assert hist2 == hist

        index = (await client.kv.get(state_key("web")))[0]
        await driver.store("web")                            # nothing changed: no write at all
        assert (await client.kv.get(state_key("web")))[0] == index

        del driver.states["web"]
        driver.histories["web"] = [dict(e, status="complete") for e in history]
        catalog.stop()
        await driver.store("web")                            # catalog away: logged, kept for later
        catalog.restart()                                    # same port: the same client
        await driver.store("web")
        assert await _entry(client, state_key("web")) is None           # deleted, with the
        hist3 = await _entry(client, history_key("web"))                 # history's last change
        assert hist3 and hist3[1][-1]["status"] == "complete"
    finally:
        await client.close()


def _inst(iid: str, revision: str, slot: int = 0) -> SimpleNamespace:
    return SimpleNamespace(obs=SimpleNamespace(instance_id=iid, service="web", slot=slot, revision=revision,
                                               exit_code=3))


async def _load(client, sup) -> RolloutDriver:
    """A driver as a restarted supervisor makes it: from what KV holds."""
    _, entries = await client.kv.get(ROLLOUT_PREFIX, recurse=True)
    driver = RolloutDriver(sup)
    driver.load({e["Key"]: e.get("Value") or b"" for e in entries or ()})
    return driver


async def test_crash_counts_are_stored_with_the_state_and_outlive_the_driver(catalog) -> None:
    """A restarted supervisor goes on counting the rollout target's crashes where the last
    one stopped: each exit once, old revisions never, another rollout's counts not at all."""
    client = connect(catalog.url)
    try:
        a, b, old = _inst("web-0-a", "r2"), _inst("web-0-b", "r2"), _inst("web-1-o", "r1", slot=1)
        sup = SimpleNamespace(_client=client, clock=time.monotonic,
                              instances={i.obs.instance_id: i for i in (a, b, old)})
        driver = RolloutDriver(sup)  # type: ignore[arg-type]
        driver.states["web"] = RolloutState("web", "r2", started_at=1.0)
        driver.note_exit(a)
        driver.note_exit(a)                                  # the same exit, seen twice
        driver.note_exit(old)                                # not the target: never counts
        driver.refused[("web", 2)] = 1
        await driver.store("web")
        st, crashes = await _entry(client, state_key("web")), await _entry(client, crashes_key("web"))
        assert st and crashes and st[0] == crashes[0]        # one transaction
        assert crashes[1] == {"revision": "r2", "crashes": {"0": 1}, "refused": {"2": 1},
                              "counted": ["web-0-a"]}

        driver = await _load(client, sup)
        assert driver.crashes == {("web", 0): 1} and driver.refused == {("web", 2): 1}
        driver.note_exit(a)                                  # counted before the restart
        driver.note_exit(b)
        assert driver.crashes == {("web", 0): 2}
        index = (await client.kv.get(crashes_key("web")))[0]
        await driver.store("web")
        assert (await client.kv.get(crashes_key("web")))[0] > index

        # another rollout (r3) does not inherit r2's counts, and drops them at its first store
        await client.kv.put(state_key("web"), json.dumps(RolloutState("web", "r3", started_at=2.0).to_dict()))
        driver = await _load(client, sup)
        assert driver.crashes == {} and driver.refused == {}
        await driver.store("web")
        assert await _entry(client, crashes_key("web")) is None

        # the rollout completes: nothing more to keep
        driver.note_exit(_inst("web-0-c", "r3"))
        sup.instances["web-0-c"] = _inst("web-0-c", "r3")
        await driver.store("web")
        assert (await _entry(client, crashes_key("web")))[1]["counted"] == ["web-0-c"]
        driver.states["web"] = dataclasses.replace(driver.states["web"], phase=COMPLETE)
        await driver.store("web")
        assert await _entry(client, crashes_key("web")) is None
    finally:
        await client.close()


async def test_an_unreadable_crash_document_is_ignored(catalog) -> None:
    client = connect(catalog.url)
    try:
        await client.kv.put(state_key("web"), json.dumps(RolloutState("web", "r2").to_dict()))
        for bad in ('{"revision": "r2", "crashes": {"zero": 1}}', '[1, 2]', '{"revision": "r2", "counted": 3}'):
            await client.kv.put(crashes_key("web"), bad)
            driver = await _load(client, SimpleNamespace(_client=client, clock=time.monotonic, instances={}))
            assert driver.crashes == {} and driver.states["web"].revision == "r2"
    finally:
        await client.close()


def test_crash_doc_round_trip() -> None:
    doc = crash_doc("r2", {0: 2, 1: 1}, {}, {"b", "a"})
    assert doc == {"revision": "r2", "crashes": {"0": 2, "1": 1}, "refused": {}, "counted": ["a", "b"]}
    assert read_crash_doc(json.loads(json.dumps(doc)), "r2") == ({0: 2, 1: 1}, {}, {"a", "b"})
    assert read_crash_doc(doc, "r3") is None
    assert crash_doc("r2", {}, {}, set()) is None
    with pytest.raises(ValueError, match="crashes"):
        read_crash_doc({"revision": "r2", "crashes": {"0": -1}}, "r2")


def test_each_entry_keeps_what_it_changed_through_a_rollback() -> None:
    """``rollout history``'s CHANGE is what an entry changed against the revision running
    when it was recorded, not against whatever a rollback's renumbering put before it."""
    driver = RolloutDriver(SimpleNamespace(clock=time.monotonic, instances={}))  # type: ignore[arg-type]
    v1 = {"command": ["app"], "env": {"GREETING": "hello"}, "replicas": 2}
    v2 = dict(v1, env={"GREETING": "hi"})
    driver._record("web", "r1", v1, None, 10, 1.0)
    driver._record("web", "r2", v2, None, 10, 2.0)
    driver._record("web", "r2t", v2, "t1", 10, 3.0)          # meshlet restart
    driver._record("web", "r1", v1, None, 10, 4.0)           # meshlet rollback --to 1: moves to number 4
    history = driver.histories["web"]
    assert [(e["number"], e["revision"], e.get("change")) for e in history] == [
        (2, "r2", "env (GREETING)"), (3, "r2t", "rolling restart"), (4, "r1", "env (GREETING)")]
    table = history_table(history, 10.0)
    # number 2 is listed first now; it still says what it changed
    assert [row.split()[0] + " " + row.split("ago")[1].strip() for row in table[1:]] == [
        "2 env (GREETING)", "3 rolling restart", "4 env (GREETING)"]
