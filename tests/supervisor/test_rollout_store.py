"""How the supervisor keeps a rollout in KV: state and history written together, in one
transaction, and only what changed; a catalog that is away gets the write later."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from discovery.consul import connect
from supervisor._rollout_types import RolloutState
from supervisor.rolling import RolloutDriver
from supervisor.rollout_keys import history_key, state_key


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
