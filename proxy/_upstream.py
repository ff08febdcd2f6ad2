"""Upstream side: one keep-alive HTTP/1.1 connection per in-flight request, pooled per endpoint.

Vocabulary
----------
UpstreamConnection
    An ``asyncio.Protocol`` speaking HTTP/1.1 to one endpoint, parsing responses with
    httptools. While it carries a request it belongs to that request's exchange (``owner``);
    while idle it sits in its :class:`Pool`. Parser callbacks only record and forward; the
    completion of a response is acted on after ``feed_data`` returns, so a connection is
    never handed to the next request while its parser is still running.
Pool
    The idle connections of one endpoint (address, port), most recently used last (LIFO:
    the warmest connection is reused first and the coldest ones age out). Bounded in size;
    connections idle longer than the idle time-out, closed by the server, or that received
    unsolicited bytes are dropped.

Ownership: a connection is either idle in its pool (``owner is None``), owned by exactly one
exchange, or a tunnel after an Upgrade (never pooled again). Errors never escape into the
event loop: parse errors and resets are reported to the owner, which answers the client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ._decisions import os_error
from ._framing import _RAW_RESPONSES, HEAD_END, remember_raw_response

if TYPE_CHECKING:  # pragma: no cover
    from ._exchange import Exchange

__all__ = ["Pool", "UpstreamConnection", "MAX_RESPONSE_HEAD"]

log = logging.getLogger("meshlet.proxy.upstream")

MAX_RESPONSE_HEAD = 64 * 1024  # bytes of an upstream response head before it is refused (502)


class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint; see the module docstring for ownership."""

    __slots__ = ("pool", "transport", "parser", "owner", "headers", "trailers", "in_body", "final_done",
                 "head_len", "uses", "idle_since", "reading_paused", "poisoned", "tunnel", "head_request",
                 "closed", "eof", "in_head", "version")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.owner: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.in_body = False          # the head of the current final response was seen
        self.final_done = False       # the current final response is complete
        self.head_len = 0
        self.uses = 0                 # requests carried, including the current one
        self.idle_since = 0.0
        self.reading_paused = False
        self.poisoned = False         # must not be reused (stray bytes, bad framing, ...)
        self.tunnel: Any = None       # the client connection after a successful Upgrade
        self.head_request = False     # the current request is HEAD: the response has no body
        self.closed = False
        self.eof = False
        self.in_head = False
        self.version: str | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.opened += 1
        self.pool.gauge.value += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.opened -= 1
        self.pool.gauge.value -= 1
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.tunnel_closed()
            return
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(self, exc)
        else:
            self.pool.forget(self)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.eof = True
            return self.tunnel.tunnel_eof()  # True: the other direction stays open (half-close)
        return None  # close; connection_lost reports to the owner

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_write(data)
            return
        owner = self.owner
        if owner is None:
            # Bytes while idle: the server answered nothing we asked; never reuse it.
            self.close()
            return
        raw = None
        if not self.in_body:
            if self.in_head:
                # More bytes of a head begun in an earlier read (the read in which a head
                # starts is measured exactly by parse_response_head, which knows the sizes).
                self.head_len += len(data)
                if self.head_len > MAX_RESPONSE_HEAD:
                    self.poisoned = True
                    owner.upstream_failed(self, "protocol", "upstream response head too large")
                    owner.client.flush()
                    return
            else:
                i = data.find(HEAD_END) + 4
                if i > 4 and not self.head_request:
                    # A head seen before, with its whole body in this read, needs no
                    # parsing (see _framing's raw-bytes memo).
                    raw = data[:i]
                    resp = _RAW_RESPONSES.get(raw)
                    if (resp is not None and len(data) - i == resp.content_length
                            and owner.fast_response(self, resp, data, i)):
                        return
                self.in_head = True  # this read starts a head
        else:
            owner.last_io = self.pool.loop.time()  # a body streams: the idle clock restarts
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.owner is owner and owner.response_upgraded(self):
                rest = data[exc.args[0]:]
                if rest:
                    self.tunnel.tunnel_write(rest)  # type: ignore[union-attr]
            else:
                self.close()
            owner.client.flush()
            return
        except HttpParserError as exc:
            self.poisoned = True
            if self.owner is not owner:
                self.close()
                return
            if not self.final_done:
                owner.upstream_failed(self, "protocol", _parse_error(exc))
                owner.client.flush()
                return
            # The response was complete before the bad bytes: deliver it, then close.
        if self.final_done and self.owner is owner:
            self.final_done = False
            self.in_body = False
            if self.head_request:
                # llhttp cannot be told that a HEAD response has no body: start afresh.
                self.parser = HttpResponseParser(self)
            elif raw is not None and owner.resp is not None and owner.status == owner.resp.status:
                remember_raw_response(raw, owner.resp)
            owner.response_complete(self)
        owner.client.flush()

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.client.pause(2)  # PAUSE_UPSTREAM: the request body outruns the upstream
        elif self.tunnel is not None:
            self.tunnel.pause(2)

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.client.resume(2)
        elif self.tunnel is not None:
            self.tunnel.resume(2)

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))
        else:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # (No on_message_begin callback: one Python call less per response. Heads are
        # delimited here instead: the header list is handed over and replaced.)
        headers = self.headers
        self.headers = []
        if self.final_done:
            # A second response to one request: the stream is out of step (response
            # splitting). Stop here; the connection is closed, never reused.
            self.poisoned = True
            raise _Stray()
        owner = self.owner
        if owner is None:
            return
        self.in_head = False
        self.head_len = 0
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            owner.response_interim(self, status, headers)
            return
        self.in_body = True
        self.trailers = None
        version = self.version
        if version is None:  # a server does not change HTTP versions within a connection
            version = self.version = self.parser.get_http_version()
        owner.response_head(self, status, version, headers)
        if self.head_request and self.owner is owner:
            self.final_done = True

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.final_done:
            if owner.state == 3 and owner.out_framing != 2:  # RESPONDING, not re-chunked: the fast path
                owner.client.out.append(body)
                owner.bytes_out += len(body)
            else:
                owner.response_body(body)

    def on_message_complete(self) -> None:
        if self.in_body:
            self.final_done = True

    # -- use by the pool and the exchange ------------------------------------------------

    def start(self, owner: Exchange, head_request: bool) -> None:
        self.owner = owner
        self.uses += 1
        self.in_head = False
        self.head_len = 0
        self.in_body = False
        self.final_done = False
        self.head_request = head_request

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.owner = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        self.owner = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
            self.pool.forget(self)


class _Stray(Exception):
    pass


def _parse_error(exc: HttpParserError) -> str:
    ctx = exc.__context__
    if isinstance(ctx, _Stray):
        return "upstream sent more than one response"
    return f"invalid upstream response: {exc}"


class _Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Pool:
    """Idle keep-alive connections to one endpoint; see the module docstring."""

    __slots__ = ("address", "port", "idle", "max_idle", "idle_timeout", "retired", "opened", "gauge", "loop",
                 "connecting", "tls", "tls_logged")

    def __init__(self, address: str, port: int, *, max_idle: int = 1024, idle_timeout: float = 30.0,
                 gauge: Any = None, loop: asyncio.AbstractEventLoop | None = None, tls: Any = None) -> None:
        self.address = address
        self.port = port
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.retired = False
        self.opened = 0  # connections open (idle or busy)
        self.connecting = 0
        self.gauge = gauge if gauge is not None else _Gauge()
        self.loop = loop or asyncio.get_running_loop()
        self.tls = tls                  # proxy._tls.UpstreamTls: connect with TLS, verified
        self.tls_logged = 0.0           # when a TLS failure was last logged (at most every 10 s)

    def __repr__(self) -> str:
        return f"<Pool {self.address}:{self.port} open={self.opened} idle={len(self.idle)}>"

    def acquire(self) -> UpstreamConnection | None:
        """The most recently used idle connection still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Take back a connection whose response is complete, or close it."""
        conn.owner = None
        if (conn.poisoned or conn.closed or self.retired or len(self.idle) >= self.max_idle
                or conn.transport.is_closing()):  # type: ignore[union-attr]
            conn.close()
            return
        if conn.reading_paused:
            conn.resume_reading()  # an idle connection must see the server's FIN
        conn.idle_since = now
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def expire(self, now: float) -> None:
        """Close connections idle longer than the idle time-out (oldest first)."""
        idle = self.idle
        limit = now - self.idle_timeout
        while idle and idle[0].idle_since <= limit:
            idle.pop(0).close()

    def retire(self) -> None:
        """The endpoint left the table: close idle connections now, busy ones on release."""
        self.retired = True
        while self.idle:
            self.idle.pop().close()

    def connect(self, done: Callable[[asyncio.Task], None]) -> asyncio.Task:
        """Open a new connection; ``done(task)`` runs when it finishes (any outcome).
        A task per new connection is fine: pooled reuse, the fast path, needs none."""
        self.connecting += 1
        tls = self.tls
        if tls is None:
            opening = self.loop.create_connection(lambda: UpstreamConnection(self), self.address, self.port)
        else:  # (the connect time-out, armed by the exchange, covers the handshake too)
            opening = self.loop.create_connection(lambda: UpstreamConnection(self), self.address, self.port,
                                                  ssl=tls.context, server_hostname=tls.server_name)
        task = self.loop.create_task(opening)
        task.add_done_callback(self._connected)
        task.add_done_callback(done)
        return task

    def _connected(self, task: asyncio.Task) -> None:
        self.connecting -= 1
        if self.tls is not None and not task.cancelled():
            exc = task.exception()
            if isinstance(exc, ssl.SSLError):
                now = self.loop.time()
                if now - self.tls_logged >= 10.0 or not self.tls_logged:
                    self.tls_logged = now
                    log.error("TLS to %s:%d (service %s, server name %s, CA file %s) failed: %s",
                              self.address, self.port, self.tls.name, self.tls.server_name,
                              self.tls.settings.ca_file, os_error(exc))
