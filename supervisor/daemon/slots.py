"""What the supervisor remembers per replica slot, beside the replicas themselves: the
restart back-off (mirrored in KV, so a restarted supervisor keeps spacing out restarts),
the start holds after a refused start, and the runtime's last refusal.

    meshlet/backoff/<service>/<slot> = {"failures": N, "restarts": N}

Errors: a back-off that cannot be stored or read is logged; only the restart count and
its spacing are at stake, never a replica.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import config
from discovery.consul import kv_delete, kv_put

from ..core.backoff import BackoffState

__all__ = ["Slots"]

log = logging.getLogger("supervisor.slots")


class Slots:
    """Per (service, slot): ``backoff``, ``holds`` (no start before this time) and
    ``start_errors`` (the runtime's last refusal). ``kv``: py-consul's aio client."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.backoff: dict[tuple[str, int], BackoffState] = {}
        self.holds: dict[tuple[str, int], float] = {}
        self.start_errors: dict[tuple[str, int], str] = {}

    async def load(self) -> None:
        _, entries = await self.kv.kv.get(config.BACKOFF_PREFIX, recurse=True)
        for e in entries or ():
            key = config.split_backoff_key(e["Key"])
            try:
                if key is None:
                    raise ValueError("not a service/slot key")
                d = json.loads(e.get("Value") or b"{}")
                self.backoff[key] = BackoffState(int(d["failures"]), int(d["restarts"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable back-off state %s", e.get("Key"))

    async def save(self, service: str, slot: int, state: BackoffState) -> None:
        if self.backoff.get((service, slot)) == state:
            return
        self.backoff[(service, slot)] = state
        try:
            await kv_put(self.kv, config.backoff_key(service, slot),
                         json.dumps({"failures": state.failures, "restarts": state.restarts}))
        except Exception as exc:  # noqa: BLE001 - only the restart count is at stake
            log.warning("cannot store the back-off of %s slot %d: %s", service, slot, exc)

    def clear_holds(self, service: str) -> None:
        for key in [k for k in self.holds if k[0] == service]:
            del self.holds[key]

    def errors_of(self, service: str) -> dict[int, str]:
        return {slot: text for (name, slot), text in self.start_errors.items() if name == service}

    async def forget(self, service: str) -> None:
        """The service is gone and nothing of it runs: drop its holds and back-off."""
        self.clear_holds(service)
        if not any(k[0] == service for k in self.backoff):
            return
        for key in [k for k in self.backoff if k[0] == service]:
            del self.backoff[key]
        try:
            await kv_delete(self.kv, config.backoff_key(service), recurse=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot delete the back-off of %s: %s", service, exc)
