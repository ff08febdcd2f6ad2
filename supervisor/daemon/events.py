"""The supervisor's event log: in memory for the admin API, mirrored in the catalog in
batches so it survives a restart (layout and bounds: ``core/events.py``).

    note() --add()--> memory (the newest MAX_EVENTS) --wake--> waiters (GET /v1/events?wait=)
                                  |
                                  +--dirty--> writer task: wait FLUSH_EVERY (batching), then
                                              one KV transaction: the chunks that got new
                                              events, the chunks that fell off deleted

``add`` never awaits and never fails: a sync or a probe callback that records an event
goes on at once. A flush that fails (catalog down) is retried after a back-off with
everything not yet stored; the memory bound holds meanwhile (the oldest unstored events
are then lost, counted in ``dropped``).

Ownership: ``EventLog`` owns its writer task (``start``/``close``); ``close`` makes one last
flush, bounded by ``CLOSE_TIMEOUT``. Errors: reading at ``load`` logs unreadable chunks and
goes on; catalog errors while writing are logged, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import config
from discovery.consul import kv_op, kv_txn

from ..core.events import CHUNK, MAX_EVENTS, Event, plan_flush, read_chunk, redact, select

__all__ = ["EventLog", "FLUSH_EVERY"]

log = logging.getLogger("supervisor.events")

FLUSH_EVERY = 0.5        # seconds between the first unstored event and its write: a batch
RETRY_MAX = 10.0         # the longest wait before writing again after a failure
CLOSE_TIMEOUT = 3.0
TXN_OPS = 64             # Consul's limit of operations in one transaction


class EventLog:
    """Events, newest last (see the module). ``kv``: py-consul's aio client, or None to
    keep them in memory only. ``on_event``: called for each event added (metrics)."""

    def __init__(self, kv: Any = None, *, clock: Callable[[], float], keep: int = MAX_EVENTS,
                 chunk: int = CHUNK, flush_every: float = FLUSH_EVERY,
                 on_event: Callable[[Event], Any] | None = None) -> None:
        self.kv = kv
        self.clock = clock
        self.chunk, self.keep_chunks = chunk, max(1, keep // chunk)
        self.events: deque[Event] = deque(maxlen=keep)
        self.flush_every = flush_every
        self.on_event = on_event
        self.may_write: Callable[[], bool] = lambda: True    # the supervisor's leader-lock fence
        self.next_seq = 0
        self.stored_seq = -1              # every event up to this one is in the catalog
        self.stored_chunks: set[int] = set()
        self.dropped = 0                  # events lost before they were stored
        self.write_failures = 0
        self._loaded = False
        self._dirty = asyncio.Event()
        self._changed = asyncio.Event()   # replaced on each add: waiters wake
        self._writer: asyncio.Task[None] | None = None

    # --- recording ----------------------------------------------------------------------

    def add(self, kind: str, text: str, *, service: str | None = None, instance: str | None = None,
            node: str | None = None, secrets: Iterable[str] = ()) -> Event:
        """Record an event now (never awaits). ``secrets``: values to mask in ``text``."""
        e = Event(self.next_seq, self.clock(), kind, redact(text, secrets), service, instance, node)
        self.next_seq += 1
        if len(self.events) == self.events.maxlen and self.events[0].seq > self.stored_seq:
            self.dropped += 1
        self.events.append(e)
        self._dirty.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self.on_event is not None:
            self.on_event(e)
        return e

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def select(self, *, service: str | None = None, since: int | None = None, limit: int | None = None,
               kinds: Iterable[str] = ()) -> list[Event]:
        return select(self.events, service=service, since=since, limit=limit, kinds=kinds)

    def recent_lines(self, n: int) -> list[str]:
        """The last ``n`` events as ``HH:MM:SS text`` (the status document's "events")."""
        return [f"{time.strftime('%H:%M:%S', time.localtime(e.at))} {e.text}" for e in list(self.events)[-n:]]

    async def wait(self, after: int, timeout: float) -> bool:
        """Until an event newer than ``after`` exists, at most ``timeout`` s; True if one does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.last_seq <= after:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return self.last_seq > after
        return True

    # --- the catalog ----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the stored events; events added before are numbered after them."""
        if self.kv is None:
            self._loaded = True
            return
        try:
            _, entries = await self.kv.kv.get(config.EVENTS_PREFIX, recurse=True)
        except Exception as exc:  # noqa: BLE001 - history only: start without it
            log.warning("cannot read the stored events: %s; going on without them", exc)
            entries = []
        stored: list[Event] = []
        for entry in entries or ():
            n = config.split_events_key(entry["Key"])
            if n is None:
                continue
            self.stored_chunks.add(n)
            found, problems = read_chunk(entry["Key"], entry.get("Value") or b"")
            for p in problems:
                log.warning("ignoring unreadable event: %s", p)
            stored += found
        stored.sort(key=lambda e: e.seq)
        early = list(self.events)
        self.events.clear()
        self.events.extend(stored)
        base = stored[-1].seq + 1 if stored else 0
        self.stored_seq = base - 1
        self.next_seq = base
        for e in early:      # what happened while loading: after the stored ones
            self.events.append(Event(self.next_seq, e.at, e.kind, e.text, e.service, e.instance, e.node))
            self.next_seq += 1
        self._loaded = True
        if early:
            self._dirty.set()

    def start(self) -> None:
        if self.kv is not None and self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="events writer")

    async def close(self) -> None:
        """Stop the writer and store what is left (at most CLOSE_TIMEOUT)."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
            try:
                await asyncio.wait_for(self.flush(), CLOSE_TIMEOUT)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the catalog may be gone
                log.warning("could not store the last %d event(s)", self.last_seq - self.stored_seq)

    async def _write_loop(self) -> None:
        delay = self.flush_every
        while True:
            await self._dirty.wait()
            await asyncio.sleep(delay)       # more events join this batch meanwhile
            self._dirty.clear()
            if await self.flush():
                delay = self.flush_every
            else:
                self._dirty.set()
                delay = min(max(delay * 2, 1.0), RETRY_MAX)

    async def flush(self) -> bool:
        """Store every event not stored yet; False when the catalog refused (logged), or
        while this supervisor may not write (``may_write``: a stale leader lock)."""
        if not self._loaded or self.kv is None or not self.may_write():
            return False
        snapshot = list(self.events)
        if not snapshot or snapshot[-1].seq <= self.stored_seq:
            return True
        plan = plan_flush(snapshot, self.stored_seq, self.stored_chunks, chunk=self.chunk,
                          keep_chunks=self.keep_chunks)
        ops = [kv_op("set", config.events_key(c), value=json.dumps([e.to_json() for e in evs],
                                                                     separators=(",", ":")))
               for c, evs in sorted(plan.writes.items())]
        ops += [kv_op("delete", config.events_key(c)) for c in plan.deletes]
        try:
            # newest chunks last: a split over several transactions stores in order
            for i in range(0, len(ops), TXN_OPS):
                await kv_txn(self.kv, ops[i:i + TXN_OPS])
        except Exception as exc:  # noqa: BLE001 - tried again after a back-off
            self.write_failures += 1
            log.warning("cannot store %d event(s) in the catalog: %s", snapshot[-1].seq - self.stored_seq, exc)
            return False
        self.stored_seq = snapshot[-1].seq
        self.stored_chunks.difference_update(plan.deletes)
        self.stored_chunks.update(plan.writes)
        return True
