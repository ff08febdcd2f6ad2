"""In-memory tables backed by SQLite, one writer, group commit, one global index.

Vocabulary
----------
Table
    Rows by primary key, in memory. Rows are plain dicts treated as immutable: a change
    replaces the row. Observers keep derived indexes (service name -> instances, ...) in
    step with every set/delete, including undo.
Tx
    What a write operation sees: it reads tables directly and changes them only through
    ``put``/``delete``/``bump``, which record undo entries and the rows to persist.
Op
    ``fn(tx) -> result``: validates fully, then writes. Raising a CatalogError undoes the
    op's changes and fails only that op.
Index
    One global, raft-like counter. Each op that writes takes the next value (lazily, on its
    first write); an op that writes nothing (a failed CAS, a repeated check status) takes
    none. ``bump(name)`` records the op's index under a named index (``service.web``,
    ``kvs`` ...) and marks that name as a wake-up topic.

Flow::

    submit(op) -> queue -> writer: apply a batch of ops in memory (undo on failure)
               -> SQLite: one transaction, fsynced (thread); meanwhile the loop encodes
                  the answers of the watchers the batch will wake (sent only after)
               -> acks -> watch wake-ups (the prepared bytes written to each watcher)

Readers never see a write before it is durable: while a batch is applied and committed
the store is "unsettled" and ``await settled()`` holds readers back; after the commit the
writer yields once so that held readers run before the next batch is applied. If the
commit fails, every change of the batch is undone and every op in it fails with a 500.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

from ._db import Database
from ._errors import CatalogError

__all__ = ["Table", "Tx", "Store", "Commit", "Op"]

log = logging.getLogger("discovery.catalog.store")

K = TypeVar("K", bound=Hashable)
Row = dict[str, Any]
Op = Callable[["Tx"], Any]
Observer = Callable[[Any, "Row | None", "Row | None"], None]

MAX_BATCH = 512  # ops per SQLite transaction; bounds the latency of one commit


def _dump_json(row: Row) -> tuple[str, bytes | None]:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False), None


def _load_json(doc: str, blob: bytes | None) -> Row:
    return json.loads(doc)


class Table(Generic[K]):
    """A named table of rows by key. ``sorted_keys`` keeps string keys in order (KV)."""

    def __init__(
        self,
        name: str,
        *,
        sorted_keys: bool = False,
        tuple_keys: bool = False,
        dump: Callable[[Row], tuple[str, bytes | None]] = _dump_json,
        load: Callable[[str, bytes | None], Row] = _load_json,
        persist: bool = True,
    ) -> None:
        self.name = name
        self.persist = persist  # False: memory only (undo still applies), never written to SQLite
        self.rows: dict[K, Row] = {}
        self.sorted: list[K] | None = [] if sorted_keys else None
        self.tuple_keys = tuple_keys
        self.dump = dump
        self.load = load
        self.observers: list[Observer] = []

    def __repr__(self) -> str:
        return f"<Table {self.name}: {len(self.rows)} rows>"

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def get(self, key: K) -> Row | None:
        return self.rows.get(key)

    def key_text(self, key: K) -> str:
        return json.dumps(list(key), ensure_ascii=False) if self.tuple_keys else str(key)

    def text_key(self, text: str) -> K:
        return tuple(json.loads(text)) if self.tuple_keys else text  # type: ignore[return-value]

    def prefix_keys(self, prefix: str) -> list[K]:
        """Keys starting with ``prefix``, in order (sorted tables only)."""
        assert self.sorted is not None
        keys = self.sorted
        lo = bisect.bisect_left(keys, prefix)  # type: ignore[type-var]
        if not prefix:
            return list(keys)
        hi = lo
        n = len(keys)
        while hi < n and keys[hi].startswith(prefix):  # type: ignore[attr-defined]
            hi += 1
        return keys[lo:hi]

    # Raw mutation: only Tx (with undo) and boot loading call these.
    def _set(self, key: K, row: Row) -> None:
        old = self.rows.get(key)
        self.rows[key] = row
        if old is None and self.sorted is not None:
            bisect.insort(self.sorted, key)  # type: ignore[type-var]
        for observe in self.observers:
            observe(key, old, row)

    def _del(self, key: K) -> None:
        old = self.rows.pop(key, None)
        if old is None:
            return
        if self.sorted is not None:
            i = bisect.bisect_left(self.sorted, key)  # type: ignore[type-var]
            del self.sorted[i]
        for observe in self.observers:
            observe(key, old, None)

    def _load_bulk(self, items: Iterable[tuple[K, Row]]) -> None:
        for key, row in items:
            self.rows[key] = row
            for observe in self.observers:
                observe(key, None, row)
        if self.sorted is not None:
            self.sorted[:] = sorted(self.rows)  # type: ignore[type-var]


_INDEX = object()  # undo marker for the global index


@dataclass
class Commit:
    """What one committed batch changed: for listeners (check runner, session timers)."""

    index: int
    dirty: set[tuple[str, Any]] = field(default_factory=set)  # (table name, key)
    topics: set[str] = field(default_factory=set)
    kv_keys: set[str] = field(default_factory=set)


class Tx:
    """The write side of one batch; see the module docstring."""

    def __init__(self, store: "Store") -> None:
        self.store = store
        self._undo: list[tuple[Any, Any, Any]] = []
        self.dirty: dict[tuple[str, Any], Table] = {}
        self.topics: set[str] = set()
        self.kv_keys: set[str] = set()
        self._op_index: int | None = None
        self._op_mark = 0
        self._op_topics: set[str] = set()
        self._op_kv: set[str] = set()

    # -- op boundaries ------------------------------------------------------------------
    def _begin_op(self) -> None:
        self._op_index = None
        self._op_mark = len(self._undo)
        self._op_topics = set()
        self._op_kv = set()

    def _end_op(self) -> None:
        self.topics |= self._op_topics
        self.kv_keys |= self._op_kv

    def _rollback_to(self, mark: int) -> None:
        undo = self._undo
        while len(undo) > mark:
            table, key, old = undo.pop()
            if table is _INDEX:
                self.store.index = old
            elif old is None:
                table._del(key)
            else:
                table._set(key, old)

    def _rollback_op(self) -> None:
        self._rollback_to(self._op_mark)
        self._op_index = None

    def _rollback_all(self) -> None:
        self._rollback_to(0)

    # -- the op's view ------------------------------------------------------------------
    @property
    def index(self) -> int:
        """This op's index, taken from the global counter on first use."""
        if self._op_index is None:
            self._undo.append((_INDEX, None, self.store.index))
            self.store.index += 1
            self._op_index = self.store.index
        return self._op_index

    @property
    def wrote(self) -> bool:
        return self._op_index is not None

    def put(self, table: Table, key: Any, row: Row) -> None:
        self._undo.append((table, key, table.rows.get(key)))
        table._set(key, row)
        self.dirty[(table.name, key)] = table

    def delete(self, table: Table, key: Any) -> None:
        old = table.rows.get(key)
        if old is None:
            return
        self._undo.append((table, key, old))
        table._del(key)
        self.dirty[(table.name, key)] = table

    def bump(self, *names: str) -> None:
        """Set each named index to this op's index and wake its watchers after commit."""
        idx = self.index
        indexes = self.store.indexes
        for name in names:
            if indexes.rows.get(name, {}).get("i") != idx:
                self.put(indexes, name, {"i": idx})
            self._op_topics.add(name)

    def touch_kv(self, key: str) -> None:
        self._op_kv.add(key)


class Store:
    """The tables, the global index and the single writer. See the module docstring."""

    def __init__(self, data_dir: str, tables: Iterable[Table]) -> None:
        self.data_dir = data_dir
        self.tables: dict[str, Table] = {}
        for t in tables:
            self.tables[t.name] = t
        self.indexes: Table[str] = self.tables.setdefault("indexes", Table("indexes", persist=False))
        self.index = 0
        self.index_floor = 0  # every named index is at least this (the index at start)
        self._pending: deque[tuple[Op, asyncio.Future]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._settled_event: asyncio.Event | None = None
        self._is_settled = True
        self._writer: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-db")
        self._db: Database | None = None
        self._listeners: list[Callable[[Commit], None]] = []
        self._notify: Callable[[set[str], set[str]], None] = lambda topics, keys: None
        self._prepare: Callable[[set[str], set[str], int], None] = lambda topics, keys, version: None
        self._discard: Callable[[int], None] = lambda version: None
        self.closed = False
        # Commits that changed something, since start: an answer computed at one version
        # is right until the next (the hub memoises answers by it).
        self.version = 0
        # Timings of the last batch (metrics): taken -> durable, durable -> watchers answered.
        self.last_write_s = 0.0
        self.on_written: Callable[[float], None] | None = None   # each batch's taken -> durable time
        self.last_fanout_s = 0.0
        self._durable_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        """Open the database and load every row (blocking work runs in the DB thread)."""
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._settled_event = asyncio.Event()
        self._settled_event.set()
        self._db = await loop.run_in_executor(self._executor, Database, self.data_dir)
        rows = await loop.run_in_executor(self._executor, lambda: list(self._db.load()))  # type: ignore[union-attr]
        grouped: dict[str, list[tuple[Any, Row]]] = {}
        for tbl, k, doc, blob in rows:
            if tbl == "meta":
                if k == "index":
                    self.index = max(self.index, int(doc))
                continue
            table = self.tables.get(tbl)
            if table is None or not table.persist:
                if table is None:
                    log.warning("ignoring %d-byte row of unknown table %r", len(doc), tbl)
                continue
            grouped.setdefault(tbl, []).append((table.text_key(k), table.load(doc, blob)))
        for name, items in grouped.items():
            self.tables[name]._load_bulk(items)
            # The index never goes backwards, even if the meta row lagged behind a table.
            for _, row in items:
                self.index = max(self.index, int(row.get("ModifyIndex") or row.get("i") or 0))
        # Named indexes live in memory only (persisting them cost three or four SQLite
        # rows per write): after a restart every one starts at the global index, which is
        # at least what it was, so no index goes backwards; a watcher that comes back
        # with an older one gets one early answer, which Consul's clients expect.
        self.index_floor = self.index
        self._writer = asyncio.create_task(self._run(), name="catalog-writer")

    async def close(self) -> None:
        """Stop accepting ops, finish the queued ones, close the database."""
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        if self._db is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    def set_notifier(self, notify: Callable[[set[str], set[str]], None],
                     prepare: Callable[[set[str], set[str], int], None] | None = None,
                     discard: Callable[[int], None] | None = None) -> None:
        """``notify(topics, kv_keys)`` after a commit is durable; ``prepare(topics,
        kv_keys, version)`` while it is being made durable (answers may be computed, never
        sent); ``discard(version)`` if that commit then fails."""
        self._notify = notify
        if prepare is not None:
            self._prepare = prepare
        if discard is not None:
            self._discard = discard

    def add_listener(self, listener: Callable[[Commit], None]) -> None:
        self._listeners.append(listener)

    # -- reads --------------------------------------------------------------------------
    @property
    def is_settled(self) -> bool:
        return self._is_settled

    async def settled(self) -> None:
        """Return once no uncommitted change is visible in memory."""
        while not self._is_settled:
            assert self._settled_event is not None
            await self._settled_event.wait()

    # -- writes -------------------------------------------------------------------------
    def submit(self, op: Op) -> asyncio.Future:
        """Queue ``op``; the future resolves with its result once durable."""
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(CatalogError("catalog is shutting down", 503))
            return fut
        self._pending.append((op, fut))
        assert self._wakeup is not None
        self._wakeup.set()
        return fut

    async def write(self, op: Op) -> Any:
        """Submit ``op`` and wait for its result. If the caller is cancelled (its client
        went away) the op still runs: once received, a write is applied or refused, never
        dropped half-way."""
        return await asyncio.shield(self.submit(op))

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self.closed:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch = []
            while self._pending and len(batch) < MAX_BATCH:
                batch.append(self._pending.popleft())
            woken: tuple[set[str], set[str]] | None = None
            try:
                woken = await self._apply(batch)
            except Exception:  # never let the writer die: fail the batch, keep serving
                log.exception("writer: unexpected failure applying a batch")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(CatalogError("internal error while writing"))
            if woken is not None:
                # Acknowledge first: a writer's answer reaches its handler two loop turns
                # after its future resolves (Store.write's shield, then the task), and
                # only then do the watchers get theirs, so a write is never kept waiting
                # behind a thousand answers. Nothing changes memory meanwhile: this is
                # the only writer.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                self._notify(*woken)
                self.last_fanout_s = time.perf_counter() - self._durable_at
            # Let readers held by settled() run before the next batch changes memory.
            await asyncio.sleep(0)

    async def _apply(self, batch: list[tuple[Op, asyncio.Future]]) -> tuple[set[str], set[str]] | None:
        """Apply, commit, resolve the futures; return the (topics, KV keys) to wake."""
        assert self._settled_event is not None
        taken = time.perf_counter()
        tx = Tx(self)
        outcomes: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        self._is_settled = False
        self._settled_event.clear()
        try:
            for op, fut in batch:
                if fut.cancelled():
                    continue
                tx._begin_op()
                try:
                    result = op(tx)
                except CatalogError as exc:
                    tx._rollback_op()
                    outcomes.append((fut, None, exc))
                except Exception as exc:
                    log.exception("write operation failed unexpectedly")
                    tx._rollback_op()
                    outcomes.append((fut, None, CatalogError(f"internal error: {type(exc).__name__}")))
                else:
                    tx._end_op()
                    outcomes.append((fut, result, None))
            if tx.dirty:
                upserts, deletes = [], []
                for (tname, key), table in tx.dirty.items():
                    if not table.persist:
                        continue
                    row = table.rows.get(key)
                    ktext = table.key_text(key)
                    if row is None:
                        deletes.append((tname, ktext))
                    else:
                        doc, blob = table.dump(row)
                        upserts.append((tname, ktext, doc, blob))
                loop = asyncio.get_running_loop()
                assert self._db is not None
                try:
                    durable = loop.run_in_executor(self._executor, self._db.write, upserts, deletes, self.index)
                    if tx.topics or tx.kv_keys:
                        try:  # the watchers' answers are encoded while the thread fsyncs
                            self._prepare(tx.topics, tx.kv_keys, self.version + 1)
                        except Exception:
                            log.exception("preparing the watchers' answers failed")
                    await durable
                except Exception as exc:
                    log.error("commit of %d ops failed, undoing them: %s", len(outcomes), exc)
                    self._discard(self.version + 1)
                    tx._rollback_all()
                    err = CatalogError(f"failed to persist the write: {type(exc).__name__}")
                    outcomes = [(fut, None, err) for fut, _, _ in outcomes]
                    tx.topics.clear()
                    tx.kv_keys.clear()
                    tx.dirty.clear()
        finally:
            if tx.dirty:
                self.version += 1
            self._durable_at = time.perf_counter()
            self.last_write_s = self._durable_at - taken
            if self.on_written is not None:
                self.on_written(self.last_write_s)
            self._is_settled = True
            self._settled_event.set()
        if tx.dirty:
            commit = Commit(self.index, set(tx.dirty), tx.topics, tx.kv_keys)
            for listener in self._listeners:
                try:
                    listener(commit)
                except Exception:
                    log.exception("commit listener failed")
        for fut, result, exc in outcomes:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        if tx.topics or tx.kv_keys:
            return tx.topics, tx.kv_keys
        return None
