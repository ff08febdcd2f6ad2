"""``/v1/kv/<key>`` and ``/v1/status/*`` handlers (agent/kvs_endpoint.go, status_endpoint.go)."""

from __future__ import annotations

from aiohttp import web

from ._decode import DecodeError, parse_uint
from ._errors import BadRequest, CatalogError
from ._http import Req, Router, conflicting, read_headers
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


def _not_found(index: int) -> web.Response:
    return web.Response(status=404, headers=read_headers(index))


async def kv_get_handler(req: Req) -> web.StreamResponse:
    key = req.tail
    if key and (reason := validate_key(key)):
        raise BadRequest(reason)
    st = req.server.state
    q = req.query
    if "keys" in q:
        sep = q.get("separator", "")
        index, keys = await req.block(lambda: kv_keys(st, key, sep), prefixes=(key,))
        if not keys and key:
            return _not_found(index)
        return req.json(keys, index)
    if "recurse" in q:
        index, rows = await req.block(lambda: kv_list(st, key), prefixes=(key,))
        if not rows:
            return _not_found(index)
        return req.json([entry_json(r) for r in rows], index)
    if not key:
        raise BadRequest("Missing key name")
    index, row = await req.block(lambda: kv_get(st, key), keys=(key,))
    if row is None:
        return _not_found(index)
    if "raw" in q:
        headers = read_headers(index)
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Content-Security-Policy"] = "sandbox"
        return web.Response(body=row.get("Value") or b"", content_type="text/plain", headers=headers)
    return req.json([entry_json(row)], index)


async def kv_put_handler(req: Req) -> web.StreamResponse:
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


async def kv_delete_handler(req: Req) -> web.StreamResponse:
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


async def status_leader(req: Req) -> web.StreamResponse:
    return req.json(req.server.leader_addr, req.server.store.index)


async def status_peers(req: Req) -> web.StreamResponse:
    return req.json([req.server.leader_addr], req.server.store.index)


def register(router: Router) -> None:
    router.add("/v1/kv/", {"GET": kv_get_handler, "PUT": kv_put_handler, "DELETE": kv_delete_handler})
    router.add("/v1/status/leader", {"GET": status_leader})
    router.add("/v1/status/peers", {"GET": status_peers})
