"""Pure decisions of an exchange: whether to retry, what the upstream and the client are
sent as heads, which key a hashing balancer gets. No sockets, no clock: tested directly."""

from __future__ import annotations

import ssl
from typing import Any

from ._framing import CHUNKED, CRLF, LENGTH, NONE, UNTIL_CLOSE, RequestHead, status_line

__all__ = ["REPLAY_LIMIT", "HEDGE_AFTER", "SAFE_METHODS", "retry_decision", "hedge_decision", "upstream_parts", "client_head", "hash_key", "os_error"]

REPLAY_LIMIT = 64 * 1024  # request body bytes kept for a retry
_RETRY_STATUSES = frozenset({502, 503, 504})
# A safe request without a response head this long after it was sent, on a route without
# per_try_timeout, is also sent to another endpoint and the first response head wins
# (Envoy's hedge_on_per_try_timeout; Envoy and HAProxy set no per-try time-out by
# default, so a frozen or vanished upstream holds a request for the whole route time-out,
# 15 s). The first attempt is never cut short: a legitimately slow answer still arrives.
HEDGE_AFTER = 2.0
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


def retry_decision(*, failure: str | None, status: int | None, idempotent: bool, replayable: bool,
                   response_started: bool, retries: int, max_retries: int, time_left: float,
                   connect_failures: int = 0, endpoints: int = 0) -> bool:
    """May this failed attempt be retried on another endpoint? (the retry budget is
    checked afterwards by the caller, so that it is consulted only when it matters)

    failure: "connect" (nothing sent), "reset" (connection lost before any response byte),
    "timeout" (per-try time-out), or None with ``status`` the upstream's 5xx.

    A connect failure reached no upstream: it has its own allowance, ``max_retries`` plus
    one per endpoint (``connect_failures`` counts this one too), so that every endpoint
    gets a chance even when several refuse or time out in a row (a stalled machine drops
    SYNs on full accept queues: each costs a whole connect time-out).
    """
    if response_started or not replayable or time_left <= 0:
        return False
    if failure == "connect":
        return connect_failures <= max_retries + endpoints
    if retries >= max_retries:
        return False
    if failure == "reset":
        return True  # before any response byte: safe for any method (issue #4)
    if failure == "timeout":
        return idempotent
    if failure is None and status in _RETRY_STATUSES:
        return idempotent
    return False


def hedge_decision(*, safe: bool, replayable: bool, response_started: bool, upgrade: bool, hedged: bool,
                   retries: int, max_retries: int, time_left: float) -> bool:
    """May a request still waiting for its response head after ``HEDGE_AFTER`` (the route
    sets no per-try time-out) also be sent to another endpoint? Only safe methods
    (GET/HEAD/OPTIONS/TRACE: two copies running at once harm nothing), once per request,
    with its body complete and replayable, within the attempts and the time left (the
    budget and a free endpoint are checked by the caller)."""
    return (safe and replayable and not response_started and not upgrade and not hedged
            and retries < max_retries and time_left > 0)


def upstream_parts(head: RequestHead) -> tuple[bytes, bytes]:
    """The fixed field lines of the upstream request head, before and after the
    per-request ones. They do not depend on the target (the request line is built per
    request, see the exchange's _upstream_head) or the route."""
    pre: list[bytes] = []
    if head.host_header:
        pre += (b"host: ", head.host_header, CRLF)
    pre += head.fields
    post: list[bytes] = []   # (X-Forwarded-Proto comes with the connection's X-Forwarded-For)
    if head.host_header:
        post += (b"x-forwarded-host: ", head.host_header, CRLF)
    if head.framing == LENGTH:
        post.append(b"content-length: %d\r\n" % head.content_length)
    elif head.framing == CHUNKED:
        post.append(b"transfer-encoding: chunked\r\n")
    if head.upgrade is not None:
        post += (b"connection: upgrade\r\nupgrade: ", head.upgrade, CRLF)
    elif head.te_trailers:
        post.append(b"te: trailers\r\n")
    post.append(CRLF)
    return b"".join(pre), b"".join(post)


def client_head(resp: Any, status: int, head: RequestHead, keep: bool) -> tuple[bytes, int, bool]:
    """The response head for the client, its framing, and whether to close after it."""
    framing = resp.framing
    if framing == LENGTH:
        out = b"content-length: %d\r\n" % resp.content_length
    elif framing == NONE:
        # HEAD and 304 keep the Content-Length the upstream announced
        out = (b"content-length: %d\r\n" % resp.content_length
               if resp.content_length >= 0 and status != 204 and status >= 200 else b"")
    elif head.version == 11:
        framing = CHUNKED
        out = b"transfer-encoding: chunked\r\n"
    else:
        framing = UNTIL_CLOSE
        keep = False
        out = b""
    if status == 101:
        out += b"connection: upgrade\r\nupgrade: " + (resp.upgrade or head.upgrade) + CRLF
    elif not keep:
        out += b"connection: close\r\n"
    elif head.version == 10:
        out += b"connection: keep-alive\r\n"
    return status_line(status) + b"".join(resp.fields) + out + CRLF, framing, not keep


def hash_key(hash_on: tuple[str, Any], head: RequestHead, peer: bytes) -> bytes | None:
    kind, name = hash_on
    if kind == "source_ip":
        return peer
    fields = head.fields
    want = (name.encode("latin-1") if isinstance(name, str) else name).lower()
    if kind == "header":
        for i in range(0, len(fields), 4):
            if fields[i].lower() == want:
                return fields[i + 2]
        return None
    if kind == "cookie":
        for i in range(0, len(fields), 4):
            if fields[i].lower() == b"cookie":
                for part in fields[i + 2].split(b";"):
                    k, eq, v = part.strip().partition(b"=")
                    if eq and k.lower() == want:
                        return v
        return None
    return None


def os_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
