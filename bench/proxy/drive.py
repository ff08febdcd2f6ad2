#!/usr/bin/env python3
"""The proxy's per-request Python cost, without sockets: its real objects driven in-process.

A ClientConnection and a pooled UpstreamConnection get fake transports; each iteration
feeds one keep-alive GET (what wrk sends) to the client side and one 200 response (what
the bench's nginx answers) to the upstream side, and checks that the response left for
the client. No system calls, no event-loop turns: what remains is the proxy's own Python
work per request (parsing callbacks, routing, balancing, heads, metrics), the part that
bench/proxy/run.py cannot separate from the kernel's.

    .venv/bin/python bench/proxy/drive.py [-n 200000] [--profile] [--unique] [--unique-cookie]

``--profile`` prints cProfile's top functions by own time (cProfile adds its own
overhead per call, so read the shares, not the absolute times); ``--unique`` makes every
request target different (no raw-bytes memo hits); ``--unique-cookie`` also gives every
request a different Cookie value (no head memo hits at all: every head is validated).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from discovery.view import Instance, ServiceView, View  # noqa: E402
from proxy._http1 import ClientConnection  # noqa: E402
from proxy._metrics import Metrics  # noqa: E402
from proxy._routes import build_table  # noqa: E402
from proxy._server import ProxyServer  # noqa: E402
from proxy._upstream import UpstreamConnection  # noqa: E402

REQUEST = (b"GET %s HTTP/1.1\r\nHost: bench.service.meshlet\r\n\r\n")
REQUEST_COOKIE = (b"GET %s HTTP/1.1\r\nHost: bench.service.meshlet\r\nCookie: s=%d\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 15:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 99 + b"\n")


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += 1

    def writelines(self, data: list[bytes]) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True


async def run(n: int, profile: bool, unique: bool, cookie: bool = False) -> None:
    view = View(services={"bench": ServiceView("bench", (
        Instance("bench-0", "bench", "n1", "127.0.0.1", 18001),), spec=None)}, index=1)
    metrics = Metrics()
    server = ProxyServer(metrics)
    server.set_table(build_table(view, metrics=metrics))
    cluster = server.table.cluster("bench")
    ep = cluster.endpoints[0]
    pool = server.pool_for(ep, cluster)
    up = UpstreamConnection(pool)
    up_t = FakeTransport(("127.0.0.1", 18001))
    up.connection_made(up_t)
    pool.idle.append(up)
    client = ClientConnection(server)
    client_t = FakeTransport()
    client.connection_made(client_t)
    if cookie:
        requests = [REQUEST_COOKIE % (b"/?n=%d" % i, i) for i in range(n)]
    else:
        requests = [REQUEST % (b"/?n=%d" % i if unique else b"/") for i in range(n)]

    def loop() -> None:
        for req in requests:
            client.data_received(req)
            up.data_received(RESPONSE)

    loop_once = requests[:1000]
    for req in loop_once:  # warm the memos
        client.data_received(req)
        up.data_received(RESPONSE)
    assert client_t.written == up_t.written == 1000, (client_t.written, up_t.written)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        loop()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    t0 = time.perf_counter()
    loop()
    dt = time.perf_counter() - t0
    assert client_t.written == n + 1000
    print(f"{n} requests: {dt / n * 1e6:.2f} us per request (in-process, no sockets)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--unique", action="store_true")
    ap.add_argument("--unique-cookie", action="store_true")
    args = ap.parse_args()
    import uvloop
    uvloop.run(run(args.n, args.profile, args.unique, args.unique_cookie))
    return 0


if __name__ == "__main__":
    sys.exit(main())
