"""Events: what happened to services, replicas and nodes, as records. Pure.

An event is ``{"seq", "at", "kind", "service", "instance", "node", "text"}``: ``seq`` numbers
events from 0 for the life of the catalog (a restarted supervisor goes on from the last
stored one), ``at`` is Unix time, ``kind`` one of ``KINDS``, ``service``/``instance``/``node``
what it is about (None when not about one), ``text`` the sentence ``meshlet events`` prints.

Kinds::

    started restarted exited killed stopped     a replica's life (restarted: after an exit,
                                                with its back-off; exited: with its reason)
    ready unready                               readiness probe transitions
    start-failed backoff pending                a start the runtime refused; a slot waiting
                                                out its back-off; a replica no node can hold
    rollout revert                              rollout steps and phases; an automatic revert
    node                                        a node unreachable, lost, back, cordoned,
                                                draining or uncordoned

Stored in the catalog (``config.EVENTS_PREFIX``) in chunks: event ``seq`` lives in chunk
``seq // CHUNK`` (key ``config.events_key(chunk)``, a JSON list of events); the newest
``KEEP_CHUNKS`` chunks are kept, so between ``MAX_EVENTS - CHUNK + 1`` and ``MAX_EVENTS``
events survive. A flush rewrites only the chunks that got new events (usually one) and
deletes the chunks that fell off, in one transaction (``plan_flush``); one write a flush,
never one per event.

Secrets never enter an event: ``redact`` masks the value of every ``NAME=value`` and
``NAME: value`` whose NAME looks secret (``core.redact.SECRET_NAME``) and every
``Authorization``/``Bearer`` credential, and an app's output never becomes an event's text.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .redact import MASK, SECRET_NAME

__all__ = ["Event", "KINDS", "CHUNK", "MAX_EVENTS", "KEEP_CHUNKS", "MAX_TEXT", "redact", "chunk_of",
           "plan_flush", "FlushPlan", "read_chunk", "select", "format_event", "object_of"]

KINDS = ("started", "restarted", "exited", "killed", "stopped", "ready", "unready", "start-failed", "backoff",
         "pending", "rollout", "revert", "node")
# 200 events of at most ~700 bytes each is < 150 KB a key, well under the catalog's
# 512 KB value limit; 50 chunks keep the last 10,000 events (9,801 at worst).
CHUNK = 200
MAX_EVENTS = 10_000
KEEP_CHUNKS = MAX_EVENTS // CHUNK
MAX_TEXT = 500                      # characters of text kept: an event is a line, not a log


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float
    kind: str
    text: str
    service: str | None = None
    instance: str | None = None
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "kind": self.kind, "service": self.service,
                "instance": self.instance, "node": self.node, "text": self.text}

    @classmethod
    def from_json(cls, d: Any) -> Event:
        """ValueError when ``d`` is not an event document."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an event is an object, got {type(d).__name__}")
        seq, at, kind, text = d.get("seq"), d.get("at"), d.get("kind"), d.get("text")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"event seq: expected an integer >= 0, got {seq!r}")
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            raise ValueError(f"event {seq} at: expected a number, got {at!r}")
        if not isinstance(kind, str) or not isinstance(text, str):
            raise ValueError(f"event {seq}: kind and text must be strings")

        def opt(name: str) -> str | None:
            v = d.get(name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"event {seq} {name}: expected a string or null, got {v!r}")
            return v
        return cls(seq, float(at), kind, text, opt("service"), opt("instance"), opt("node"))


# NAME=value, NAME: value, "NAME": "value" (the value up to a space, quote, comma or brace)
_ASSIGNMENT = re.compile(r"""(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<sep>["']?\s*[=:]\s*["']?)(?P<value>[^\s"',;}&]+)""")
_BEARER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]+", re.I)


def redact(text: str, values: Iterable[str] = ()) -> str:
    """``text`` with secret-looking assignments, credentials in headers and every one of
    ``values`` (secret values known to the caller) masked; cut to ``MAX_TEXT``."""
    for v in sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True):
        text = text.replace(v, MASK)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _ASSIGNMENT.sub(lambda m: m.group("name") + m.group("sep") + MASK
                           if SECRET_NAME.search(m.group("name")) and m.group("value") != MASK else m.group(0), text)
    text = text.replace(f"{MASK} {MASK}", MASK)      # "Authorization: Bearer <masked>"
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def chunk_of(seq: int, chunk: int = CHUNK) -> int:
    return seq // chunk


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """What one flush writes: ``writes`` chunk -> its events (the whole chunk), ``deletes``
    the chunks that fell off the end."""
    writes: Mapping[int, tuple[Event, ...]]
    deletes: tuple[int, ...]


def plan_flush(events: Sequence[Event], stored_seq: int, stored_chunks: Iterable[int], *,
               chunk: int = CHUNK, keep_chunks: int = KEEP_CHUNKS) -> FlushPlan:
    """The writes that store every event of ``events`` (oldest first, as held in memory)
    newer than ``stored_seq``: each chunk that got one is rewritten whole, from ``events``;
    chunks older than the newest ``keep_chunks`` are deleted (those in ``stored_chunks``)
    and never written.

    Worked example (chunk 200, keep 50): stored up to seq 9,999 (chunks 0-49); events
    10,000-10,004 arrive -> write chunk 50 (5 events), delete chunk 0."""
    fresh = [e for e in events if e.seq > stored_seq]
    if not fresh:
        return FlushPlan({}, ())
    newest = chunk_of(fresh[-1].seq, chunk)
    oldest_kept = newest - keep_chunks + 1
    touched = sorted({chunk_of(e.seq, chunk) for e in fresh if chunk_of(e.seq, chunk) >= oldest_kept})
    by_chunk: dict[int, list[Event]] = {c: [] for c in touched}
    for e in events:
        c = chunk_of(e.seq, chunk)
        if c in by_chunk:
            by_chunk[c].append(e)
    deletes = tuple(sorted(c for c in set(stored_chunks) if c < oldest_kept))
    return FlushPlan({c: tuple(v) for c, v in by_chunk.items()}, deletes)


def read_chunk(key: str, raw: bytes) -> tuple[list[Event], list[str]]:
    """The events of a stored chunk and the problems found (an unreadable chunk or event
    is skipped and named, never fatal: events are history, not state)."""
    problems: list[str] = []
    try:
        data = json.loads(raw or b"[]")
    except (ValueError, UnicodeDecodeError) as exc:
        return [], [f"{key}: not JSON ({exc})"]
    if not isinstance(data, list):
        return [], [f"{key}: expected a list of events, got {type(data).__name__}"]
    out = []
    for i, d in enumerate(data):
        try:
            out.append(Event.from_json(d))
        except ValueError as exc:
            problems.append(f"{key}[{i}]: {exc}")
    return out, problems


def select(events: Iterable[Event], *, service: str | None = None, since: int | None = None,
           kinds: Iterable[str] = (), limit: int | None = None) -> list[Event]:
    """The events newer than seq ``since``, of ``service`` (its replicas' too) and of
    ``kinds`` when given; the newest ``limit`` of them, oldest first."""
    wanted = frozenset(kinds)
    out = [e for e in events if (since is None or e.seq > since) and (service is None or e.service == service)
           and (not wanted or e.kind in wanted)]
    return out[-limit:] if limit is not None and limit >= 0 else out


def object_of(e: Mapping[str, Any]) -> str:
    """What an event is about, kubectl style: the instance, else ``service/NAME``, else
    ``node/NAME``, else ``-``."""
    if e.get("instance"):
        return str(e["instance"])
    if e.get("service"):
        return f"service/{e['service']}"
    if e.get("node"):
        return f"node/{e['node']}"
    return "-"


def format_event(e: Mapping[str, Any], *, utc: bool = False) -> str:
    """One line of ``meshlet events``: ``TIME  KIND  OBJECT  TEXT``."""
    at = e.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", (time.gmtime if utc else time.localtime)(at)) \
        if isinstance(at, (int, float)) else "-"
    return f"{when}  {str(e.get('kind') or '-'):<12} {object_of(e)}  {e.get('text') or ''}"
