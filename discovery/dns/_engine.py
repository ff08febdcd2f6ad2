"""The answering engine: the current zone plus the pre-encoded answers, no sockets.

Fast path: a response depends only on the query bytes after the 2-byte ID (flags, counts,
question, OPT) and on the zone. So each answered query is encoded once (per rotation)
and stored under ``query[2:]``; a hit is one dict lookup, ``next()`` on a cycle of
pre-encoded bodies and the client's ID glued in front. Answers with several records keep
up to ``ROTATIONS`` bodies, each with the records rotated, and cycle through them, so the
order varies between queries without encoding per query (and truncated UDP answers show
different subsets). A new View swaps the zone and drops from both caches (in place: the
protocols hold references to the dicts) only the entries whose records changed: by name
and record type, so an instance of a service with a virtual IP turning unready drops the
service's SRV answers but not its A answer, which is still the VIP. Every negative answer
goes too (they carry the SOA, whose serial is the View's index). A catalog change to one
service thus costs a miss (~35 us for a one-record answer) for that service's changed
questions only, not for every hot question of the fleet: the event loop stalls less per
change, which is what p99 latency under churn is made of.

Not cached: forwarded questions (answers come from elsewhere), malformed packets, queries
carrying EDNS options (dig's per-client cookies would only fill the cache) and anything
longer than 512 bytes. The cache is bounded: past ``max_entries`` the oldest entry goes
(dicts keep insertion order), so random names cannot grow memory.
"""

from __future__ import annotations

import logging
from itertools import cycle
from typing import Iterator, NamedTuple

from discovery.view import View

from ._records import ANY, SERVFAIL
from ._wire import TCP_LIMIT, BadQuery, Drop, Query, encode, error_response, parse_query, udp_limit
from ._zone import Settings, Zone, answer, build_zone

__all__ = ["Engine", "Forward", "Update", "ROTATIONS"]

log = logging.getLogger(__name__)

ROTATIONS = 8
_MAX_KEY = 512


class Forward(NamedTuple):
    """The question is not ours: send ``data`` to the recursors."""

    query: Query
    data: bytes


Changed = dict[str, "frozenset[int] | None"]
"""Names whose records differ between two zones, each with the record types that differ
(None: the name came or went, so all of them)."""


class Update(NamedTuple):
    """A zone ready to serve, and what differs from the zone before it (None: everything
    may differ)."""

    zone: Zone
    changed: Changed | None


class Engine:
    """State: ``zone`` (replaced whole), ``udp_cache``/``tcp_cache`` (key: query without
    its ID; value: an endless iterator over pre-encoded response bodies without the ID)."""

    def __init__(self, settings: Settings, view: View | None = None, max_entries: int = 8192) -> None:
        self.settings = settings
        self.max_entries = max_entries
        self.zone: Zone = build_zone(view or View(), settings)
        self.udp_cache: dict[bytes, Iterator[bytes]] = {}
        self.tcp_cache: dict[bytes, Iterator[bytes]] = {}
        # Per cache: key -> the lowercased name and type it answers (name "" for a negative
        # answer), and name -> its keys, so a change drops exactly the entries it touches.
        self._index = {id(c): _Index() for c in (self.udp_cache, self.tcp_cache)}
        self.ra = settings.forwarding
        # Counted on the slow path only (``_metrics``): answers built, by (qtype, rcode);
        # questions handed to the recursors; messages dropped unanswered.
        self.answers: dict[tuple[int, int], int] = {}
        self.forwarded = 0
        self.dropped = 0

    def set_view(self, view: View) -> None:
        """Swap in the zone of a new View (``prepare`` then ``commit``, in one go)."""
        update = self.prepare(view, self.zone)
        if update is not None:
            self.commit(update)

    def prepare(self, view: View, previous: Zone) -> Update | None:
        """The zone of ``view`` built on ``previous`` (the last zone prepared), and the names
        that changed between them. Pure: the zone builder process
        (``_builder``) computes the same difference and sends only it.
        On a bug in building, None: the last good zone stays."""
        try:
            zone = build_zone(view, self.settings, previous)
        except Exception:  # noqa: BLE001 - keep serving the last good zone
            log.exception("could not build the DNS zone for catalog view %d; keeping the last one", view.index)
            return None
        return Update(zone, None if previous.settings != zone.settings else changed_names(previous, zone))

    def commit(self, update: Update) -> None:
        """Serve ``update``'s zone from now on and drop the cached answers it changed. On
        the thread that answers queries; O(changed cached answers)."""
        self.zone = update.zone
        if update.changed is None:
            for cache in (self.udp_cache, self.tcp_cache):
                cache.clear()
                self._index[id(cache)] = _Index()
        else:
            self._invalidate(update.changed)
        log.debug("zone updated to view %d: %d services", update.zone.index, len(update.zone.services))

    def _invalidate(self, changed: Changed) -> None:
        """Drop every negative answer and the cached answers whose records ``changed``: for
        a changed name, the answers of its changed types and of ANY."""
        for cache in (self.udp_cache, self.tcp_cache):
            index = self._index[id(cache)]
            for key in index.keys.pop("", ()):
                del index.owner[key]
                cache.pop(key, None)
            for name, types in changed.items():
                keys = index.keys.get(name)
                if not keys:
                    continue
                for key in [k for k in keys if types is None or index.owner[k][1] in types
                            or index.owner[k][1] == ANY]:
                    index.forget(key)
                    cache.pop(key, None)

    def handle(self, data: bytes, tcp: bool) -> bytes | Forward | None:
        """Response bytes for one query message, a ``Forward``, or ``None`` (drop)."""
        hit = (self.tcp_cache if tcp else self.udp_cache).get(data[2:])
        if hit is not None:
            return data[:2] + next(hit)
        return self.miss(data, tcp)

    def miss(self, data: bytes, tcp: bool) -> bytes | Forward | None:
        answers = self.answers
        try:
            query = parse_query(data)
        except Drop:
            self.dropped += 1
            return None
        except BadQuery as exc:
            log.debug("bad query (%d bytes): %s", len(data), exc)
            key = (exc.query.qtype if exc.query is not None else 0, exc.rcode)
            answers[key] = answers.get(key, 0) + 1
            return error_response(data, exc.rcode, exc.query, self.ra)
        try:
            ans = answer(self.zone, query.qname, query.qtype, query.qclass)
            if ans.forward:
                self.forwarded += 1
                return Forward(query, bytes(data))
            key = (query.qtype, ans.rcode)
            answers[key] = answers.get(key, 0) + 1
            limit = TCP_LIMIT if tcp else udp_limit(query)
            n = len(ans.answers)
            rotations = min(n, ROTATIONS) if n > 1 else 1
            guess: list[int] = []
            bodies = tuple(bytes(encode(query, ans, limit, self.ra, (i * n) // rotations, guess)[2:])
                           for i in range(rotations))
        except Exception:  # noqa: BLE001 - a bug answers SERVFAIL, never a traceback
            log.exception("failed to answer %s type %d", query.qname, query.qtype)
            key = (query.qtype, SERVFAIL)
            answers[key] = answers.get(key, 0) + 1
            return error_response(data, SERVFAIL, None, self.ra)
        bodies_iter = cycle(bodies)
        first = next(bodies_iter)
        if len(data) <= _MAX_KEY and (query.edns is None or not query.edns.has_options):
            cache = self.tcp_cache if tcp else self.udp_cache
            index = self._index[id(cache)]
            if len(cache) >= self.max_entries:
                oldest = next(iter(cache))
                del cache[oldest]
                index.forget(oldest)
            key = bytes(data[2:])
            index.forget(key)
            cache[key] = bodies_iter
            index.add(key, query.qname.rstrip(".").lower() if ans.answers else "", query.qtype)
        return data[:2] + first


class _Index:
    """Which name each cached answer belongs to, both ways."""

    __slots__ = ("owner", "keys")

    def __init__(self) -> None:
        self.owner: dict[bytes, tuple[str, int]] = {}
        self.keys: dict[str, set[bytes]] = {}

    def add(self, key: bytes, name: str, qtype: int) -> None:
        self.owner[key] = (name, qtype)
        self.keys.setdefault(name, set()).add(key)

    def forget(self, key: bytes) -> None:
        owner = self.owner.pop(key, None)
        if owner is not None:
            name = owner[0]
            keys = self.keys[name]
            keys.discard(key)
            if not keys:
                del self.keys[name]


def changed_names(old: Zone, new: Zone) -> Changed:
    """The names whose records differ between two zones (lowercased, no trailing dot), each
    with the types whose record sets differ; None for a name only one of them has.

    The zone builder reuses the record mappings of unchanged services, so an identical
    mapping is unchanged without comparing; a rebuilt one is compared type by type (a few
    small tuples: a service's names hold a handful of record sets)."""
    a, b = old.names, new.names
    out: Changed = {}
    for name, sets in b.items():
        before = a.get(name)
        if before is sets:
            continue
        if before is None:
            out[name] = None
            continue
        types = frozenset(t for t in sets.keys() | before.keys() if sets.get(t) != before.get(t))
        if types:
            out[name] = types
    for name in a:
        if name not in b:
            out[name] = None
    return out
