#!/usr/bin/env python3
"""The floor: a minimal uvloop + asyncio.Protocol + httptools proxy, as the performance
anchors' "(e) raw proxy" (reference/performance.md): LIFO pool of keep-alive upstream
connections, one request in flight per client connection, hop-by-hop headers stripped,
Content-Length recomputed, no time-outs, limits, validation, retries or streaming.
Not meshlet: the bench runs it beside meshlet to show what the same syscalls cost with
almost no Python work per request.

Usage: rawproxy.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
       b"content-length"}
UP_PORT = int(sys.argv[2])
POOL: list[Upstream] = []


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, t) -> None:  # type: ignore[no-untyped-def]
        self.t = t

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        if self in POOL:
            POOL.remove(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        client, self.client = self.client, None
        client.t.write(b"HTTP/1.1 %d OK\r\n%scontent-length: %d\r\n\r\n%s" % (
            self.parser.get_status_code(), b"".join(self.headers), len(body), body))
        POOL.append(self)
        client.done()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[bytes] = []
        self.busy = False

    def connection_made(self, t) -> None:  # type: ignore[no-untyped-def]
        self.t = t

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        req = b"%s %s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n%s" % (
            self.parser.get_method(), self.url, b"".join(self.headers), len(body), body)
        self.queue.append(req)
        if not self.busy:
            self.next()

    def next(self) -> None:
        if not self.queue:
            return
        self.busy = True
        req = self.queue.pop(0)
        if POOL:
            up = POOL.pop()
            up.client = self
            up.t.write(req)
        else:
            asyncio.ensure_future(self.connect(req))

    async def connect(self, req: bytes) -> None:
        t, up = await asyncio.get_running_loop().create_connection(Upstream, "127.0.0.1", UP_PORT)
        up.client = self
        t.write(req)

    def done(self) -> None:
        self.busy = False
        self.next()


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print(f"ready {{\"http\": [\"127.0.0.1:{server.sockets[0].getsockname()[1]}\"]}}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
