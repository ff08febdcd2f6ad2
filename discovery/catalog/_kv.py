"""The KV store: key validation, writes (set/CAS/lock/delete) and reads with their index.

Writes are ops for the store's writer (``fn(tx)``), so CAS and lock acquisition are
linearisable: they see every earlier write and nothing can interleave.

Semantics follow Consul's state store (agent/consul/state/kvs.go):

* set: keeps CreateIndex, LockIndex and the lock holder; Flags are replaced (0 if absent).
* cas=0: create only; cas=N: only if ModifyIndex == N.
* acquire: fails if another session holds the key or the key is in lock-delay; a new
  holder increments LockIndex, the holder re-acquiring does not.
* release: only by the holder; clears Session, writes the value.
* delete: records a tombstone so that a recurse/keys watcher's index still moves forward;
  delete-cas on a missing key succeeds (Consul's behaviour).

Index of a read: a found key -> its ModifyIndex; a list -> the highest ModifyIndex or
tombstone under the prefix; a miss -> the KV table index (``kvs``).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from ._errors import CatalogError
from ._model import State
from ._store import Row, Tx

__all__ = [
    "MAX_VALUE_SIZE",
    "validate_key",
    "kv_set",
    "kv_delete",
    "kv_get",
    "kv_list",
    "kv_keys",
    "entry_json",
    "release_session_locks",
    "reap_tombstones",
]

MAX_VALUE_SIZE = 512 * 1024  # kv_max_value_size
TOMBSTONE_TTL = 900.0  # seconds a delete's tombstone is kept (Consul's tombstone_ttl, 15m)


def validate_key(key: str) -> str | None:
    """Why ``key`` is refused, or None. Refused: path traversal (a ``..`` segment, also
    percent-encoded) and leading/trailing white space (Consul's CVE-2025-11392 rules)."""
    if key != key.strip():
        return f'Invalid key name "{key}": leading or trailing white space is not allowed'
    decoded = key
    for _ in range(3):  # catch %2e%2e and %252e%252e
        segments = decoded.replace("\\", "/").split("/")
        if ".." in segments:
            return f'Invalid key name "{key}": path traversal ("..") is not allowed'
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    return None


def entry_json(row: Row, with_value: bool = True) -> dict[str, Any]:
    """Consul's DirEntry JSON (``Value`` base64 or null); rows store raw bytes."""
    import base64

    out: dict[str, Any] = {
        "LockIndex": row["LockIndex"],
        "Key": row["Key"],
        "Flags": row["Flags"],
        "Value": None,
        "CreateIndex": row["CreateIndex"],
        "ModifyIndex": row["ModifyIndex"],
    }
    value = row.get("Value")
    if with_value and value:
        out["Value"] = base64.b64encode(value).decode("ascii")
    if row.get("Session"):
        out["Session"] = row["Session"]
    return out


# -- writes --------------------------------------------------------------------------------
def _put_entry(st: State, tx: Tx, key: str, value: bytes | None, flags: int, existing: Row | None,
               session: str | None, lock_index: int | None = None) -> Row:
    idx = tx.index
    row: Row = {
        "Key": key,
        "Flags": flags,
        "LockIndex": lock_index if lock_index is not None else (existing["LockIndex"] if existing else 0),
        "Session": session if session is not None else (existing.get("Session", "") if existing else ""),
        "CreateIndex": existing["CreateIndex"] if existing else idx,
        "ModifyIndex": idx,
        "Value": value or None,
    }
    tx.put(st.kv, key, row)
    if key in st.tombs:
        tx.delete(st.tombs, key)
    tx.bump("kvs")
    tx.touch_kv(key)
    return row


def kv_set(
    st: State,
    tx: Tx,
    key: str,
    value: bytes | None,
    flags: int = 0,
    cas: int | None = None,
    acquire: str | None = None,
    release: str | None = None,
    now: float | None = None,
) -> bool:
    """PUT /v1/kv/<key>: True if the write happened."""
    existing = st.kv.get(key)
    if cas is not None:
        if cas == 0 and existing is not None:
            return False
        if cas != 0 and (existing is None or existing["ModifyIndex"] != cas):
            return False
        _put_entry(st, tx, key, value, flags, existing, None)
        return True
    if acquire is not None:
        if acquire not in st.sessions:
            raise CatalogError(f'invalid session "{acquire}"')
        now = time.monotonic() if now is None else now
        until = st.lock_delays.get(key)
        if until is not None:
            if until > now:
                return False
            del st.lock_delays[key]
        if existing is not None and existing.get("Session"):
            if existing["Session"] != acquire:
                return False
            _put_entry(st, tx, key, value, flags, existing, acquire)  # holder re-acquires
            return True
        lock_index = (existing["LockIndex"] if existing else 0) + 1
        _put_entry(st, tx, key, value, flags, existing, acquire, lock_index)
        return True
    if release is not None:
        if existing is None or existing.get("Session") != release:
            return False
        _put_entry(st, tx, key, value, flags, existing, "")
        return True
    _put_entry(st, tx, key, value, flags, existing, None)
    return True


def _tombstone(st: State, tx: Tx, key: str) -> None:
    tx.delete(st.kv, key)
    tx.put(st.tombs, key, {"i": tx.index, "t": int(time.time())})
    tx.bump("kvs")
    tx.touch_kv(key)


def kv_delete(st: State, tx: Tx, key: str, recurse: bool = False, cas: int | None = None) -> bool:
    """DELETE /v1/kv/<key>: True unless a CAS failed."""
    if recurse:
        for k in st.kv.prefix_keys(key):
            _tombstone(st, tx, k)
        return True
    existing = st.kv.get(key)
    if cas is not None:
        if existing is None:
            return True
        if existing["ModifyIndex"] != cas:
            return False
    if existing is not None:
        _tombstone(st, tx, key)
    return True


def release_session_locks(st: State, tx: Tx, session: Row, now: float | None = None) -> None:
    """A session is going away: release (or delete) what it holds and start lock-delay."""
    sid = session["ID"]
    keys = sorted(st.kv_by_session.get(sid, ()))
    delay_ns = int(session.get("LockDelay") or 0)
    now = time.monotonic() if now is None else now
    for key in keys:
        existing = st.kv.rows[key]
        if session.get("Behavior") == "delete":
            _tombstone(st, tx, key)
        else:
            _put_entry(st, tx, key, existing.get("Value"), existing["Flags"], existing, "")
        if delay_ns > 0:
            # Set at once (not after commit) so that an acquire later in the same batch
            # already sees it; if the batch fails, a spurious delay is the only harm.
            st.lock_delays[key] = now + delay_ns / 1e9


def reap_tombstones(st: State, tx: Tx, now: float, limit: int = 10_000) -> int:
    """Forget tombstones older than TOMBSTONE_TTL (at most ``limit`` per op). Takes no
    index: it changes no answer except that a prefix's index may step back, which
    clients handle (they reset when an index goes backwards)."""
    cutoff = now - TOMBSTONE_TTL
    old = [k for k, row in st.tombs.rows.items() if row.get("t", 0) < cutoff][:limit]
    for key in old:
        tx.delete(st.tombs, key)
    return len(old)


# -- reads ---------------------------------------------------------------------------------
def _table_index(st: State) -> int:
    return max(1, st.index_of("kvs", 1))


def _prefix_index(st: State, prefix: str, rows: list[Row]) -> int:
    if not prefix:
        return _table_index(st)
    idx = max((r["ModifyIndex"] for r in rows), default=0)
    tombs = st.tombs.rows
    for k in st.tombs.prefix_keys(prefix):
        idx = max(idx, tombs[k]["i"])
    return idx if idx else _table_index(st)


def kv_get(st: State, key: str) -> tuple[int, Row | None]:
    row = st.kv.get(key)
    if row is None:
        return _table_index(st), None
    return row["ModifyIndex"], row


def kv_list(st: State, prefix: str) -> tuple[int, list[Row]]:
    rows = [st.kv.rows[k] for k in st.kv.prefix_keys(prefix)]
    return _prefix_index(st, prefix, rows), rows


def kv_keys(st: State, prefix: str, separator: str = "") -> tuple[int, list[str]]:
    keys = st.kv.prefix_keys(prefix)
    rows = [st.kv.rows[k] for k in keys]
    out: list[str] = []
    if separator:
        n = len(prefix)
        for k in keys:
            pos = k.find(separator, n)
            short = k if pos < 0 else k[: pos + len(separator)]
            if not out or out[-1] != short:
                out.append(short)
    else:
        out = list(keys)
    return _prefix_index(st, prefix, rows), out

