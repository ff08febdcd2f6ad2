"""Revision history of one service and the fencepost arithmetic of a rolling update. Pure.

History is a plain list of entries (dicts, so it stores as JSON in KV unchanged), oldest
first::

    {"number": 3, "revision": "9f86d081884c", "created_at": 1764000000.0,
     "status": "active", "spec": {...the service document's spec...},
     "restart_token": "..." | None, "change": "env (GREETING)"}

``change`` (``change_summary``) says what the entry changed against the revision that ran
when it was recorded; kept with the entry, so a rollback's renumbering does not change it.

Statuses
    active      the revision being rolled out now (at most one, always the last entry)
    complete    a rollout to it finished once: a good target for rollback/auto-revert
    failed      its rollout failed (crashes, progress deadline): never an auto-revert target
    superseded  replaced by a newer revision before its rollout completed

Numbers only grow. Re-applying a revision already in the history (a rollback, or an edit
back to an older spec) moves it to a new number, as ``kubectl rollout undo`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

__all__ = ["RolloutError", "EntryStatus", "resolve_fenceposts", "record_revision", "record",
           "mark_revision", "rollback_target", "restart_revision", "change_summary", "is_history"]


class EntryStatus(StrEnum):
    """The status of a history entry (stored as its string value)."""
    ACTIVE = "active"
    COMPLETE = "complete"
    FAILED = "failed"
    SUPERSEDED = "superseded"


ACTIVE, COMPLETE, FAILED, SUPERSEDED = (EntryStatus.ACTIVE, EntryStatus.COMPLETE, EntryStatus.FAILED,
                                        EntryStatus.SUPERSEDED)
_STATUSES = tuple(EntryStatus)


class RolloutError(ValueError):
    """A request the history cannot satisfy (``rollback --to`` a number it does not hold)."""


def _scaled(value: int | str, replicas: int, round_up: bool, what: str) -> int:
    if isinstance(value, bool):
        raise RolloutError(f"{what}: expected a count or a percentage, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise RolloutError(f"{what}: expected a count >= 0, got {value}")
        return value
    text = str(value).strip()
    if text.endswith("%") and text[:-1].isdigit():
        share = int(text[:-1]) * replicas
        # integer arithmetic: ceil/floor of a percentage without float error (25% of 12 = 3)
        return -(-share // 100) if round_up else share // 100
    if text.isdigit():
        return int(text)
    raise RolloutError(f"{what}: expected a count or a percentage like 25%, got {value!r}")


def resolve_fenceposts(replicas: int, max_surge: int | str,
                       max_unavailable: int | str) -> tuple[int, int]:
    """``(surge, unavailable)`` exactly as Kubernetes ``ResolveFenceposts`` + ``MaxUnavailable``.

    A percentage of ``replicas``: surge rounded up, unavailable rounded down; counts as given.
    Both 0 would never move (nothing may be added, nothing removed), so unavailable becomes 1.
    Unavailable is capped at ``replicas`` (0 replicas -> 0).

    Worked examples (reference/orchestrators.md §2.1):
    10 replicas, 25%/25% -> (3, 2): at most 13 replicas, at least 8 available.
    1 replica, 25%/25%  -> (1, 0): start the new one first.
    3 replicas, 25%/25% -> (1, 0).
    2 replicas, 0/1%    -> (0, 1): floor(0.02) = 0, forced to 1: kill first.
    """
    if replicas < 0:
        raise RolloutError(f"replicas: expected >= 0, got {replicas}")
    surge = _scaled(max_surge, replicas, True, "max_surge")
    unavailable = _scaled(max_unavailable, replicas, False, "max_unavailable")
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, replicas)


def restart_revision(revision: str, token: str | None) -> str:
    """The revision a rolling restart (``meshlet restart``) rolls to: the spec is unchanged,
    so the supervisor derives a new 12-hex revision from the spec's and a restart token
    (e.g. the time of the request). No token: the spec's revision itself."""
    if not token:
        return revision
    return hashlib.sha256(f"{revision}:restart:{token}".encode()).hexdigest()[:12]


def is_history(value: Any) -> bool:
    """Does ``value`` (JSON read back from KV) have the shape of a history?"""
    return isinstance(value, list) and all(
        isinstance(e, dict) and isinstance(e.get("number"), int) and isinstance(e.get("revision"), str)
        and e.get("status") in _STATUSES for e in value)


def _check(history: Sequence[Mapping[str, Any]]) -> None:
    for i, e in enumerate(history):
        if not isinstance(e, Mapping) or not isinstance(e.get("number"), int) \
                or not isinstance(e.get("revision"), str) or e.get("status") not in _STATUSES:
            raise RolloutError(f"history[{i}]: expected {{number, revision, created_at, status}}, "
                               f"got {e!r:.120}")


def record_revision(history: Sequence[Mapping[str, Any]], revision: str,
                    spec_doc: Mapping[str, Any] | None, now: float,
                    limit: int = 10) -> list[dict[str, Any]]:
    """A new history with ``revision`` as the active (last) entry, numbered one past the
    highest number so far. The previous active entry becomes ``superseded``; an older entry
    of the same revision is dropped (it moves to the new number). Keeps the last ``limit``
    entries besides the active one, and always the newest ``complete`` one, so that
    auto-revert has a target even with ``history: 0``. Recording the active revision
    again returns the history unchanged (an apply of the same spec is no rollout)."""
    _check(history)
    if history and history[-1]["revision"] == revision and history[-1]["status"] == ACTIVE:
        return [dict(e) for e in history]
    number = max((e["number"] for e in history), default=0) + 1
    out = []
    for e in history:
        if e["revision"] == revision:
            continue
        e = dict(e)
        if e["status"] == ACTIVE:
            e["status"] = SUPERSEDED
        out.append(e)
    keep = out[-limit:] if limit > 0 else []
    newest_complete = next((e for e in reversed(out) if e["status"] == COMPLETE), None)
    if newest_complete is not None and all(e is not newest_complete for e in keep):
        keep = [newest_complete] + keep
    keep.append({"number": number, "revision": revision, "created_at": now,
                 "status": ACTIVE, "spec": dict(spec_doc) if spec_doc is not None else None})
    return keep


def record(history: Sequence[Mapping[str, Any]], revision: str, spec_doc: Mapping[str, Any] | None,
           token: str | None, now: float, limit: int = 10) -> tuple[list[dict[str, Any]], str | None]:
    """``record_revision`` as the supervisor records a revision it rolls to: the entry also
    keeps its restart token and what it changed (``change_summary`` against the entry that
    was last). Returns ``(history, problem)``: a history that cannot be read (corrupt in KV)
    is replaced by a new one holding only this entry, and ``problem`` says why."""
    problem = None
    try:
        out = record_revision(history, revision, spec_doc, now, limit)
    except RolloutError as exc:
        problem = f"{exc}; starting a new history"
        history = []
        out = record_revision([], revision, spec_doc, now, limit)
    entry = out[-1]
    entry["restart_token"] = token
    if history and history[-1].get("revision") != revision:   # (re-recording the active one: as it was)
        entry["change"] = change_summary(history[-1], entry)
    return out, problem


def mark_revision(history: Sequence[Mapping[str, Any]], revision: str,
                  status: str) -> list[dict[str, Any]]:
    """A new history with the newest entry of ``revision`` set to ``status`` (what the
    supervisor does on ``MarkComplete``/``MarkFailed``). Unknown revision: unchanged."""
    _check(history)
    if status not in _STATUSES:
        raise RolloutError(f"status: expected one of {', '.join(_STATUSES)}, got {status!r}")
    out = [dict(e) for e in history]
    for e in reversed(out):
        if e["revision"] == revision:
            e["status"] = status
            break
    return out


def rollback_target(history: Sequence[Mapping[str, Any]],
                    to: int | None = None) -> dict[str, Any] | None:
    """The entry to roll back to.

    ``to=None`` (auto-revert, plain ``meshlet rollback``): the newest ``complete`` entry
    that is not the last one (the current); a failed revision is never chosen. None when
    there is none (the first rollout of a service has nothing to go back to).
    ``to=N`` (``rollback --to N``): entry number N, which must exist and not be the current
    one; RolloutError otherwise, naming the numbers there are.
    """
    _check(history)
    if to is None:
        for e in reversed(history[:-1]):
            if e["status"] == COMPLETE:
                return dict(e)
        return None
    numbers = [e["number"] for e in history]
    for e in history:
        if e["number"] == to:
            if e is history[-1]:
                raise RolloutError(f"revision {to} is the current revision")
            return dict(e)
    have = ", ".join(str(n) for n in numbers) or "none"
    raise RolloutError(f"revision {to} is not in the history (have: {have})")


def change_summary(prev: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> str:
    """What ``entry`` changed against the entry before it: the differing top-level spec
    fields (``env`` with the names of the keys that changed, never their values), ``rolling
    restart`` for the same spec with a new restart token, ``-`` for the oldest entry."""
    if prev is None:
        return "-"
    a, b = prev.get("spec"), entry.get("spec")
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return "?"
    parts = []
    for field in sorted(a.keys() | b.keys()):
        if field == "replicas" or a.get(field) == b.get(field):
            continue
        if field == "env" and isinstance(a.get(field), Mapping) and isinstance(b.get(field), Mapping):
            ea, eb = a["env"], b["env"]
            names = [("+" if k not in ea else "-" if k not in eb else "") + k
                     for k in sorted(ea.keys() | eb.keys()) if ea.get(k) != eb.get(k)]
            parts.append(f"env ({', '.join(names)})")
        else:
            parts.append(field)
    if not parts:
        return "rolling restart" if prev.get("restart_token") != entry.get("restart_token") else "no change"
    return ", ".join(parts)
