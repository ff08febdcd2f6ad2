"""The moves ``meshlet rebalance`` asked for, until each is done.

``Rebalancer.plan(desired, observed)`` is the pure core's ``plan_rebalance``;
``start(moves)`` records them (in memory and in the catalog under ``meshlet/rebalance``,
so a restarted or standby supervisor finishes them) and reconcile carries them out
(``Observed.moves``). After each sync of a service, ``settle`` drops the moves that are
done (the slot's only running replica is on its target) or can no longer be done (the
service or the slot is gone, a rollout took over, or the target cannot hold it: the
reason is kept for ``meshlet rebalance``'s report). Document::

    {"moves": [{"service", "slot", "instance", "source", "target"}], "at": <time>}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import config
from discovery.consul import kv_delete, kv_put

from ..core.model import Action, Observed, Unplaceable
from ..core.rebalance import Move, plan_rebalance

__all__ = ["Rebalancer"]

log = logging.getLogger("supervisor.rebalance")


class Rebalancer:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.moves: dict[tuple[str, int], Move] = {}
        self.dropped: list[str] = []          # moves given up, with why (the last 20)

    def targets(self) -> dict[tuple[str, int], str]:
        return {k: m.target for k, m in self.moves.items()}

    def plan(self, desired: Mapping[str, tuple[config.ServiceSpec, str]], observed: Observed) -> list[Move]:
        return plan_rebalance(desired, observed)

    async def load(self) -> None:
        _, entry = await self.client.kv.get(config.REBALANCE_KEY)
        if entry is None:
            return
        try:
            doc = json.loads(entry.get("Value") or b"{}")
            for m in doc.get("moves", []):
                move = Move(str(m["service"]), int(m["slot"]), str(m["instance"]), str(m["source"]),
                            str(m["target"]))
                self.moves[(move.service, move.slot)] = move
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable %s: %s", config.REBALANCE_KEY, exc)

    async def start(self, moves: Sequence[Move]) -> None:
        for m in moves:
            self.moves[(m.service, m.slot)] = m
        await self._store()

    async def _store(self) -> None:
        if not self.moves:
            await kv_delete(self.client, config.REBALANCE_KEY)
            return
        doc = {"moves": [{"service": m.service, "slot": m.slot, "instance": m.instance_id, "source": m.source,
                          "target": m.target} for m in self.moves.values()], "at": time.time()}
        await kv_put(self.client, config.REBALANCE_KEY, json.dumps(doc))

    async def settle(self, service: str, desired: Mapping[str, tuple[config.ServiceSpec, str]],
                     observed: Observed, actions: Sequence[Action]) -> list[str]:
        """Drop ``service``'s moves that are done or cannot be done; notes to log."""
        mine = [k for k in self.moves if k[0] == service]
        if not mine:
            return []
        notes = []
        failed = {a.slot: a.reason for a in actions if isinstance(a, Unplaceable)}
        entry = desired.get(service)
        for key in mine:
            move, slot = self.moves[key], key[1]
            # done once the old replica is gone, not only being retired
            running = [r for r in observed.replicas if r.service == service and r.slot == slot and r.running]
            why = None
            if entry is None or slot >= entry[0].replicas:
                why = "the slot is gone"
            elif service in observed.rolling:
                why = "a rollout places it now"
            elif slot in failed:
                why = f"cannot move: {failed[slot]}"
            elif running and all(r.node == move.target for r in running) and len(running) == 1:
                notes.append(f"rebalanced {move.describe()}")
                del self.moves[key]
                continue
            if why is not None:
                notes.append(f"rebalance of {move.describe()} given up: {why}")
                self.dropped.append(f"{move.describe()}: {why}")
                del self.dropped[:-20]
                del self.moves[key]
        if notes:
            await self._store()
        return notes

    def to_json(self) -> dict[str, Any]:
        return {"moves": [{"service": m.service, "slot": m.slot, "instance": m.instance_id, "source": m.source,
                           "target": m.target} for m in self.moves.values()], "dropped": list(self.dropped)}
