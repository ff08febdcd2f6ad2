#!/usr/bin/env python3
"""A small keep-alive HTTP app for bench/rollout (stdlib asyncio): fast enough for 1,000 requests/s.

config/examples/apps/hello.py (http.server) writes head and body in two sends, so with
Nagle on its side and delayed ACKs on the client's, each keep-alive request can wait
~40 ms: a few hundred requests/s is its ceiling on one machine. This app answers every
request with one write.

    GET /         200 "<GREETING or hello> from <MESHLET_INSTANCE> v<VERSION>\\n"
    GET /healthz  200 "ok\\n"

Environment: PORT (required), HOST (default 127.0.0.1), VERSION, GREETING, MESHLET_INSTANCE.
SIGTERM/SIGINT: stop listening, answer what has arrived, close each connection after its
current response (``Connection: close``) or at once when idle, exit 0 when all are closed
(at most 5 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

BODY = (f"{os.environ.get('GREETING', 'hello')} from {os.environ.get('MESHLET_INSTANCE', os.getpid())} "
        f"v{os.environ.get('VERSION', '0')}\n").encode()
OK = b"ok\n"


def response(body: bytes, close: bool) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), b"Connection: close\r\n" if close else b"")) + body


class Http(asyncio.Protocol):
    def __init__(self, app: App) -> None:
        self.app, self.buf, self.transport = app, b"", None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.conns.discard(self)
        if self.app.stopping and not self.app.conns:
            self.app.done.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]   # GETs only: no bodies
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            close = self.app.stopping or b"connection: close" in head.lower()
            self.transport.write(response(OK if path == b"/healthz" else BODY, close))  # type: ignore[union-attr]
            if close:
                self.transport.close()  # type: ignore[union-attr]
                return

    def idle_close(self) -> None:
        if not self.buf:
            self.transport.close()  # type: ignore[union-attr]


class App:
    def __init__(self) -> None:
        self.conns: set[Http] = set()
        self.stopping = False
        self.done = asyncio.Event()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Http(self), os.environ.get("HOST", "127.0.0.1"),
                                          int(os.environ["PORT"]), backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"listening on {server.sockets[0].getsockname()}", file=sys.stderr, flush=True)
        await stop.wait()
        self.stopping = True
        server.close()
        for c in list(self.conns):
            c.idle_close()
        if self.conns:
            try:
                await asyncio.wait_for(self.done.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(App().serve()))
