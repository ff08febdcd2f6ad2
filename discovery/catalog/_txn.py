"""``PUT /v1/txn``: KV operations applied atomically (agent/txn_endpoint.go, state/txn.go).

Supported KV verbs: set, cas, lock, unlock, get, get-tree, check-index, check-session,
check-not-exists, delete, delete-tree, delete-cas. Node, Service, Check and Session
operations are refused with 400 (this catalog runs them through its own endpoints only).

All ops run inside one store op: every failing op is reported (``OpIndex``, ``What``)
and then the whole transaction is undone (409), as Consul does.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ._decode import DecodeError, decode_struct
from ._errors import BadRequest, CatalogError, TooLarge
from ._kv import MAX_VALUE_SIZE, entry_json, kv_delete, kv_set, validate_key
from ._model import State
from ._schemas import TXN_OP
from ._store import Tx

__all__ = ["MAX_OPS", "TxnAborted", "parse_ops", "run_txn"]

MAX_OPS = 64  # "up to 64 operations" (api-docs/txn.mdx)
_WRITE_VERBS = {"set", "cas", "lock", "unlock", "delete", "delete-tree", "delete-cas"}
_VERBS = _WRITE_VERBS | {"get", "get-tree", "check-index", "check-session", "check-not-exists"}


class TxnAborted(CatalogError):
    """Some ops failed; nothing was applied. Answered 409 with the errors."""

    status = 409

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("transaction rolled back")
        self.errors = errors


def parse_ops(body: Any) -> list[dict[str, Any]]:
    """Validate the request body fully before anything runs; values come back as bytes."""
    if not isinstance(body, list):
        raise BadRequest("Request decode failed: json: cannot unmarshal object into Go value of type api.TxnOps")
    if len(body) > MAX_OPS:
        raise TooLarge(f"Transaction contains too many operations ({len(body)} > {MAX_OPS})")
    ops = []
    for i, raw in enumerate(body):
        try:
            op = decode_struct(raw, TXN_OP, "api.TxnOp")
        except DecodeError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None
        other = [k for k in ("Node", "Service", "Check", "Session") if k in op]
        if other or "KV" not in op:
            what = other[0] if other else "empty"
            raise BadRequest(f"Operation {i} is a {what} operation: only KV operations are supported by this catalog")
        kv = op["KV"]
        verb = kv.get("Verb", "")
        if verb not in _VERBS:
            raise BadRequest(f'Operation {i}: unknown KV verb "{verb}"')
        key = kv.get("Key", "")
        if not key and verb not in ("get-tree", "delete-tree"):
            raise BadRequest(f"Operation {i}: Missing key name")
        if key and (reason := validate_key(key)):
            raise BadRequest(f"Operation {i}: {reason}")
        value = b""
        if kv.get("Value"):
            try:
                value = base64.b64decode(kv["Value"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequest(f"Request decode failed: illegal base64 data in operation {i}: {exc}") from None
        if len(value) > MAX_VALUE_SIZE:
            raise TooLarge(f'Value for key "{key}" is too large ({len(value)} > {MAX_VALUE_SIZE} bytes)')
        if verb in ("lock", "unlock", "check-session") and not kv.get("Session"):
            raise BadRequest(f"Operation {i}: Missing Session for {verb}")
        ops.append({"verb": verb, "key": key, "value": value, "flags": kv.get("Flags", 0),
                    "index": kv.get("Index", 0), "session": kv.get("Session", "")})
    return ops


def _one(st: State, tx: Tx, op: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one op; returns its results, raises ValueError with Consul's text on failure."""
    verb, key = op["verb"], op["key"]
    if verb in ("set", "cas", "lock", "unlock"):
        kwargs: dict[str, Any] = {}
        if verb == "cas":
            kwargs["cas"] = op["index"]
        elif verb == "lock":
            kwargs["acquire"] = op["session"]
        elif verb == "unlock":
            kwargs["release"] = op["session"]
        try:
            ok = kv_set(st, tx, key, op["value"], op["flags"], **kwargs)
        except CatalogError as exc:
            raise ValueError(exc.reason) from None
        if not ok:
            raise ValueError({
                "cas": f'failed to set key "{key}", index is stale',
                "lock": f'failed to lock key "{key}", lock is already held',
                "unlock": f'failed to unlock key "{key}", lock isn\'t held, or is held by another session',
            }[verb])
        return [{"KV": entry_json(st.kv.rows[key], with_value=False)}]
    if verb in ("delete", "delete-tree", "delete-cas"):
        cas = op["index"] if verb == "delete-cas" else None
        if not kv_delete(st, tx, key, recurse=verb == "delete-tree", cas=cas):
            raise ValueError(f'failed to delete key "{key}", index is stale')
        return []
    if verb == "get-tree":
        return [{"KV": entry_json(st.kv.rows[k])} for k in st.kv.prefix_keys(key)]
    row = st.kv.get(key)
    if verb == "check-not-exists":
        if row is not None:
            raise ValueError(f'key "{key}" exists')
        return []
    if row is None:
        raise ValueError(f'key "{key}" doesn\'t exist')
    if verb == "check-index" and row["ModifyIndex"] != op["index"]:
        raise ValueError(f'current modify index {row["ModifyIndex"]} != {op["index"]}')
    if verb == "check-session" and row.get("Session", "") != op["session"]:
        raise ValueError(f'failed session check for key "{key}", current session "{row.get("Session", "")}" != "{op["session"]}"')
    return [{"KV": entry_json(row, with_value=verb == "get")}]


def run_txn(st: State, tx: Tx, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The store op: all results, or TxnAborted (the store undoes every change)."""
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for i, op in enumerate(ops):
        try:
            results.extend(_one(st, tx, op))
        except ValueError as exc:
            errors.append({"OpIndex": i, "What": str(exc)})
    if errors:
        raise TxnAborted(errors)
    return results
