"""Client side: one ``asyncio.Protocol`` per client connection, parsed with httptools.

State, by lifetime:

* per connection: transport, peer address, the parser, the active exchange and the queue
  of pipelined ones, the output buffer, flow-control flags, the deadline the server's
  sweep checks;
* per request being parsed: URL pieces, header list, trailers, head byte count.

Pipelining: every request is parsed as it arrives and queued; only the first is forwarded
(one upstream connection per client connection at a time), so responses leave in order.
While a request waits in the queue, reading stops (the kernel's buffer and TCP flow
control hold the rest).

Backpressure: the client's reading is paused for *reasons* (bit flags; it resumes only
when none is left): the upstream's write buffer is full, a pipelined request waits, or the
request body exceeds the replay buffer while no upstream connection takes it yet. The
client's own write buffer going over its high-water mark pauses reading from the upstream.

Output: bytes for the client are gathered in ``out`` while an event is handled and written
with one call at its end (:meth:`flush`), so a response head and a small body leave in one
system call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from ._exchange import Exchange
from ._framing import (_RAW_REQUESTS, CRLF, HEAD_END, MEMO_HEAD_BYTES, NONE, HeadError, generated, known_request,
                       remember_raw_request, request_head)

if TYPE_CHECKING:  # pragma: no cover
    from ._server import ProxyServer
    from ._upstream import UpstreamConnection

__all__ = ["ClientConnection", "PAUSE_PIPELINE", "PAUSE_UPSTREAM", "PAUSE_CONNECT", "PAUSE_UPGRADE"]

log = logging.getLogger("meshlet.proxy.http")

PAUSE_PIPELINE = 1   # a pipelined request waits for the one before it
PAUSE_UPSTREAM = 2   # the upstream's write buffer is full
PAUSE_CONNECT = 4    # request body beyond the replay buffer, no upstream connection yet
PAUSE_UPGRADE = 8    # an Upgrade request waits for the upstream's answer
INF = float("inf")
PROTO_HTTP = b"x-forwarded-proto: http\r\n"
PROTO_HTTPS = b"x-forwarded-proto: https\r\n"


class _Rejection:
    """A request answered by the proxy because its head was invalid: queued like an
    exchange so that it answers in order, then the connection closes."""

    __slots__ = ("client", "status", "reason", "t0", "state")

    def __init__(self, client: ClientConnection, status: int, reason: str) -> None:
        self.client, self.status, self.reason, self.t0, self.state = client, status, reason, 0.0, 0

    def start(self) -> None:
        client = self.client
        client.server.metrics.request_done("-", self.status, 0.0)
        client.send(generated(self.status, self.reason))
        client.exchange_done(self, True, False, None)

    def on_deadline(self, now: float) -> None:
        pass

    def request_body(self, data: bytes) -> None:
        pass

    def request_complete(self, trailers: Any) -> None:
        pass

    def client_gone(self) -> None:
        pass


class ClientConnection(asyncio.Protocol):
    """One client connection on an entry listener (``vip is None``) or a VIP listener."""

    __slots__ = ("server", "vip", "loop", "transport", "peer_ip", "parser", "url", "headers", "trailers",
                 "in_head", "head_len", "reading", "active", "queue", "out", "pause_flags", "write_paused",
                 "deadline", "last_io", "draining", "closed", "tunnel", "upgrade_rest", "dead", "eof", "feeding", "flushes", "xff_line", "last",
                 "hold", "xff_tail", "proto_line")

    def __init__(self, server: ProxyServer, vip: tuple[str, int] | None = None, https: bool = False) -> None:
        self.server = server
        self.vip = vip
        self.proto_line = PROTO_HTTPS if https else PROTO_HTTP  # (a TLS listener's connections: https)
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer_ip = b""
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.in_head = False
        self.head_len = 0
        self.reading: Any = None          # the exchange whose message is being parsed
        self.active: Any = None           # the exchange being answered
        self.queue: deque | None = None   # pipelined exchanges waiting their turn
        self.out: list[bytes] = []
        self.pause_flags = 0
        self.write_paused = False
        self.deadline = INF
        self.last_io = 0.0
        self.draining = False
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_rest = b""
        self.dead = False                 # the parser failed; nothing more is read
        self.eof = False                  # the client half-closed its side of a tunnel
        self.feeding = False              # inside parser.feed_data (upstream writes are gathered)
        self.flushes = 0                  # writes so far (an exchange knows if its head left)
        self.xff_line = b""               # "x-forwarded-for: <peer>" + proto_line, for requests without one
        self.xff_tail = b""               # ", <peer>" + proto_line, after a request's own X-Forwarded-For
        self.last: Any = None             # the exchange whose head was parsed last
        self.hold = False                 # a small response is gathered whole before it leaves

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections or server.draining:
            self.closed = True
            transport.write(generated(503, "proxy connection limit reached"))  # type: ignore[attr-defined]
            transport.close()
            return
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0].encode("ascii")
        # X-Forwarded-Proto rides with X-Forwarded-For (per connection) rather than with
        # the memoised head's fixed lines, which requests on plain and TLS listeners share.
        self.xff_tail = b", " + self.peer_ip + CRLF + self.proto_line
        self.xff_line = b"x-forwarded-for: " + self.peer_ip + CRLF + self.proto_line
        self.last_io = now = self.loop.time()
        self.deadline = now + server.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        active = self.active
        if active is not None:
            self.active = None
            active.client_gone()
        self.queue = None
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.tunnel = None
            tunnel.close()

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.eof = True
            if tunnel.eof or not tunnel.transport.can_write_eof():  # type: ignore[union-attr]
                return None  # both directions finished: close (connection_lost closes the tunnel)
            tunnel.transport.write_eof()  # type: ignore[union-attr]
            return True
        # EOF from the client while a request is in flight means it went away (nginx's
        # default; TCP cannot tell a half-close from a close): the transport closes and
        # connection_lost abandons the exchange, so the upstream stops working for nobody.
        return None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.transport.write(data)  # type: ignore[union-attr]
            return
        if self.dead:
            return
        self.last_io = now = self.loop.time()
        raw = None
        if not self.in_head and self.active is None and self.reading is None:
            # At a message boundary with nothing in flight: a head seen before, alone in
            # this read, needs no parsing (see _framing's raw-bytes memo).
            head = _RAW_REQUESTS.get(data)
            if head is not None:
                ex = Exchange(self, head)
                ex.req_done = True
                self.last = self.active = ex
                ex.start(now)
                if self.out:
                    self.flush()
                return
            end = data.find(HEAD_END) + 4
            if 3 < end <= MEMO_HEAD_BYTES:
                # A whole request in this read, known by its head's bytes or their shape
                # (another target): no parsing. Else it is remembered below if it parses,
                # validates and is all there is in this read.
                raw = data[:end] if end < len(data) else data
                server = self.server
                head = known_request(raw, len(data) - end, server.max_url, server.max_head_bytes)
                if head is not None:
                    ex = Exchange(self, head)
                    ex.req_done = True
                    if end < len(data):
                        ex.body = [data[end:]]
                        ex.body_len = len(data) - end
                    self.last = self.active = ex
                    ex.start(now)
                    if self.out:
                        self.flush()
                    return
        elif self.in_head:
            self.head_len += len(data)
            if self.head_len > self.server.max_head_bytes:
                self.reject(431 if self.headers else 414,
                            "request header section too large" if self.headers else "request line too long")
                self.flush()
                return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            last = self.last
            if last is not None and last.head.upgrade is not None:
                self.upgrade_rest = data[exc.args[0]:]
                self.pause(PAUSE_UPGRADE)
            else:
                # llhttp switched for an upgrade we do not honour (h2c): answer, then close.
                self.dead = True
                if not self.closed:
                    self.transport.pause_reading()
        except HttpParserError as exc:
            self.feeding = False
            self.parse_failed(exc)
        self.feeding = False
        active = self.active
        if active is not None:
            if active.up_out:
                active.flush_upstream()
            if raw is not None and active is self.last and self.reading is None and not self.dead:
                head = getattr(active, "head", None)  # (a _Rejection has none)
                if head is not None:
                    remember_raw_request(raw, head)
        if self.out:  # (a request forwarded upstream usually leaves nothing for the client yet)
            self.flush()

    def pause_writing(self) -> None:
        self.write_paused = True
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.pause_reading()
            return
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.resume_reading()
            return
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.resume_reading()

    # -- httptools callbacks -----------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        # The first piece of a request target starts a head (no on_message_begin callback:
        # one Python call less per request; the header list is replaced when handed over).
        if self.in_head:
            url = self.url = self.url + url
        else:
            self.url = url
            self.in_head = True
            self.head_len = 0
            self.trailers = None
            if self.active is None:
                self.deadline = self.last_io + self.server.header_timeout
        if len(url) > self.server.max_url:
            raise HeadError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name, value))
        else:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        headers = self.headers
        self.headers = []
        parser = self.parser
        server = self.server
        head = request_head(parser.get_method(), self.url, parser.get_http_version(), headers,
                            max_headers=server.max_headers, max_bytes=server.max_head_bytes)
        ex = Exchange(self, head)
        if head.framing == NONE:
            ex.req_done = True  # no body: the message is complete with its head
        self.reading = self.last = ex
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        reading = self.reading
        if reading is not None:
            reading.request_body(body)

    def on_message_complete(self) -> None:
        reading = self.reading
        if reading is not None:
            self.reading = None
            if not reading.req_done or self.trailers is not None:  # else the head said it all
                reading.request_complete(self.trailers)

    # -- errors --------------------------------------------------------------------------

    def parse_failed(self, exc: HttpParserError) -> None:
        ctx = exc.__context__
        if isinstance(ctx, HeadError):
            status, reason = ctx.status, ctx.reason
        elif ctx is not None and not isinstance(ctx, HttpParserError):
            log.error("internal error while handling a request", exc_info=ctx)
            status, reason = 500, "internal proxy error"
        else:
            status, reason = 400, f"malformed request: {exc}"
        self.reject(status, reason)

    def reject(self, status: int, reason: str) -> None:
        """Answer an invalid request (in its turn) and close; nothing of it is forwarded."""
        self.dead = True
        self.in_head = False
        if not self.closed:
            self.transport.pause_reading()
        reading, self.reading = self.reading, None
        if reading is not None and reading is self.active:
            # Broken framing in the body of the request being forwarded.
            reading.request_broken(status, reason)
            return
        rejection = _Rejection(self, status, reason)
        queue = self.queue
        if queue and reading is not None and queue[-1] is reading:
            queue[-1] = rejection
        elif self.active is None:
            self.active = rejection
            rejection.start()
            return
        else:
            if queue is None:
                queue = self.queue = deque()
            queue.append(rejection)

    # -- used by exchanges ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.out.append(data)

    def send_chunk(self, data: bytes) -> None:
        self.out += (b"%x\r\n" % len(data), data, CRLF)

    def flush(self) -> None:
        out = self.out
        if out and not self.hold:
            self.out = []
            self.flushes += 1
            if self.closed:
                return
            if len(out) == 1:
                self.transport.write(out[0])
            elif len(out) < 8:
                self.transport.write(b"".join(out))  # small pieces: one copy beats an iovec each
            else:
                self.transport.writelines(out)

    def pause(self, reason: int) -> None:
        if not self.pause_flags and not self.closed:
            self.transport.pause_reading()
        self.pause_flags |= reason

    def resume(self, reason: int) -> None:
        flags = self.pause_flags
        if flags & reason:
            self.pause_flags = flags = flags & ~reason
            if not flags and not self.closed and not self.dead:
                self.transport.resume_reading()

    def exchange_done(self, ex: Any, close: bool, abort: bool, tunnel: UpstreamConnection | None,
                      now: float = 0.0) -> None:
        """``ex`` answered (or gave up): go on with the next request, idle, or close."""
        if ex is not self.active:
            return
        self.active = None
        if self.closed:
            return
        if tunnel is not None:
            self.start_tunnel(tunnel)
            return
        if close or self.draining or ((self.eof or self.dead) and not self.queue):
            self.flush()
            self.closed = True
            self.server.connections.discard(self)
            self.transport.close()
            return
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            if not queue:
                self.resume(PAUSE_PIPELINE)
            self.active = nxt
            nxt.start()
            return
        self.deadline = (self.last_io + self.server.header_timeout if self.in_head
                         else (now or self.loop.time()) + self.server.client_idle_timeout)

    def on_deadline(self, now: float) -> None:
        active = self.active
        if active is not None:
            active.on_deadline(now)
            self.flush()
            return
        if self.tunnel is not None:
            self.deadline = INF
            return
        if self.in_head:
            self.reject(408, "timed out reading the request head")
            self.flush()
            return
        # Idle keep-alive connection.
        self.shutdown_now()

    # -- tunnel (after 101 Switching Protocols) -------------------------------------------

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.tunnel = conn
        conn.tunnel = self
        conn.owner = None
        self.deadline = INF
        self.flush()
        rest, self.upgrade_rest = self.upgrade_rest, b""
        if rest:
            conn.transport.write(rest)  # type: ignore[union-attr]
        if self.write_paused:
            conn.pause_reading()
        self.pause_flags = PAUSE_UPGRADE
        self.resume(PAUSE_UPGRADE)

    def tunnel_write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def tunnel_eof(self) -> bool | None:
        """The upstream finished sending: pass the EOF on; close when both sides are done."""
        if self.closed or self.eof or not self.transport.can_write_eof():
            return None
        self.transport.write_eof()
        return True

    def tunnel_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.discard(self)
            self.transport.close()

    # -- shutdown ------------------------------------------------------------------------

    def describe(self) -> str:
        """One line for logs: what this connection is doing."""
        peer = self.peer_ip.decode("ascii", "replace")
        if self.tunnel is not None:
            return f"client {peer}: upgraded tunnel"
        active = self.active
        if active is not None:
            head = getattr(active, "head", None)
            what = f"{head.method.decode()} {head.target[:80].decode('latin-1')}" if head is not None else "rejection"
            return f"client {peer}: {what} (state {getattr(active, 'state', '?')}, service {getattr(active, 'service', '-')})"
        return f"client {peer}: {'reading a request head' if self.in_head else 'idle'}"

    def shutdown(self) -> None:
        """Drain: close now if idle, else after the current response."""
        self.draining = True
        if self.active is None and not self.in_head and self.tunnel is None:
            self.shutdown_now()

    def shutdown_now(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.discard(self)
            out, self.out = self.out, []
            if out:
                self.transport.writelines(out)
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered (drain deadline passed)."""
        if self.active is not None:
            active, self.active = self.active, None
            active.client_gone()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.tunnel = None
            tunnel.abort()
        self.closed = True
        self.server.connections.discard(self)
        self.transport.abort()
