"""Blocking queries: who to wake after a commit, parked queries, one answer per query.

Vocabulary
----------
Blocking
    What a read handler returns: how to evaluate the answer (``evaluate() -> (index,
    data)``), how to turn it into a reply (``respond(index, data)``), the index the client
    holds, how long it may wait, and what wakes it (topics, KV keys, KV prefixes).
    ``cache_key`` names the query (path + query string without ``index``/``wait``): two
    requests with one cache key get the same bytes at one state of the store.
Waiter
    A parked blocking query: its connection, its Blocking, its deadline and timer. It
    holds no coroutine: a wake-up writes the answer straight to the connection.
Subscriptions (pure)
    Who waits on what. A watcher subscribes to the topics its answer depends on:

    * named indexes (``service.web``, ``services``, ``nodes``, ``node.<name>``, ``checks``,
      ``sessions``, ``kvs`` ...): woken when a committed op bumped that index;
    * a KV key (``get /v1/kv/a/b``): woken by a write to exactly that key;
    * a KV prefix (``?recurse`` / ``?keys`` on ``a/``): woken by a write to any key
      starting with the prefix. A write to ``b/x`` walks only the prefixes of ``b/x``
      (``""``, ``b``, ``b/``, ``b/x``) that have watchers, so watchers of ``a/`` never hear.

The fan-out (``WatchHub.notify``, called by the store right after a commit is durable):
pop every woken waiter, evaluate each distinct query once, encode its reply once, and
write those same bytes to every waiter of that query whose index is now passed; a waiter
whose answer did not move past its index parks again (a spurious wake-up). Answers are
memoised by (cache key, store version), so fresh requests between two commits share them
too.

Timeouts follow Consul (agent/blockingquery): ``wait`` absent or <= 0 -> 300 s, clamped
to 600 s, plus up to wait/16 of random jitter so that many clients do not return at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable

from ._decode import DecodeError, parse_go_duration

if TYPE_CHECKING:
    from ._wire import Connection, Reply

__all__ = [
    "Blocking", "Waiter", "Subscriptions", "WatchHub", "wait_seconds", "parse_wait",
    "DEFAULT_WAIT", "MAX_WAIT", "JITTER_FRACTION",
]

log = logging.getLogger("discovery.catalog.watch")

DEFAULT_WAIT = 300.0  # default_query_time
MAX_WAIT = 600.0  # max_query_time
JITTER_FRACTION = 16  # structs.JitterFraction
ANSWER_CACHE_SIZE = 1024  # distinct queries whose last answer is kept
ERROR_INDEX = 2**64  # an answer that failed: past any index a client can hold, so it is sent now


def wait_seconds(wait: str | None, rand: Callable[[], float] = random.random) -> float:
    """The time a blocking query may wait, jitter included, from the ``wait`` parameter.

    Raises DecodeError (-> 400 "Invalid wait time") for anything Go cannot parse.
    """
    seconds = 0.0
    if wait:
        seconds = parse_go_duration(wait) / 1e9
    if seconds <= 0:
        seconds = DEFAULT_WAIT
    seconds = min(seconds, MAX_WAIT)
    return seconds + rand() * seconds / JITTER_FRACTION


def parse_wait(wait: str | None) -> float:
    """``wait_seconds`` with Consul's 400 text on a bad value (raised as DecodeError)."""
    try:
        return wait_seconds(wait)
    except DecodeError:
        raise DecodeError("Invalid wait time") from None


class Blocking:
    """A blocking read; see the module docstring."""

    __slots__ = ("evaluate", "respond", "min_index", "wait", "topics", "keys", "prefixes", "cache_key")

    def __init__(self, evaluate: Callable[[], tuple[int, Any]], respond: Callable[[int, Any], "Reply"],
                 min_index: int, wait: float, cache_key: Hashable, topics: tuple[str, ...] = (),
                 keys: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> None:
        self.evaluate = evaluate
        self.respond = respond
        self.min_index = min_index
        self.wait = wait
        self.cache_key = cache_key
        self.topics = topics
        self.keys = keys
        self.prefixes = prefixes


class Waiter:
    __slots__ = ("conn", "q", "deadline", "timer")

    def __init__(self, conn: "Connection", q: Blocking, deadline: float) -> None:
        self.conn = conn
        self.q = q
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None


class Subscriptions:
    """Members by topic, KV key and KV prefix. Pure: no I/O, no clock."""

    def __init__(self) -> None:
        self.topics: dict[str, set[Any]] = {}
        self.keys: dict[str, set[Any]] = {}
        self.prefixes: dict[str, set[Any]] = {}

    def __repr__(self) -> str:
        return (f"<Subscriptions topics={sum(map(len, self.topics.values()))} "
                f"keys={sum(map(len, self.keys.values()))} prefixes={sum(map(len, self.prefixes.values()))}>")

    def count(self) -> int:
        """Subscriptions registered (a member counts once per topic, key or prefix)."""
        return sum(len(s) for d in (self.topics, self.keys, self.prefixes) for s in d.values())

    def add(self, member: Any, topics: Iterable[str] = (), keys: Iterable[str] = (),
            prefixes: Iterable[str] = ()) -> None:
        for t in topics:
            self.topics.setdefault(t, set()).add(member)
        for k in keys:
            self.keys.setdefault(k, set()).add(member)
        for p in prefixes:
            self.prefixes.setdefault(p, set()).add(member)

    def remove(self, member: Any, topics: Iterable[str] = (), keys: Iterable[str] = (),
               prefixes: Iterable[str] = ()) -> None:
        for table, names in ((self.topics, topics), (self.keys, keys), (self.prefixes, prefixes)):
            for name in names:
                members = table.get(name)
                if members is not None:
                    members.discard(member)
                    if not members:
                        del table[name]

    def pop_woken(self, topics: Iterable[str], kv_keys: Iterable[str]) -> list[Any]:
        """Remove and return (once each, in no particular order) the members woken by
        ``topics`` and by writes to ``kv_keys``. A member stays registered under its other
        names; the caller removes it there."""
        return self._woken(topics, kv_keys, take=True)

    def peek_woken(self, topics: Iterable[str], kv_keys: Iterable[str]) -> list[Any]:
        """The members ``pop_woken`` would return, left in place."""
        return self._woken(topics, kv_keys, take=False)

    def _woken(self, topics: Iterable[str], kv_keys: Iterable[str], take: bool) -> list[Any]:
        def members(table: dict[str, set[Any]], name: str) -> Iterable[Any]:
            return table.pop(name, ()) if take else table.get(name, ())

        woken: dict[int, Any] = {}
        for t in topics:
            for m in members(self.topics, t):
                woken[id(m)] = m
        if kv_keys:
            lengths = sorted({len(p) for p in self.prefixes}) if self.prefixes else ()
            for key in kv_keys:
                for m in members(self.keys, key):
                    woken[id(m)] = m
                for n in lengths:
                    if n > len(key):
                        break
                    for m in members(self.prefixes, key[:n]):
                        woken[id(m)] = m
        return list(woken.values())

    def pop_all(self) -> list[Any]:
        everyone: dict[int, Any] = {}
        for table in (self.topics, self.keys, self.prefixes):
            for members in table.values():
                for m in members:
                    everyone[id(m)] = m
            table.clear()
        return list(everyone.values())


class WatchHub:
    """Parked blocking queries and the fan-out; see the module docstring.

    ``version()`` is the store's commit counter (an answer memoised at one version is
    right until the next commit); ``settled()`` waits until no uncommitted write is
    visible; ``on_error(exc)`` turns an exception of evaluate/respond into a reply.
    """

    def __init__(self, version: Callable[[], int] = lambda: 0, settled: Callable[[], Any] | None = None,
                 is_settled: Callable[[], bool] = lambda: True,
                 on_error: Callable[[BaseException], "Reply"] | None = None) -> None:
        self.subs = Subscriptions()
        self._version = version
        self._settled = settled
        self._is_settled = is_settled
        self._on_error = on_error
        self._answers: OrderedDict[Hashable, tuple[int, int, bytes]] = OrderedDict()
        self.closed = False
        self.blocked = 0  # blocking queries parked now (metrics)
        self.wakeups = 0  # parked queries answered after a commit woke them (metrics)
        self.encodes = 0  # answers evaluated and encoded (metrics: the fan-out shares them)

    def __repr__(self) -> str:
        return f"<WatchHub blocked={self.blocked} {self.subs!r}>"

    # -- answering -----------------------------------------------------------------------
    def answer(self, q: Blocking) -> tuple[int, bytes]:
        """``(index, wire bytes)`` of ``q`` now: memoised per (cache key, store version)."""
        version = self._version()
        memo = self._answers.get(q.cache_key)
        if memo is not None and memo[0] == version:
            return memo[1], memo[2]
        try:
            index, data = q.evaluate()
            wire = q.respond(index, data).encode()
        except Exception as exc:  # a reply, never a dropped connection; sent at once, never parked
            if self._on_error is None:
                raise
            return ERROR_INDEX, self._on_error(exc).encode()
        self.encodes += 1
        self._answers[q.cache_key] = (version, index, wire)
        self._answers.move_to_end(q.cache_key)
        if len(self._answers) > ANSWER_CACHE_SIZE:
            self._answers.popitem(last=False)
        return index, wire

    async def start(self, conn: "Connection", q: Blocking) -> None:
        """Answer a fresh blocking read now, or park it."""
        if self._settled is not None and not self._is_settled():
            await self._settled()
        if conn.closing:
            return
        loop = asyncio.get_running_loop()
        self._serve(Waiter(conn, q, loop.time() + q.wait), loop)

    def _serve(self, w: Waiter, loop: asyncio.AbstractEventLoop, answered: tuple[int, bytes] | None = None) -> None:
        index, wire = answered or self.answer(w.q)
        if index > w.q.min_index or w.q.min_index <= 0 or self.closed:
            w.conn.send(wire)
            return
        remaining = w.deadline - loop.time()
        if remaining <= 0:
            w.conn.send(wire)  # timed out: the unchanged answer, as Consul gives it
            return
        q = w.q
        self.subs.add(w, q.topics, q.keys, q.prefixes)
        w.timer = loop.call_later(remaining, self._expire, w)
        w.conn.waiter = w
        self.blocked += 1

    def _unpark(self, w: Waiter) -> None:
        q = w.q
        self.subs.remove(w, q.topics, q.keys, q.prefixes)
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.conn.waiter = None
        self.blocked -= 1

    def _expire(self, w: Waiter) -> None:
        if w.conn.waiter is not w:
            return
        if not self._is_settled():  # a batch is being committed: never answer from it
            w.timer = asyncio.get_running_loop().call_later(0.002, self._expire, w)
            return
        self._unpark(w)
        w.conn.send(self.answer(w.q)[1])

    def cancel(self, w: Waiter) -> None:
        """The client went away."""
        if w.conn.waiter is w:
            self._unpark(w)

    # -- while a commit is being made durable ----------------------------------------------
    def prepare(self, topics: Iterable[str], kv_keys: Iterable[str], version: int) -> None:
        """Evaluate and encode, ahead of time, the answers of the queries this batch will
        wake, memoised under ``version`` (the store's version once the batch is durable).
        Runs on the loop while the writer thread fsyncs, so the fan-out after the commit is
        only writes. Nothing prepared is sent before the commit: ``answer`` matches an
        entry only once the store is at that version; ``discard`` drops them if the
        commit fails."""
        done: set[Hashable] = set()
        for w in self.subs.peek_woken(topics, kv_keys):
            q = w.q
            if q.cache_key in done:
                continue
            done.add(q.cache_key)
            try:
                index, data = q.evaluate()
                wire = q.respond(index, data).encode()
            except Exception:  # evaluated again, for real, after the commit
                continue
            self.encodes += 1
            self._answers[q.cache_key] = (version, index, wire)
            self._answers.move_to_end(q.cache_key)
        while len(self._answers) > ANSWER_CACHE_SIZE:
            self._answers.popitem(last=False)

    def discard(self, version: int) -> None:
        """The batch prepared under ``version`` was not committed: forget its answers."""
        for key in [k for k, memo in self._answers.items() if memo[0] == version]:
            del self._answers[key]

    # -- after a commit ------------------------------------------------------------------
    def notify(self, topics: Iterable[str], kv_keys: Iterable[str]) -> int:
        """Answer (or park again) every waiter woken by ``topics`` and writes to
        ``kv_keys``. Returns how many were woken."""
        woken = self.subs.pop_woken(topics, kv_keys)
        if not woken:
            return 0
        loop = asyncio.get_running_loop()
        by_query: dict[Hashable, list[Waiter]] = {}
        for w in woken:
            self._unpark(w)
            by_query.setdefault(w.q.cache_key, []).append(w)
        for waiters in by_query.values():
            answered = self.answer(waiters[0].q)  # once per query: the same bytes for all
            for w in waiters:
                self._serve(w, loop, answered)
        self.wakeups += len(woken)
        return len(woken)

    async def close(self) -> None:
        """Answer everybody now (shutdown): blocked queries return their current answer."""
        self.closed = True
        if self._settled is not None and not self._is_settled():
            await self._settled()
        waiters = self.subs.pop_all()
        for w in waiters:
            if w.timer is not None:
                w.timer.cancel()
            w.conn.waiter = None
            self.blocked -= 1
        for w in waiters:
            try:
                w.conn.send(self.answer(w.q)[1])
            except Exception:  # shutting down: keep answering the others
                log.exception("answering a blocked query at shutdown failed")
