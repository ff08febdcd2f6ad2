"""The proxy's listening sockets, accepted by the proxy itself rather than by the loop.

Why not ``loop.create_server``: under load uvloop's server left some newly accepted
connections unserved for seconds (bench/proxy, 256 connections fetching 1 MiB each: a
few sockets held by the proxy, the request unread, nothing sent since the accept, and
wrk counting ~140 requests over its 2 s time-out per 10 s; rawproxy, also on
``create_server``, the same). Accepting here and handing each socket to
``loop.connect_accepted_socket`` served every one of them (0 over the time-out, p99
278-347 ms instead of 832-894 ms). The same loop accepts the entry listeners and the
virtual-IP listeners (HTTP and TCP).

A TLS listener also looks at a connection's first byte before TLS. A TLS client opens
with a handshake record (first byte 0x16): the socket goes on to TLS
(``connect_accepted_socket(..., ssl=...)``) and its protocol (a ClientConnection). A client that
speaks plain HTTP to the TLS port (``http://`` where ``https://`` was meant) gets what
nginx and Go's servers answer, a plain-text 400 saying so, instead of a closed
connection that looks like a network fault; anything else is closed. The byte is peeked
(``MSG_PEEK``) before any transport exists (uvloop's transports read a connection's first
bytes before the protocol can pause them), so the TLS layer reads the ClientHello itself.
A client that sends nothing is closed after the request head time-out, as the handshake
time-out would. After the 400 the rest of what the client sent is read and dropped, and
only then is the socket closed (after a FIN, within ``LINGER`` seconds): closing with
unread bytes would send a reset that can destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import TYPE_CHECKING, Callable

from ._framing import generated

if TYPE_CHECKING:  # pragma: no cover
    from ._server import ProxyServer
    from ._tls import TlsListener

__all__ = ["Listener", "PLAIN_HTTP_TO_TLS"]

log = logging.getLogger("meshlet.proxy")

TLS_HANDSHAKE = 0x16   # the content type of a TLS handshake record (RFC 8446 5.1)
PLAIN_HTTP_TO_TLS = "plain HTTP was sent to the TLS (https) port: use https://"
BACKLOG = 4096
ACCEPT_BATCH = 128     # accepts per readiness callback, so one listener cannot starve the loop
LINGER = 2.0           # seconds to read and drop a plain-HTTP client's bytes after the 400
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """The listening sockets of one listener (the part of ``asyncio.Server`` the proxy
    uses: ``sockets`` and ``close``). ``factory`` makes each connection's protocol; with
    ``tls`` it runs over TLS, after the first-byte check."""

    def __init__(self, server: ProxyServer, factory: Callable[[], asyncio.Protocol], tls: TlsListener | None,
                 socks: list[socket.socket]) -> None:
        self.server = server
        self.factory = factory
        self.tls = tls
        self.sockets = socks
        self.pending: set[_FirstByte] = set()
        self.tasks: set[asyncio.Task] = set()   # connections being set up (the loop keeps weak references)
        self.closed = False
        for s in socks:
            server.loop.add_reader(s.fileno(), self._accept, s)

    @classmethod
    async def open(cls, server: ProxyServer, host: str, port: int, factory: Callable[[], asyncio.Protocol], *,
                   tls: TlsListener | None = None, reuse_port: bool = False) -> Listener:
        """Bind ``host:port`` as ``loop.create_server`` would (every address the name resolves
        to; the same error text when one cannot be bound)."""
        infos = await server.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _name, addr in dict.fromkeys(infos):
                s = socket.socket(family, kind, proto)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind(addr)
                except OSError as exc:
                    raise OSError(exc.errno, f"error while attempting to bind on address {addr!r}: "
                                             f"{(exc.strerror or str(exc)).lower()}") from None
                s.listen(BACKLOG)
                s.setblocking(False)
        except BaseException:
            for s in socks:
                s.close()
            raise
        return cls(server, factory, tls, socks)

    def close(self) -> None:
        """Stop accepting; connections still before their first byte are closed."""
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        for s in self.sockets:
            loop.remove_reader(s.fileno())
            s.close()
        for p in list(self.pending):
            p.close()

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # As asyncio does: stop accepting for a second rather than spin on it.
                    log.error("listener: cannot accept (%s); pausing accepts for 1 s", exc.strerror or exc)
                    loop = self.server.loop
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(1.0, self._resume_accept, lsock)
                else:
                    log.warning("listener: accept failed: %s", exc.strerror or exc)
                return
            conn.setblocking(False)
            if self.tls is None:
                self.serve(conn)
            else:
                self.pending.add(_FirstByte(self, conn))

    def _resume_accept(self, lsock: socket.socket) -> None:
        if not self.closed:
            self.server.loop.add_reader(lsock.fileno(), self._accept, lsock)

    def serve(self, conn: socket.socket) -> None:
        """Hand an accepted socket to the loop (with TLS: its handshake first)."""
        task = self.server.loop.create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        server = self.server
        try:
            if self.tls is None:
                await server.loop.connect_accepted_socket(self.factory, conn)
            else:
                await server.loop.connect_accepted_socket(self.factory, conn, ssl=self.tls.context,
                                                          ssl_handshake_timeout=server.header_timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            # A failed handshake (no shared version or cipher, a client that gave up, the
            # time-out) or a client gone before it was served: the client was told by the
            # TLS alert, if any; nothing to log.
            log.debug("connection not served: %s", exc)
            conn.close()


class _FirstByte:
    """One accepted connection until its first byte is seen (then TLS, a 400, or closed)."""

    __slots__ = ("entry", "sock", "timer", "lingering")

    def __init__(self, entry: Listener, sock: socket.socket) -> None:
        self.entry = entry
        self.sock = sock
        self.lingering = False
        loop = entry.server.loop
        loop.add_reader(sock.fileno(), self._readable)
        self.timer: asyncio.TimerHandle | None = loop.call_later(entry.server.header_timeout, self.close)

    def _release(self) -> None:
        """Stop watching the socket (which stays open)."""
        self.entry.pending.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.entry.server.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._release()
            self.sock.close()

    def _readable(self) -> None:
        sock = self.sock
        if self.lingering:
            self._drop_input()
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        if not first:
            self.close()
        elif first[0] == TLS_HANDSHAKE:
            self._release()
            self.entry.serve(sock)
        elif 0x41 <= first[0] <= 0x5A:  # "A".."Z": a request line's method, so plain HTTP
            self.entry.server.metrics.request_done("-", 400, 0.0)
            try:
                sock.send(generated(400, PLAIN_HTTP_TO_TLS))   # (small: fits the empty send buffer)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
                return
            self.lingering = True
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.entry.server.loop.call_later(LINGER, self.close)
            self._drop_input()
        else:
            self.close()

    def _drop_input(self) -> None:
        """Read and drop what the client sends until it closes (or LINGER passes)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
