"""The catalog's HTTP/1.1 server: one asyncio Protocol per connection, httptools parsing.

Why not aiohttp here: with 1,000 watchers on one service, a commit must answer 1,000
blocked queries. Under aiohttp each answer is a coroutine resumed, a Response object
built, its headers serialised and written through a StreamWriter, and the profile of
that fan-out showed that machinery, not the catalog's own work (the body was already
cached), taking the time. Here a blocked query holds no coroutine at all: it is a
:class:`_watch.Waiter` parked in the hub, and a commit writes one shared ``bytes`` object
(status line, headers and body, encoded once per query and index) to every parked
connection it wakes.

Vocabulary
----------
Request
    One parsed request: method, path (percent-decoded, as aiohttp gave it), query
    (a MultiDict), headers (lower-cased names), body (bytes, at most ``MAX_BODY``).
Reply
    What a handler answers: status, body, content type, headers. ``encode()`` gives the
    bytes on the wire; equal replies can share them.
Connection
    Requests are answered in order, one at a time (pipelined ones wait in a queue and the
    socket stops being read past ``MAX_QUEUED``). A handler runs as a task; its result is a
    Reply, a ``Blocking`` (handed to the hub: answered now or parked) or a ``Streaming``
    (``/v1/agent/monitor``: chunked until the client goes away).

Errors: a malformed request, or a request line and headers over ``MAX_HEAD``, gets 400
and the connection is closed; a body over ``MAX_BODY`` gets 413 as soon as it passes the
limit (the rest is not read) and the connection is closed. A client going away cancels its
running handler (writes are shielded by the store, so a received write still happens)
and takes its parked query out of the hub.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qsl, unquote

import httptools
from multidict import MultiDict, MultiDictProxy

if TYPE_CHECKING:
    from ._watch import Waiter

__all__ = ["Request", "Reply", "Streaming", "Connection", "HttpServer", "MAX_BODY"]

log = logging.getLogger("discovery.catalog.http")

MAX_BODY = 8 * 1024 * 1024  # above every endpoint's own limit (4 MiB JSON, 512 KiB KV value)
MAX_QUEUED = 16  # pipelined requests held before the socket stops being read
MAX_HEAD = 64 * 1024  # request line + headers; aiohttp's limits were 8 KiB per line and field
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class _Date:
    """The ``Date`` header, rebuilt at most once a second."""

    second = -1
    value = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = formatdate(now, usegmt=True).encode()
        return cls.value


class Reply:
    """A complete answer. ``encode()`` is memoised: a reply shared by many watchers is
    encoded once."""

    __slots__ = ("status", "body", "content_type", "headers", "_wire")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self._wire: bytes | None = None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def encode(self) -> bytes:
        wire = self._wire
        if wire is None:
            parts = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (self.status, _REASONS.get(self.status, b"Unknown"), _Date.get())]
            if self.content_type:
                ctype = self.content_type
                if ctype.startswith("text/") and "charset" not in ctype:
                    ctype += "; charset=utf-8"
                parts.append(b"Content-Type: %s\r\n" % ctype.encode("latin-1"))
            if self.headers:
                for name, value in self.headers.items():
                    parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
            parts.append(b"Content-Length: %d\r\n\r\n" % len(self.body))
            parts.append(self.body)
            wire = self._wire = b"".join(parts)
        return wire


class Streaming:
    """A streamed (chunked) answer: ``produce(write)`` runs until the client goes away;
    ``write(text)`` sends one chunk."""

    __slots__ = ("produce", "content_type")

    def __init__(self, produce: Callable[[Callable[[str], None]], Awaitable[None]],
                 content_type: str = "text/plain") -> None:
        self.produce = produce
        self.content_type = content_type


class Request:
    __slots__ = ("method", "raw_path", "raw_query", "headers", "body", "keep_alive", "_query", "_path")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.method = method
        path, _, query = url.partition(b"?")
        self.raw_path = path.decode("latin-1")
        self.raw_query = query.split(b"#", 1)[0].decode("latin-1")
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self._query: MultiDictProxy[str] | None = None
        self._path: str | None = None

    @property
    def path(self) -> str:
        """The percent-decoded path, as aiohttp gives it (``%2F`` and ``%2e%2e`` decoded)."""
        if self._path is None:
            raw = self.raw_path
            self._path = unquote(raw) if "%" in raw else raw
        return self._path

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            pairs = parse_qsl(self.raw_query, keep_blank_values=True) if self.raw_query else ()
            self._query = MultiDictProxy(MultiDict(pairs))
        return self._query


class Connection(asyncio.Protocol):
    """One client connection; see the module docstring. State is per connection except
    ``_url``/``_headers``/``_body`` (per request being parsed)."""

    def __init__(self, server: "HttpServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.busy = False  # a request is being answered (task, parked query or stream)
        self.closing = False
        self.task: asyncio.Task | None = None
        self.waiter: "Waiter | None" = None
        self.keep_alive = True
        self.streaming = False  # answering with a stream (monitor): it ends only when the client goes
        self._reading_paused = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._head_len = 0

    # -- transport events ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.waiter is not None:
            self.server.hub.cancel(self.waiter)
            self.waiter = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "Bad Request: protocol upgrade is not supported")
        except httptools.HttpParserError as exc:
            if self._body_len > MAX_BODY:
                self._fail(413, f"Request body too large, max size: {MAX_BODY} bytes")
            else:
                self._fail(400, f"Bad Request: {exc}")

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_len = 0
        self._head_len = 0

    def _grow_head(self, n: int) -> None:
        self._head_len += n
        if self._head_len > MAX_HEAD:
            raise httptools.HttpParserError(f"request head over {MAX_HEAD} bytes")

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value))
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > MAX_BODY:  # refused at once: the rest is never read
            raise httptools.HttpParserError(f"body over {MAX_BODY} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # refused with 400 when the parser raises HttpParserUpgrade right after
        req = Request(self.parser.get_method().decode("latin-1"), self._url, self._headers, b"".join(self._body),
                      self.parser.should_keep_alive())
        self.queue.append(req)
        if len(self.queue) > MAX_QUEUED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if not self.busy:
            self._next()

    # -- answering -----------------------------------------------------------------------
    def _next(self) -> None:
        while self.queue and not self.busy and not self.closing:
            req = self.queue.popleft()
            if self._reading_paused and len(self.queue) <= MAX_QUEUED // 2 and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self.keep_alive = req.keep_alive
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        try:
            result = await self.server.app(req)
            if self.closing:
                return
            if isinstance(result, Reply):
                self.send(result.encode())
            elif isinstance(result, Streaming):
                await self._stream(result)
            else:  # a blocking query: answered now, or parked in the hub until a commit
                await self.server.hub.start(self, result)
        except asyncio.CancelledError:
            raise
        except Exception:  # the app maps every error to a reply; this is a bug
            log.exception("%s %s failed", req.method, req.raw_path)
            if not self.closing:
                self.send(Reply(500, b"Internal error", "text/plain").encode())
        finally:
            self.task = None

    def send(self, wire: bytes) -> None:
        """Write one whole answer and move on to the next request."""
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.write(wire)
        self.busy = False
        if not self.keep_alive:
            self.closing = True
            transport.close()
            return
        if self.queue:
            self._next()

    async def _stream(self, streaming: Streaming) -> None:
        transport = self.transport
        assert transport is not None
        self.streaming = True
        transport.write(b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                        % (_Date.get(), streaming.content_type.encode()))

        def write(text: str) -> None:
            data = text.encode("utf-8", "replace")
            if data and not self.closing:
                transport.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            await streaming.produce(write)
        finally:
            if not self.closing:
                transport.write(b"0\r\n\r\n")
                self.busy = False
                self.keep_alive = False
                self.closing = True
                transport.close()

    def _fail(self, status: int, reason: str) -> None:
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.transport.write(Reply(status, reason.encode(), "text/plain").encode())
        self.transport.close()


class HttpServer:
    """Listens and owns the connections. ``app(request)`` answers one request."""

    def __init__(self, app: Callable[[Request], Awaitable[Any]], hub: Any) -> None:
        self.app = app
        self.hub = hub
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str | None, port: int, tls: Any = None) -> tuple[str, int]:
        """Listen on ``host:port`` (HTTPS with ``tls``, an ssl.SSLContext)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, reuse_address=True,
                                                backlog=1024, ssl=tls)
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, let running handlers finish (up to ``timeout``), close every
        connection (what was written is flushed first)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):  # streams never finish by themselves
            if conn.streaming and conn.task is not None:
                conn.task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.task is not None for c in self.connections):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
