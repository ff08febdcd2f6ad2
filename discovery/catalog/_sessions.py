"""Sessions: create/renew/destroy ops, invalidation, and their TTL timers.

Rules (agent/consul/session_endpoint.go, state/session.go, session_ttl.go):

* create: Node defaults to the catalog's node and must exist; checks default to
  ``["serfHealth"]``; every listed check must exist and not be critical. Behavior is
  ``release`` (default) or ``delete``; LockDelay defaults to 15s (a JSON number below
  1000 means seconds, above means nanoseconds); TTL is "" (none) or between
  ``--session-ttl-min`` (10s by default) and 24h.
* invalidation (destroy, TTL expiry, one of its checks going critical or away, its node
  going away) releases the keys it holds (``release``) or deletes them (``delete``) and
  puts them in lock-delay.
* TTL: like Consul, a session expires TTL x 2 after its creation or last renewal
  (SessionTTLMultiplier = 2). Timers live in memory; after a restart every session gets
  its full TTL x 2 again.

Validation errors are 500s with Consul's texts (they come from its RPC layer).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from ._checkdef import CRITICAL
from ._decode import DecodeError, format_go_duration, parse_go_duration
from ._errors import BadRequest, CatalogError, NotFound
from ._kv import release_session_locks
from ._model import State
from ._store import Commit, Row, Tx

if TYPE_CHECKING:
    from ._server import CatalogServer

__all__ = [
    "create_session", "destroy_session", "renew_session", "invalidate_session", "invalidate_for_check",
    "invalidate_for_node", "session_ttl_ns", "SessionTimers", "TTL_MULTIPLIER", "DEFAULT_LOCK_DELAY_NS",
]

log = logging.getLogger("discovery.catalog.sessions")

TTL_MULTIPLIER = 2
DEFAULT_LOCK_DELAY_NS = 15_000_000_000
MAX_TTL_NS = 24 * 3600 * 1_000_000_000
LOCK_DELAY_SECONDS_BELOW = 1000  # lockDelayMinThreshold: smaller numbers are seconds


def session_ttl_ns(ttl: str, min_ns: int) -> int:
    """Validate a session TTL string; 0 means none. Raises CatalogError with Consul's text."""
    if not ttl:
        return 0
    try:
        ns = parse_go_duration(ttl)
    except DecodeError as exc:
        raise CatalogError(f"Session TTL '{ttl}' invalid: {exc}") from None
    if ns != 0 and (ns < min_ns or ns > MAX_TTL_NS):
        raise CatalogError(
            f"Invalid Session TTL '{ns}', must be between [{format_go_duration(min_ns)}={format_go_duration(MAX_TTL_NS)}]"
        )
    return ns


def _check_usable(st: State, node: str, cid: str) -> None:
    row = st.checks.get((node, cid))
    if row is None:
        raise CatalogError(f"Missing check '{cid}' registration")
    if row["Status"] == CRITICAL:
        raise CatalogError(f"Check '{cid}' is in critical state")


def create_session(st: State, tx: Tx, d: dict[str, Any], default_node: str, ttl_min_ns: int) -> str:
    node = d.get("Node") or default_node
    if node not in st.nodes:
        raise CatalogError("Missing node registration")
    behavior = d.get("Behavior") or "release"
    if behavior not in ("release", "delete"):
        raise CatalogError(f"Invalid Behavior setting '{behavior}'")
    ttl = d.get("TTL", "")
    session_ttl_ns(ttl, ttl_min_ns)
    lock_delay = d["LockDelay"] if "LockDelay" in d else DEFAULT_LOCK_DELAY_NS
    if "NodeChecks" in d or "Checks" in d or "ServiceChecks" in d:
        node_checks = list(dict.fromkeys((d.get("NodeChecks") or []) + (d.get("Checks") or [])))
    else:
        node_checks = ["serfHealth"]
    service_checks = [{"ID": sc.get("ID", ""), "Namespace": ""} for sc in d.get("ServiceChecks") or []]
    for cid in node_checks:
        _check_usable(st, node, cid)
    for sc in service_checks:
        _check_usable(st, node, sc["ID"])
    sid = str(uuid.uuid4())
    idx = tx.index
    row: Row = {
        "ID": sid,
        "Name": d.get("Name", ""),
        "Node": node,
        "LockDelay": int(lock_delay),
        "Behavior": behavior,
        "TTL": ttl,
        "NodeChecks": node_checks,
        "ServiceChecks": service_checks or None,
        "CreateIndex": idx,
        "ModifyIndex": idx,
    }
    tx.put(st.sessions, sid, row)
    tx.bump("sessions")
    return sid


def invalidate_session(st: State, tx: Tx, sid: str) -> None:
    row = st.sessions.get(sid)
    if row is None:
        return
    release_session_locks(st, tx, row)
    tx.delete(st.sessions, sid)
    tx.bump("sessions")


def destroy_session(st: State, tx: Tx, sid: str) -> bool:
    if not sid:
        raise BadRequest("Missing session")
    invalidate_session(st, tx, sid)
    return True


def renew_session(st: State, sid: str) -> Row:
    if not sid:
        raise BadRequest("Missing session")
    row = st.sessions.get(sid)
    if row is None:
        raise NotFound(f"Session id '{sid}' not found")
    return row


def invalidate_for_check(st: State, tx: Tx, node: str, cid: str) -> None:
    """A check went critical or away: invalidate the sessions that depend on it."""
    for sid in sorted(st.sessions_by_node.get(node, ())):
        row = st.sessions.rows[sid]
        if cid in (row.get("NodeChecks") or ()) or any(sc["ID"] == cid for sc in row.get("ServiceChecks") or ()):
            invalidate_session(st, tx, sid)


def invalidate_for_node(st: State, tx: Tx, node: str) -> None:
    for sid in sorted(st.sessions_by_node.get(node, ())):
        invalidate_session(st, tx, sid)


class SessionTimers:
    """Expires TTL sessions. Armed from committed state; renewals reset from the writer."""

    def __init__(self, server: "CatalogServer") -> None:
        self.server = server
        self.state = server.state
        self._deadline: dict[str, float] = {}
        self._handles: dict[str, asyncio.TimerHandle] = {}

    async def start(self) -> None:
        self.server.store.add_listener(self.on_commit)
        for sid in list(self.state.sessions.rows):
            self._reconcile(sid)

    async def stop(self) -> None:
        for h in self._handles.values():
            h.cancel()
        self._handles.clear()

    def on_commit(self, commit: Commit) -> None:
        for table, key in commit.dirty:
            if table == "sessions":
                self._reconcile(key)

    def _ttl_seconds(self, row: Row) -> float:
        try:
            return parse_go_duration(row.get("TTL") or "0") / 1e9
        except DecodeError:
            return 0.0

    def _reconcile(self, sid: str) -> None:
        row = self.state.sessions.get(sid)
        ttl = self._ttl_seconds(row) if row is not None else 0.0
        if row is None or ttl <= 0:
            self._cancel(sid)
        elif sid not in self._handles:
            self.reset(sid)

    def _cancel(self, sid: str) -> None:
        h = self._handles.pop(sid, None)
        if h is not None:
            h.cancel()
        self._deadline.pop(sid, None)

    def reset(self, sid: str) -> None:
        """Start the session's TTL x 2 over (creation, renewal, boot)."""
        row = self.state.sessions.get(sid)
        if row is None:
            return
        ttl = self._ttl_seconds(row)
        if ttl <= 0:
            return
        self._cancel(sid)
        delay = ttl * TTL_MULTIPLIER
        loop = asyncio.get_running_loop()
        self._deadline[sid] = loop.time() + delay
        self._handles[sid] = loop.call_later(delay, self._fire, sid)

    def _fire(self, sid: str) -> None:
        st = self.state
        loop = asyncio.get_running_loop()
        deadline = self._deadline.get(sid)
        if deadline is not None and deadline > loop.time():
            # Timers may fire up to a clock tick early (uvloop rounds to ms): wait the rest.
            self._handles[sid] = loop.call_later(deadline - loop.time() + 0.001, self._fire, sid)
            return
        self._handles.pop(sid, None)

        def expire(tx: Tx) -> None:
            deadline = self._deadline.get(sid)
            if deadline is not None and deadline > loop.time():
                return  # renewed after the timer fired
            if sid in st.sessions:
                log.info("session %s expired (TTL)", sid)
                invalidate_session(st, tx, sid)

        fut = self.server.store.submit(expire)
        fut.add_done_callback(_log_failure)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("timer write failed: %s", fut.exception())
