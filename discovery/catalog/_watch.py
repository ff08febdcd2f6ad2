"""Blocking queries: who to wake after a commit, and the wait loop itself.

Wake-ups are targeted. A watcher subscribes to the topics its answer depends on:

* named indexes (``service.web``, ``services``, ``nodes``, ``node.<name>``, ``checks``,
  ``sessions``, ``kvs`` ...): woken when a committed op bumped that index;
* a KV key (``get /v1/kv/a/b``): woken by a write to exactly that key;
* a KV prefix (``?recurse`` / ``?keys`` on ``a/``): woken by a write to any key starting
  with the prefix. A write to ``b/x`` walks only the prefixes of ``b/x`` (``""``, ``b``,
  ``b/``, ``b/x``) that have watchers, so watchers of ``a/`` never hear of it.

Each waiter owns one future, registered under each of its topics; a wake-up pops the
topic's set and resolves the futures (a waiter woken twice just finds its future done).
The waiter always unsubscribes in ``finally`` (client gone, timeout or wake-up).

Timeouts follow Consul (agent/blockingquery): ``wait`` absent or <= 0 -> 300 s, clamped
to 600 s, plus up to wait/16 of random jitter so that many clients do not return at once.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Awaitable, Callable, Iterable

from ._decode import DecodeError, parse_go_duration

__all__ = ["WatchHub", "block", "wait_seconds", "DEFAULT_WAIT", "MAX_WAIT", "JITTER_FRACTION"]

DEFAULT_WAIT = 300.0  # default_query_time
MAX_WAIT = 600.0  # max_query_time
JITTER_FRACTION = 16  # structs.JitterFraction


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


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class WatchHub:
    """Waiters by topic and by KV key/prefix; see the module docstring."""

    def __init__(self) -> None:
        self._topics: dict[str, set[asyncio.Future]] = {}
        self._keys: dict[str, set[asyncio.Future]] = {}
        self._prefixes: dict[str, set[asyncio.Future]] = {}
        self.closed = False
        self.blocked = 0  # blocking queries currently waiting (metrics)
        self.wakeups = 0  # futures resolved by notify() since start (metrics)

    def __repr__(self) -> str:
        n_topic = sum(len(s) for s in self._topics.values())
        n_key = sum(len(s) for s in self._keys.values())
        n_prefix = sum(len(s) for s in self._prefixes.values())
        return f"<WatchHub topics={n_topic} keys={n_key} prefixes={n_prefix}>"

    def waiting(self) -> int:
        """How many subscriptions are registered (a waiter counts once per topic)."""
        return sum(len(s) for d in (self._topics, self._keys, self._prefixes) for s in d.values())

    def subscribe(
        self, fut: asyncio.Future, topics: Iterable[str] = (), keys: Iterable[str] = (), prefixes: Iterable[str] = ()
    ) -> None:
        for t in topics:
            self._topics.setdefault(t, set()).add(fut)
        for k in keys:
            self._keys.setdefault(k, set()).add(fut)
        for p in prefixes:
            self._prefixes.setdefault(p, set()).add(fut)

    def unsubscribe(
        self, fut: asyncio.Future, topics: Iterable[str] = (), keys: Iterable[str] = (), prefixes: Iterable[str] = ()
    ) -> None:
        for table, names in ((self._topics, topics), (self._keys, keys), (self._prefixes, prefixes)):
            for name in names:
                waiters = table.get(name)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del table[name]

    def notify(self, topics: Iterable[str], kv_keys: Iterable[str]) -> int:
        """Wake the waiters of ``topics`` and of ``kv_keys`` (exact and by prefix).

        Returns how many futures were resolved.
        """
        woken = 0
        for t in topics:
            woken += self._wake(self._topics.pop(t, None))
        if kv_keys:
            lengths = sorted({len(p) for p in self._prefixes}) if self._prefixes else ()
            for key in kv_keys:
                woken += self._wake(self._keys.pop(key, None))
                for n in lengths:
                    if n > len(key):
                        break
                    woken += self._wake(self._prefixes.pop(key[:n], None))
        self.wakeups += woken
        return woken

    def close(self) -> None:
        """Wake everybody (shutdown): blocked queries return their current answer."""
        self.closed = True
        for table in (self._topics, self._keys, self._prefixes):
            for waiters in table.values():
                self._wake(waiters)
            table.clear()

    @staticmethod
    def _wake(waiters: set[asyncio.Future] | None) -> int:
        if not waiters:
            return 0
        n = 0
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
                n += 1
        return n


async def block(
    settled: Callable[[], Awaitable[None]],
    hub: WatchHub,
    evaluate: Callable[[], tuple[int, Any]],
    min_index: int,
    wait: float,
    *,
    topics: Iterable[str] = (),
    keys: Iterable[str] = (),
    prefixes: Iterable[str] = (),
) -> tuple[int, Any]:
    """Evaluate now; if ``min_index`` > 0, re-evaluate on each wake-up until the answer's
    index exceeds ``min_index`` or ``wait`` seconds pass. Returns ``(index, answer)``.

    ``evaluate`` is synchronous and runs only when the store is settled, so the answer
    never reflects an uncommitted write. Subscribing happens right after an evaluation
    with no await in between, so no commit can slip between them unnoticed.
    """
    await settled()
    index, answer = evaluate()
    if min_index <= 0 or index > min_index or hub.closed:
        return index, answer
    topics, keys, prefixes = tuple(topics), tuple(keys), tuple(prefixes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return index, answer
        fut = loop.create_future()
        hub.subscribe(fut, topics, keys, prefixes)
        timer = loop.call_later(remaining, _resolve, fut)
        hub.blocked += 1
        try:
            await fut
        finally:
            hub.blocked -= 1
            timer.cancel()
            hub.unsubscribe(fut, topics, keys, prefixes)
        await settled()
        index, answer = evaluate()
        if index > min_index or hub.closed:
            return index, answer


def parse_wait(wait: str | None) -> float:
    """``wait_seconds`` with Consul's 400 text on a bad value (raised as DecodeError)."""
    try:
        return wait_seconds(wait)
    except DecodeError:
        raise DecodeError("Invalid wait time") from None
