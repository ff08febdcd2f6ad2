"""HTTP/1.1 message heads as the proxy sees them: validation, hop-by-hop filtering and the
bytes it writes. Pure functions over bytes; no sockets here.

Vocabulary
----------
head
    The start line and header fields of a message, as collected from httptools callbacks:
    ``[(name, value), ...]`` in arrival order, names in their original case.
framing
    How the body of a message is delimited: ``NONE`` (no body), ``LENGTH`` (Content-Length),
    ``CHUNKED`` or ``UNTIL_CLOSE`` (a response read until the upstream closes).
generated answer
    A response the proxy writes itself (400, 404, 502, ...): a short plain-text body naming
    what went wrong, never a stack trace, always ``Connection: close`` when the connection
    is not reusable.

Strictness (RFC 9112 §6, RFC 9110 §7.6.1, reference/proxies.md §3.1): llhttp (strict mode)
already rejects CL+TE, duplicate or invalid Content-Length, obs-fold, bare CR/LF, invalid
field names and values and bad chunk sizes; :func:`parse_request_head` adds what it accepts:
Transfer-Encoding other than a final ``chunked`` (400) or with codings besides ``chunked``
(501), Transfer-Encoding in HTTP/1.0, HTTP versions other than 1.0/1.1, a missing (HTTP/1.1),
repeated or invalid Host, an absolute-form target whose authority differs from Host,
fragments in the target, and the header count limit.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

__all__ = [
    "CHUNKED", "LENGTH", "NONE", "UNTIL_CLOSE", "HeadError", "RequestHead", "ResponseHead",
    "chunk_header", "generated", "strip_prefix", "CRLF", "request_head", "response_head", "parse_request_head", "parse_response_head", "status_line",
    "trailer_block", "LAST_CHUNK", "HEAD_END", "remember_raw_request", "remember_raw_response",
    "known_request",
]

NONE, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

# RFC 9110 §7.6.1; "proxy-connection" is the pre-standard alias browsers still send.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"})
# Fields a client may not make us drop by naming them in Connection (RFC 9110 §7.6.1 lets
# a sender nominate any field; honouring these would let a client strip what we add or
# what frames the message).
PROTECTED = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id", b"forwarded",
})
# Fields we set ourselves on the upstream request (the client's values are folded in).
_OURS = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Never valid in a trailer section (RFC 9110 §6.5.1: framing, routing, controls).
_NOT_IN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host", b"trailer", b"content-type", b"content-encoding",
                                 b"authorization", b"set-cookie", b"cache-control", b"expect"}

# RFC 3986 reg-name / IP-literal / port characters, for Host validation.
_HOST_CHARS = bytes(range(256)).translate(
    None, b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]")
_DIGITS = b"0123456789"

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class HeadError(Exception):
    """A request the proxy answers itself: ``status`` and a short reason for the body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("latin-1"))


_STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % code


def generated(status: int, text: str, *, close: bool = True, head: bool = False,
              extra: bytes = b"") -> bytes:
    """A complete response the proxy writes itself: plain text ``text`` + newline."""
    body = text.encode("utf-8", "replace") + b"\n"
    parts = [status_line(status), b"content-type: text/plain; charset=utf-8\r\n",
             b"content-length: %d\r\n" % len(body), extra]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(CRLF)
    if not head:
        parts.append(body)
    return b"".join(parts)


def strip_prefix(target: bytes, prefix: bytes) -> bytes:
    """The target with the route's prefix removed; always starts with "/"."""
    rest = target[len(prefix):] if target.startswith(prefix) else target
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


def chunk_header(n: int) -> bytes:
    return b"%x\r\n" % n


def trailer_block(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    """The end of a chunked body: last chunk, the trailer fields we forward, and CRLF."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in _NOT_IN_TRAILERS:
            parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


# Valid Host values seen, with what _split_host made of them: clients send the same few
# to a proxy, and checking one costs ~0.8 us of Python, a lookup ~0.1 us. Invalid ones
# are never remembered; bounded like the head memos below.
_HOSTS: dict[bytes, bytes] = {}


def _split_host(host: bytes) -> bytes:
    """Lower-case host without port; raises HeadError when it is not a valid authority
    (:func:`_check_host`, memoised)."""
    name = _HOSTS.get(host)
    if name is None:
        name = _check_host(host)
        if len(host) <= 255:
            if len(_HOSTS) >= MEMO_ENTRIES:
                _HOSTS.clear()
            _HOSTS[host] = name
    return name


def _check_host(host: bytes) -> bytes:
    """Lower-case host without port; raises HeadError when it is not a valid authority."""
    if host.translate(None, _HOST_CHARS) != host or b"@" in host:
        raise HeadError(400, "invalid Host header")
    host = host.lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        if end < 0:
            raise HeadError(400, "invalid Host header")
        rest = host[end + 1:]
        if rest and (not rest.startswith(b":") or rest[1:].translate(None, _DIGITS)):
            raise HeadError(400, "invalid Host header")
        return host[:end + 1]
    name, colon, port = host.partition(b":")
    if colon and (port.translate(None, _DIGITS) or b"[" in name or b"]" in name):
        raise HeadError(400, "invalid Host header")
    if b"[" in name or b"]" in name:
        raise HeadError(400, "invalid Host header")
    return name


class RequestHead:
    """A validated request head, ready to be routed and forwarded."""

    __slots__ = ("method", "target", "path", "host", "host_header", "version", "keep_alive", "framing",
                 "content_length", "expect_continue", "upgrade", "fields", "xff", "request_id",
                 "te_trailers", "idempotent", "size", "up_fields", "up_post", "up_line")

    method: bytes
    target: bytes          # origin-form (absolute-form is reduced to its path and query)
    path: bytes            # target without the query, for routing
    host: bytes            # lower-case, port stripped ("" when absent)
    host_header: bytes     # as sent (or the authority of an absolute-form target)
    version: int           # 10 or 11
    keep_alive: bool
    framing: int           # NONE, LENGTH or CHUNKED
    content_length: int
    expect_continue: bool
    upgrade: bytes | None  # the Upgrade value when the client asks to switch protocols
    fields: list[bytes]    # forwardable field lines: b"name: value\r\n" pieces, flattened
    xff: bytes | None      # the client's X-Forwarded-For, if any
    request_id: bytes | None
    te_trailers: bool
    idempotent: bool


IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def parse_request_head(method: bytes, url: bytes, version: str, headers: list[tuple[bytes, bytes]],
                       *, max_headers: int = 100, max_bytes: int = 65536) -> RequestHead:
    """Validate a request head parsed by llhttp and compute what the proxy needs.

    Raises :class:`HeadError` with the status to answer (400, 414, 431, 501, 505).
    """
    if version == "1.1":
        v = 11
    elif version == "1.0":
        v = 10
    else:
        raise HeadError(505, f"HTTP version {version} is not supported")
    if len(headers) > max_headers:
        raise HeadError(431, f"more than {max_headers} header fields")
    if method == b"CONNECT":
        raise HeadError(501, "CONNECT is not supported")

    h = RequestHead()
    h.method = method
    h.version = v
    h.framing = NONE
    h.content_length = -1
    h.expect_continue = False
    h.upgrade = None
    h.xff = None
    h.request_id = None
    h.te_trailers = False
    h.idempotent = method in IDEMPOTENT
    host = None
    te = None
    connection: list[bytes] = []
    fields: list[bytes] = []
    keep_alive_default = v == 11
    size = len(url)
    for name, value in headers:
        size += len(name) + len(value) + 4
        lname = name.lower()
        if lname in _SPECIAL:
            if lname == b"host":
                if host is not None:
                    raise HeadError(400, "more than one Host header")
                host = value
                continue
            if lname == b"content-length":
                h.content_length = int(value)  # llhttp accepted only digits, no duplicates
                h.framing = LENGTH
                continue
            if lname == b"transfer-encoding":
                te = value
                continue
            if lname == b"connection":
                connection += _tokens(value)
                continue
            if lname == b"te":
                if b"trailers" in _tokens(value):
                    h.te_trailers = True
                continue
            if lname == b"upgrade":
                h.upgrade = value
                continue
            if lname == b"expect":
                if value.strip().lower() == b"100-continue" and v == 11:
                    h.expect_continue = True
                    fields += (name, b": ", value, CRLF)
                    continue
                raise HeadError(417, "only Expect: 100-continue is supported")
            if lname == b"x-forwarded-for":
                h.xff = value if h.xff is None else h.xff + b", " + value
                continue
            if lname == b"x-request-id":
                h.request_id = value
            elif lname in _OURS:
                continue  # x-forwarded-proto / -host: we set them
            elif lname in HOP_BY_HOP:
                continue
        fields += (name, b": ", value, CRLF)

    if size > max_bytes:
        raise HeadError(431, "request header section too large")
    if te is not None:
        if v == 10:
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _tokens(te)
        if b"" in codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise HeadError(400, "Transfer-Encoding must end with chunked")
        if len(codings) != 1:
            raise HeadError(501, "transfer codings other than chunked are not supported")
        h.framing = CHUNKED

    if connection:
        if b"close" in connection:
            h.keep_alive = False
        elif b"keep-alive" in connection:
            h.keep_alive = True
        else:
            h.keep_alive = keep_alive_default
        drop = {t for t in connection if t not in PROTECTED}
        if drop - _CONNECTION_OPTIONS:
            fields = _drop_fields(fields, drop)
    else:
        h.keep_alive = keep_alive_default
    if h.upgrade is not None and (b"upgrade" not in connection or v != 11
                                  or h.upgrade.strip().lower() == b"h2c"):
        h.upgrade = None  # an Upgrade not nominated by Connection is not a request to switch

    # Request target: origin-form, absolute-form, or "*" (OPTIONS).
    if b"#" in url:
        raise HeadError(400, "fragment in request target")
    if url[:1] == b"/":
        target = url
    elif url == b"*" and method == b"OPTIONS":
        target = url
    else:
        lower = url[:8].lower()
        if lower.startswith(b"http://"):
            rest = url[7:]
        elif lower.startswith(b"https://"):
            rest = url[8:]
        else:
            raise HeadError(400, "invalid request target")
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(x for x in (slash, query, len(rest)) if x >= 0)
        authority, target = rest[:cut], rest[cut:]
        if not target.startswith(b"/"):
            target = b"/" + target
        if host is not None and _split_host(host) != _split_host(authority):
            raise HeadError(400, "Host header does not match the request target")
        host = authority
    if host is None:
        if v == 11:
            raise HeadError(400, "missing Host header")
        host = b""
    h.host = _split_host(host) if host else b""
    h.host_header = host
    h.target = target
    q = target.find(b"?")
    h.path = target if q < 0 else target[:q]
    h.fields = fields
    h.size = size
    h.up_fields = h.up_post = h.up_line = None  # see the exchange's _upstream_head
    return h


_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"te", b"upgrade",
                      b"expect", b"x-forwarded-for", b"x-request-id"}) | HOP_BY_HOP | _OURS
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


def _drop_fields(flat: list[bytes], drop: set[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(flat), 4):
        if flat[i].lower() not in drop:
            out += flat[i:i + 4]
    return out


class ResponseHead:
    """What the proxy keeps of an upstream response head."""

    __slots__ = ("status", "fields", "framing", "content_length", "keep_alive", "upgrade", "size", "outs")

    status: int
    fields: list[bytes]     # flattened forwardable field lines (see RequestHead.fields)
    framing: int
    content_length: int
    keep_alive: bool        # the upstream connection may be reused after this response
    upgrade: bytes | None


def parse_response_head(status: int, version: str, headers: list[tuple[bytes, bytes]], *,
                        head_request: bool, max_headers: int = 100, max_bytes: int = 65536) -> ResponseHead:
    """Validate an upstream response head; raises HeadError (answered as 502) when the
    proxy cannot forward it safely."""
    if version != "1.1" and version != "1.0":
        raise HeadError(502, f"upstream answered HTTP/{version}")
    if len(headers) > max_headers:
        raise HeadError(502, "upstream sent too many header fields")
    r = ResponseHead()
    r.status = status
    r.content_length = -1
    r.upgrade = None
    framing = UNTIL_CLOSE
    connection: list[bytes] = []
    fields: list[bytes] = []
    te = None
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection += _tokens(value)
            elif lname == b"transfer-encoding":
                te = value
            elif lname == b"upgrade":
                r.upgrade = value
            continue
        if lname == b"content-length":
            r.content_length = int(value)
            framing = LENGTH
            continue
        fields += (name, b": ", value, CRLF)
    if size > max_bytes:
        raise HeadError(502, "upstream response head too large")
    if te is not None:
        if _tokens(te) != [b"chunked"]:
            raise HeadError(502, "upstream used a transfer coding other than chunked")
        framing = CHUNKED
    if connection:
        drop = {t for t in connection if t not in PROTECTED}
        if drop - _CONNECTION_OPTIONS:
            fields = _drop_fields(fields, drop)
    if version == "1.1":
        r.keep_alive = b"close" not in connection
    else:
        r.keep_alive = b"keep-alive" in connection
    if head_request or status == 204 or status == 304 or status < 200:
        framing = NONE
    elif framing == UNTIL_CLOSE:
        r.keep_alive = False
    r.framing = framing
    r.fields = fields
    r.size = size
    r.outs = {}  # the exchange's client-side heads, by client version << 1 | keep-alive
    return r


# -- head memo ----------------------------------------------------------------------------
#
# Identical heads recur: a client polling one URL, a load balancer's health checks, an
# upstream answering one resource (only Date changes, once a second). Validating one costs
# ~1.5 us of Python; looking it up by its exact bytes ~0.4 us. The key is the parsed
# fields themselves, so a hit is exactly the head that was validated; errors are never
# memoised. Bounded: heads up to MEMO_HEAD_BYTES, MEMO_ENTRIES of each kind, cleared
# whole when full (cheaper than LRU bookkeeping on every hit).
#
# Request heads are keyed without their target: one client sends the same header fields
# to ever new paths and query strings. Only heads with an origin-form target ("/...") are
# remembered; for another origin-form target the remembered head is copied with that
# target (:func:`_with_target`), which is exactly what parse_request_head would return:
# of the target it checks only "#" and, with the header fields, the total size.

MEMO_ENTRIES = 1024
MEMO_HEAD_BYTES = 2048
_REQUESTS: dict[tuple, RequestHead] = {}
_RESPONSES: dict[tuple, ResponseHead] = {}


def request_head(method: bytes, url: bytes, version: str, headers: list[tuple[bytes, bytes]], *,
                 max_headers: int = 100, max_bytes: int = 65536) -> RequestHead:
    """:func:`parse_request_head`, memoised on the exact header fields (the result is
    shared: read-only)."""
    key = (method, version, *headers)
    h = _REQUESTS.get(key)
    if h is not None:
        if h.target == url:
            return h
        if url[:1] == b"/" and b"#" not in url:
            size = h.size - len(h.target) + len(url)
            if size <= max_bytes:
                return _with_target(h, url, size)
    h = parse_request_head(method, url, version, headers, max_headers=max_headers, max_bytes=max_bytes)
    if h.size <= MEMO_HEAD_BYTES and url[:1] == b"/":
        if len(_REQUESTS) >= MEMO_ENTRIES:
            _REQUESTS.clear()
        _REQUESTS[key] = h
    return h


def _with_target(h: RequestHead, target: bytes, size: int) -> RequestHead:
    """A copy of the validated head ``h`` (origin-form) for another origin-form target."""
    c = RequestHead()
    c.method = h.method
    c.target = target
    q = target.find(b"?")
    c.path = target if q < 0 else target[:q]
    c.host = h.host
    c.host_header = h.host_header
    c.version = h.version
    c.keep_alive = h.keep_alive
    c.framing = h.framing
    c.content_length = h.content_length
    c.expect_continue = h.expect_continue
    c.upgrade = h.upgrade
    c.fields = h.fields
    c.xff = h.xff
    c.request_id = h.request_id
    c.te_trailers = h.te_trailers
    c.idempotent = h.idempotent
    c.size = size
    c.up_fields = h.up_fields  # the upstream head's field lines do not depend on the
    c.up_post = h.up_post      # target: shared
    c.up_line = None           # (its request line does)
    return c


def response_head(status: int, version: str, headers: list[tuple[bytes, bytes]], head_request: bool) -> ResponseHead:
    """:func:`parse_response_head`, memoised on the exact head (the result is shared)."""
    key = (status, version, head_request, *headers)
    r = _RESPONSES.get(key)
    if r is None:
        r = parse_response_head(status, version, headers, head_request=head_request)
        if r.size <= MEMO_HEAD_BYTES:
            if len(_RESPONSES) >= MEMO_ENTRIES:
                _RESPONSES.clear()
            _RESPONSES[key] = r
    return r


# -- raw-bytes memo (the fast paths) ------------------------------------------------------
#
# One step further: a request or response head that arrives alone in one read (the
# common keep-alive case), and whose exact bytes were already parsed by llhttp and
# validated above, is recognised by those bytes alone, without feeding the parser (its
# ~8 callbacks are most of a request's parsing cost). Only heads that llhttp accepted
# from a message boundary and that validated are remembered, so a hit is exactly a head
# that passed every check; only the cases the fast paths handle are remembered:
# requests that keep the connection alive and switch no protocol, without a body or with
# a Content-Length (used only when the whole body came in the same read);
# responses with a Content-Length to a non-HEAD request, status 200-501 except 204/304.
#
# Requests are also known by their shape: the head's bytes with the target cut out
# (``METHOD SP`` + ``SP HTTP/1.1 CRLF fields``), so one client's requests to ever new paths
# and query strings skip the parser too. A new target is taken only when it is origin-form
# made of characters llhttp accepts in any mode (RFC 3986's unreserved, sub-delims, ":",
# "@", "/", "?" and "%"), within the request-target limit; the head is then the remembered
# one copied with that target, as :func:`request_head` makes it after a parse.

_RAW_REQUESTS: dict[bytes, RequestHead] = {}     # heads of requests without a body
_RAW_BODIED: dict[bytes, RequestHead] = {}       # heads of requests with a Content-Length
_SHAPES: dict[bytes, RequestHead] = {}           # request heads by their bytes without the target
_RAW_RESPONSES: dict[bytes, ResponseHead] = {}
HEAD_END = b"\r\n\r\n"
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*").fullmatch


def _shape(raw: bytes) -> tuple[bytes, int, int] | None:
    """``raw`` without its request target, and where the target starts and ends."""
    sp1 = raw.find(b" ")
    if sp1 < 1:
        return None
    sp2 = raw.find(b" ", sp1 + 1)
    if sp2 < 0:
        return None
    return raw[:sp1 + 1] + raw[sp2:], sp1 + 1, sp2


def _store(memo: dict, key: bytes, value: Any) -> None:
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


def remember_raw_request(raw: bytes, h: RequestHead) -> None:
    if (h.keep_alive and h.upgrade is None and not h.expect_continue and len(raw) <= MEMO_HEAD_BYTES
            and (h.framing == NONE or h.framing == LENGTH)):
        _store(_RAW_REQUESTS if h.framing == NONE else _RAW_BODIED, raw, h)
        shape = _shape(raw)
        if shape is not None and raw[shape[1]:shape[2]] == h.target and _PLAIN_TARGET(h.target):
            _store(_SHAPES, shape[0], h)


def known_request(raw: bytes, body_len: int, max_url: int, max_bytes: int) -> RequestHead | None:
    """The head of a whole request whose head bytes are ``raw`` (ending in CRLF CRLF),
    followed by ``body_len`` bytes in the same read, if it is known without parsing (see
    above): the same bytes, or the same shape with another plain target, seen before;
    and its framing says the request ends exactly there. ``None``: parse it."""
    h = _RAW_BODIED.get(raw)
    if h is None:
        sp1 = raw.find(b" ")   # (_shape, inlined)
        sp2 = raw.find(b" ", sp1 + 1)
        if sp1 < 1 or sp2 < 0:
            return None
        t = _SHAPES.get(raw[:sp1 + 1] + raw[sp2:])
        if t is None:
            return None
        target = raw[sp1 + 1:sp2]
        size = t.size - len(t.target) + len(target)
        if len(target) > max_url or size > max_bytes or _PLAIN_TARGET(target) is None:
            return None
        # Not remembered by its bytes: a new target each time would only churn that memo.
        h = _with_target(t, target, size)
    if (body_len == 0 and h.framing == NONE) or (h.framing == LENGTH and h.content_length == body_len):
        return h
    return None


def remember_raw_response(raw: bytes, r: ResponseHead) -> None:
    status = r.status
    if (r.framing == LENGTH and 200 <= status < 502 and status != 204 and status != 304
            and len(raw) <= MEMO_HEAD_BYTES and raw[9:12] == b"%d" % status):
        if len(_RAW_RESPONSES) >= MEMO_ENTRIES:
            _RAW_RESPONSES.clear()
        _RAW_RESPONSES[raw] = r
