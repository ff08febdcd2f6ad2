"""``/v1/session/*``, ``/v1/txn`` and ``/v1/acl/token/self``."""

from __future__ import annotations

import uuid
from typing import Any

from ._auth import request_token
from ._decode import DecodeError, decode_struct, norm_key
from ._errors import BadRequest
from ._http import Answer, Req, Router, json_response
from ._schemas import SESSION
from ._sessions import LOCK_DELAY_SECONDS_BELOW, create_session, destroy_session, renew_session
from ._txn import TxnAborted, parse_ops, run_txn

__all__ = ["register"]


def _lock_delay_in_seconds(body: Any) -> bool:
    """Consul reads a JSON *number* LockDelay below 1000 as seconds (lockDelayMinThreshold)."""
    if not isinstance(body, dict):
        return False
    for k, v in body.items():
        if norm_key(k) == "lockdelay" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return 0 < v < LOCK_DELAY_SECONDS_BELOW
    return False


async def session_create(req: Req) -> Answer:
    body = await req.json_body(allow_empty=True)
    try:
        d = decode_struct(body, SESSION)
    except DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None
    if _lock_delay_in_seconds(body):
        d["LockDelay"] = int(d["LockDelay"] * 1_000_000_000)
    server = req.server
    st, node, ttl_min = server.state, server.opts.node, int(server.opts.session_ttl_min * 1e9)
    sid = await server.store.write(lambda tx: create_session(st, tx, d, node, ttl_min))
    return req.json({"ID": sid})


async def session_destroy(req: Req) -> Answer:
    st, sid = req.server.state, req.tail
    ok = await req.server.store.write(lambda tx: destroy_session(st, tx, sid))
    return req.json(ok)


async def session_renew(req: Req) -> Answer:
    server, sid = req.server, req.tail

    def renew(tx: Any) -> dict[str, Any]:
        row = renew_session(server.state, sid)
        server.sessions.reset(sid)  # in the writer: an expiry queued behind us sees it
        return row

    row = await server.store.write(renew)
    return req.json([row], server.store.index)


async def _session_read(req: Req, pick: Any) -> Answer:
    st = req.server.state
    return req.block(lambda: (max(1, st.index_of("sessions", 1)), pick(st)), topics=("sessions",))


async def session_info(req: Req) -> Answer:
    sid = req.tail
    if not sid:
        raise BadRequest("Missing session")
    return await _session_read(req, lambda st: [st.sessions.rows[sid]] if sid in st.sessions else [])


async def session_list(req: Req) -> Answer:
    return await _session_read(req, lambda st: [st.sessions.rows[s] for s in sorted(st.sessions.rows)])


async def session_node(req: Req) -> Answer:
    node = req.tail
    if not node:
        raise BadRequest("Missing node name")
    return await _session_read(
        req, lambda st: [st.sessions.rows[s] for s in sorted(st.sessions_by_node.get(node, ()))]
    )


async def txn(req: Req) -> Answer:
    ops = parse_ops(await req.json_body())
    st = req.server.state
    try:
        results = await req.server.store.write(lambda tx: run_txn(st, tx, ops))
    except TxnAborted as exc:
        return json_response({"Results": None, "Errors": exc.errors}, pretty=req.pretty, status=409)
    return req.json({"Results": results or None, "Errors": None}, req.server.store.index)


async def acl_token_self(req: Req) -> Answer:
    """The one token there is (only the management token gets this far), as Consul
    describes its initial management token."""
    token = request_token(req.request)
    return req.json({
        "AccessorID": str(uuid.uuid5(uuid.NAMESPACE_URL, "meshlet-catalog-token:" + token)),
        "SecretID": token, "Description": "Initial Management Token",
        "Policies": [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}],
        "Local": False, "CreateIndex": 1, "ModifyIndex": 1,
    })


def register(router: Router) -> None:
    add = router.add
    add("/v1/session/create", {"PUT": session_create})
    add("/v1/session/destroy/", {"PUT": session_destroy})
    add("/v1/session/renew/", {"PUT": session_renew})
    add("/v1/session/info/", {"GET": session_info})
    add("/v1/session/list", {"GET": session_list})
    add("/v1/session/node/", {"GET": session_node})
    add("/v1/txn", {"PUT": txn})
    # ACLs are on (one management token, _auth); managing tokens and policies is not served.
    add("/v1/acl/token/self", {"GET": acl_token_self}, check_dc=False)
