"""``/v1/kv/<key>`` and ``/v1/status/*`` handlers (agent/kvs_endpoint.go, status_endpoint.go)."""

from __future__ import annotations

from ._decode import DecodeError, parse_uint
from ._errors import BadRequest, CatalogError
from ._http import Answer, Req, Router, conflicting, json_response, read_headers
from ._wire import Reply
from ._kv import MAX_VALUE_SIZE, entry_json, kv_delete, kv_get, kv_keys, kv_list, kv_set, validate_key

__all__ = ["register"]


def _uint_param(req: Req, name: str) -> int | None:
    """A uint64 query parameter; like Consul, a bad one is a 500 (strconv error)."""
    if name not in req.query:
        return None
    try:
        return parse_uint(req.query[name])
    except DecodeError as exc:
        raise CatalogError(f"invalid {name}: {exc}") from None


def _not_found(index: int) -> Reply:
    return Reply(404, headers=read_headers(index))


async def kv_get_handler(req: Req) -> Answer:
    key = req.tail
    if key and (reason := validate_key(key)):
        raise BadRequest(reason)
    st = req.server.state
    q = req.query
    pretty = req.pretty
    if "keys" in q:
        sep = q.get("separator", "")

        def keys_reply(index: int, keys: list[str]) -> Reply:
            return _not_found(index) if not keys and key else json_response(keys, index=index, pretty=pretty)

        return req.block(lambda: kv_keys(st, key, sep), keys_reply, prefixes=(key,))
    if "recurse" in q:
        def list_reply(index: int, rows: list) -> Reply:
            if not rows:
                return _not_found(index)
            return json_response([entry_json(r) for r in rows], index=index, pretty=pretty)

        return req.block(lambda: kv_list(st, key), list_reply, prefixes=(key,))
    if not key:
        raise BadRequest("Missing key name")
    raw = "raw" in q

    def get_reply(index: int, row: dict | None) -> Reply:
        if row is None:
            return _not_found(index)
        if raw:
            headers = read_headers(index)
            headers["X-Content-Type-Options"] = "nosniff"
            headers["Content-Security-Policy"] = "sandbox"
            return Reply(200, row.get("Value") or b"", "text/plain", headers)
        return json_response([entry_json(row)], index=index, pretty=pretty)

    return req.block(lambda: kv_get(st, key), get_reply, keys=(key,))


async def kv_put_handler(req: Req) -> Answer:
    key = req.tail
    if not key:
        raise BadRequest("Missing key name")
    if reason := validate_key(key):
        raise BadRequest(reason)
    q = req.query
    conflicting(q, "cas", "acquire", "release")
    flags = _uint_param(req, "flags") or 0
    cas = _uint_param(req, "cas")
    acquire = q.get("acquire")
    release = q.get("release")
    value = await req.body(MAX_VALUE_SIZE)
    st = req.server.state
    ok = await req.server.store.write(
        lambda tx: kv_set(st, tx, key, value, flags, cas=cas, acquire=acquire, release=release)
    )
    return req.json(bool(ok))


async def kv_delete_handler(req: Req) -> Answer:
    key = req.tail
    q = req.query
    recurse = "recurse" in q
    if not key and not recurse:
        raise BadRequest("Missing key name")
    if key and (reason := validate_key(key)):
        raise BadRequest(reason)
    conflicting(q, "recurse", "cas")
    cas = _uint_param(req, "cas")
    st = req.server.state
    ok = await req.server.store.write(lambda tx: kv_delete(st, tx, key, recurse=recurse, cas=cas))
    return req.json(bool(ok))


async def status_leader(req: Req) -> Answer:
    return req.json(req.server.leader_addr, req.server.store.index)


async def status_peers(req: Req) -> Answer:
    return req.json([req.server.leader_addr], req.server.store.index)


def register(router: Router) -> None:
    router.add("/v1/kv/", {"GET": kv_get_handler, "PUT": kv_put_handler, "DELETE": kv_delete_handler})
    router.add("/v1/status/leader", {"GET": status_leader})
    router.add("/v1/status/peers", {"GET": status_peers})
