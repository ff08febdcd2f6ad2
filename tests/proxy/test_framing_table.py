"""Strict framing (RFC 9112 §6, reference/proxies.md §3.1) over raw sockets.

Requests: every ambiguous or invalid message gets its exact status, the connection is
closed, and the backend receives nothing. Responses: an upstream answer the proxy cannot
frame safely becomes 502 and that upstream connection is closed.
"""

from __future__ import annotations

import socket
import time

import pytest

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def _until_close(conn: socket.socket, head: bytes, rest: bytes) -> bytes:
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    conn.shutdown(socket.SHUT_WR)
    return rest


TRAILER_BODIES: list[bytes] = []


def _trailers(conn: socket.socket, head: bytes, rest: bytes) -> bytes:
    """Read a chunked request body with its trailer section; answer with trailers."""
    while b"\r\n0\r\n" not in rest or not rest.endswith(b"\r\n\r\n"):
        rest += conn.recv(65536)
    TRAILER_BODIES.append(rest)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                 b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
    return b""


@pytest.fixture(scope="module")
def sink(mesh_catalog, tmp_path_factory, px):
    """A raw upstream recording every byte, registered as a service, and a proxy."""
    upstream = px.RawUpstream({
        b"/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"/dup-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"/bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok",
        b"/te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        b"/obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"/bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"/http2": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"/garbage": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"/huge-head": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"/two": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo"),
        b"/until-close": _until_close,
        b"/trailers": _trailers,
    })
    name = px.unique("sink")
    mesh_catalog.register(name, name + "-0", upstream.port)
    proxy = px.Proxy(mesh_catalog.url, log_path=tmp_path_factory.mktemp("sink") / "proxy.log")
    yield upstream, proxy, f"{name}.service.meshlet"
    proxy.stop()
    mesh_catalog.deregister(name + "-0")
    upstream.close()


H = "{host}"
REQUEST_CASES = [
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 400, id="cl-then-te"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
                 400, id="te-then-cl"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400,
                 id="duplicate-cl-equal"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400,
                 id="duplicate-cl-differ"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 1, 1\r\n\r\nx", 400, id="cl-list"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: -1\r\n\r\nx", 400, id="cl-negative"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: +1\r\n\r\nx", 400, id="cl-plus"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nContent-Length: 99999999999999999999999\r\n\r\nx", 400,
                 id="cl-overflow"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: gzip\r\n\r\nx", 400, id="te-not-chunked"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
                 id="te-unknown-coding"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400,
                 id="te-chunked-twice"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                 f"0\r\n\r\n", 400, id="te-two-lines"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400,
                 id="te-xchunked"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: \r\n\r\n", 400, id="te-empty"),
    pytest.param(f"POST / HTTP/1.0\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
                 id="te-in-http10"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\r\n c\r\n\r\n", 400, id="obs-fold"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\r\n\tc\r\n\r\n", 400, id="obs-fold-tab"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\rc\r\n\r\n", 400, id="bare-cr"),
    pytest.param(f"GET / HTTP/1.1\nHost: {H}\n\n", 400, id="bare-lf"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A : b\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\x00c\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\x01c\r\n\r\n", 400, id="ctl-in-value"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-A b\r\n\r\n", 400, id="no-colon"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\n: b\r\n\r\n", 400, id="empty-name"),
    pytest.param(f"GET / HTTP/1.1\r\n Host: {H}\r\n\r\n", 400, id="space-before-first-field"),
    pytest.param("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, id="missing-host"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nHost: {H}\r\n\r\n", 400, id="two-hosts"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H} x\r\n\r\n", 400, id="invalid-host"),
    pytest.param(f"GET http://other.example/ HTTP/1.1\r\nHost: {H}\r\n\r\n", 400, id="absolute-form-host-mismatch"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400,
                 id="chunk-size-not-hex"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nab\r\n",
                 400, id="chunk-size-overflow"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n", 400,
                 id="chunk-size-negative"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n", 400,
                 id="chunk-size-bare-lf"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nb\r\nab\r\n0\r\n\r\n", 400,
                 id="chunk-ext-bare-lf"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n2;a\rb\r\nab\r\n0\r\n\r\n", 400,
                 id="chunk-ext-bare-cr"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", 400,
                 id="chunk-data-overrun"),
    pytest.param(f"GET / HTTP/2.0\r\nHost: {H}\r\n\r\n", 505, id="http2-version"),
    pytest.param(f"GET / HTTP/1.2\r\nHost: {H}\r\n\r\n", 400, id="http12-version"),
    pytest.param("GET /\r\n\r\n", 505, id="http09"),
    pytest.param(f"G@T / HTTP/1.1\r\nHost: {H}\r\n\r\n", 400, id="invalid-method"),
    pytest.param(f"CONNECT {H}:443 HTTP/1.1\r\nHost: {H}\r\n\r\n", 501, id="connect"),
    pytest.param(f"GET /a#b HTTP/1.1\r\nHost: {H}\r\n\r\n", 400, id="fragment"),
    pytest.param(f"GET /a\x01b HTTP/1.1\r\nHost: {H}\r\n\r\n", 400, id="ctl-in-target"),
    pytest.param(f"GET /{'a' * 9000} HTTP/1.1\r\nHost: {H}\r\n\r\n", 414, id="target-too-long"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\n" + "X-N: 1\r\n" * 101 + "\r\n", 431, id="too-many-fields"),
    pytest.param(f"GET / HTTP/1.1\r\nHost: {H}\r\nX-Big: {'a' * 70000}\r\n\r\n", 431, id="head-too-large"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: {H}\r\nExpect: tea\r\nContent-Length: 1\r\n\r\nx", 417,
                 id="expect-unknown"),
]


@pytest.mark.parametrize("raw, status", REQUEST_CASES)
def test_invalid_request_is_refused_closed_and_not_forwarded(sink, px, raw, status):
    upstream, proxy, host = sink
    before = len(upstream.received)
    with px.RawClient(proxy.http) as c:
        c.send(raw.replace(H, host).encode("latin-1"))
        r = c.response()
        assert r.status == status, r
        assert r.header("connection") == "close"
        assert r.body.endswith(b"\n") and len(r.body) < 300 and b"Traceback" not in r.body
        assert c.is_closed()
    assert len(upstream.received) == before, bytes(upstream.received[before:])


def test_head_too_large_sent_in_pieces_is_431(sink, px):
    upstream, proxy, host = sink
    before = len(upstream.received)
    with px.RawClient(proxy.http) as c:
        c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n".encode())
        try:
            for _ in range(40):
                c.send(b"X-Fill: " + b"a" * 4000 + b"\r\n")
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.response().status == 431
    assert len(upstream.received) == before


def test_valid_request_is_forwarded(sink, px):
    """The control case: the same path forwards a well-formed request."""
    upstream, proxy, host = sink
    before = len(upstream.received)
    with px.RawClient(proxy.http) as c:
        c.send(f"POST /valid HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
               f"2;ext=1\r\nab\r\n0\r\n\r\n".encode())
        r = c.response()
    assert r.status == 200 and r.body == b"ok"
    assert b"POST /valid HTTP/1.1" in bytes(upstream.received[before:])


def test_pipelined_invalid_request_after_valid_one_answers_both_in_order(sink, px):
    upstream, proxy, host = sink
    with px.RawClient(proxy.http) as c:
        c.send(f"GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n"
               f"GET / HTTP/1.1\r\nHost: {host}\r\nX-A: b\r\n c\r\n\r\n".encode())
        assert c.response().status == 200
        assert c.response().status == 400
        assert c.is_closed()


@pytest.mark.parametrize("path", [
    "/cl-te", "/dup-cl", "/bad-cl", "/te-gzip", "/bad-chunk", "/obs-fold", "/bare-lf", "/http2", "/garbage",
    "/huge-head", "/switch",
])
def test_invalid_upstream_response_is_502_and_upstream_connection_closed(sink, px, path):
    upstream, proxy, host = sink
    closed_before = upstream.closed_by_peer
    with px.RawClient(proxy.http) as c:
        c.send(px.get(path, host))
        r = c.response()
    assert r.status == 502, r
    assert host.split(".")[0] in r.body.decode()  # names the service
    px.wait_for(lambda: upstream.closed_by_peer > closed_before, 5, what="upstream connection closed")


def test_second_response_to_one_request_is_never_delivered(sink, px):
    upstream, proxy, host = sink
    closed_before = upstream.closed_by_peer
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/two", host))
        r = c.response()
        assert (r.status, r.body) == (200, b"one")
        px.wait_for(lambda: upstream.closed_by_peer > closed_before, 5, what="upstream connection closed")
        c.send(px.get("/after", host))
        r = c.response()
        assert (r.status, r.body) == (200, b"ok")


def test_response_until_close_is_relayed_chunked(sink, px):
    upstream, proxy, host = sink
    with px.RawClient(proxy.http) as c:
        c.send(px.get("/until-close", host))
        r = c.response()
        assert (r.status, r.header("transfer-encoding"), r.body) == (200, "chunked", b"until close")


def test_trailers_pass_both_ways(sink, px):
    upstream, proxy, host = sink
    with px.RawClient(proxy.http) as c:
        c.send(f"POST /trailers HTTP/1.1\r\nHost: {host}\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
               f"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nAuthorization: x\r\n\r\n".encode())
        r = c.response()
    assert (r.status, r.body, r.trailers) == (200, b"hello", [("X-Sum", "42")])
    assert r.header("trailer") == "X-Sum"
    body = TRAILER_BODIES[-1]
    assert body == b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"  # fields not allowed in trailers are dropped
    head = [h for h in upstream.requests if h.startswith(b"POST /trailers")][-1].lower()
    assert b"te: trailers" in head and b"transfer-encoding: chunked" in head
