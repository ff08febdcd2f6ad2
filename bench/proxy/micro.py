#!/usr/bin/env python3
"""The Python cost of one proxied request, without the kernel: meshlet's and rawproxy's
protocol objects driven in-process with transports that only record what they are given.

The wrk run (run.py) measures user and kernel CPU together, and both proxies make the same
system calls per request (one read and one write per side: ``strace -c -p PID``), so the
difference between them is the Python work measured here. Use it to find and check a
saving before the wrk run confirms it.

Usage: .venv/bin/python bench/proxy/micro.py [--requests 200000] [--profile] [--target meshlet|raw|both]
       [--workload get|unique|post-1k]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from discovery.view import Instance, ServiceView, View  # noqa: E402

REQ = (b"GET / HTTP/1.1\r\nHost: bench.service.meshlet\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
# run.py's workloads, as wrk sends them: the same GET, a unique target per request (wrk.format
# with only a Host header), a POST of 1 KiB arriving with its head
POST_1K = (b"POST / HTTP/1.1\r\nHost: bench.service.meshlet\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: 1024\r\n\r\n" + b"x" * 1024)


def requests(workload: str, n: int) -> list[bytes]:
    if workload == "unique":
        return [b"GET /?n=%d HTTP/1.1\r\nHost: bench.service.meshlet\r\n\r\n" % i for i in range(n)]
    return [POST_1K if workload == "post-1k" else REQ] * n
RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 06:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)


class Sink:
    """A transport that keeps the last thing written to it."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("closed")


def meshlet_loop(n: int) -> tuple[float, cProfile.Profile | None, bool]:
    from proxy._http1 import ClientConnection
    from proxy._metrics import Metrics
    from proxy._routes import build_table
    from proxy._server import ProxyServer
    from proxy._upstream import UpstreamConnection

    async def run() -> tuple[float, cProfile.Profile | None]:
        server = ProxyServer(Metrics())
        view = View(services={"bench": ServiceView("bench", (
            Instance("bench-1", "bench", "n1", "127.0.0.1", 18001, ports={}),))})
        server.set_table(build_table(view))
        cluster = server.table.cluster("bench")
        pool = server.pool_for(cluster.endpoints[0], cluster)
        up_t = Sink()
        conn = UpstreamConnection(pool)
        conn.connection_made(up_t)
        pool.idle.append(conn)
        client = ClientConnection(server)
        cl_t = Sink()
        client.connection_made(cl_t)

        def many(reqs: list[bytes]) -> None:
            for req in reqs:
                client.data_received(req)
                conn.data_received(RESP)

        return _measure(many, cl_t, n)

    dt, prof = uvloop.run(run())
    return dt, prof, True


def raw_loop(n: int) -> tuple[float, cProfile.Profile | None, bool]:
    sys.argv[1:] = ["0", "18001"]
    sys.path.insert(0, str(ROOT / "bench" / "proxy"))
    import rawproxy

    client = rawproxy.Client()
    cl_t = Sink()
    client.connection_made(cl_t)
    up = rawproxy.Upstream()
    up_t = Sink()
    up.connection_made(up_t)
    rawproxy.POOL.append(up)

    def many(reqs: list[bytes]) -> None:
        for req in reqs:
            client.data_received(req)
            up.data_received(RESP)

    dt, prof = _measure(many, cl_t, n)
    return dt, prof, True


def _measure(many: Callable[[list[bytes]], None], cl_t: Sink, n: int) -> tuple[float, cProfile.Profile | None]:
    """Warm up and check the answers (1,000 requests), time ``n``, and with --profile
    profile a quarter as many."""
    many(requests(ARGS.workload, 1000))
    assert cl_t.last.endswith(b"x" * 100) and cl_t.writes == 1000, cl_t.last
    reqs = requests(ARGS.workload, n)
    t0 = time.perf_counter()
    many(reqs)
    dt = time.perf_counter() - t0
    prof = None
    if ARGS.profile:
        prof = cProfile.Profile()
        prof.enable()
        many(reqs[: n // 4])
        prof.disable()
    return dt, prof


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--workload", default="get", choices=["get", "unique", "post-1k"])
    ap.add_argument("--target", default="both", choices=["meshlet", "raw", "both"])
    ARGS = ap.parse_args()
    results = {}
    for name, fn in (("meshlet", meshlet_loop), ("raw", raw_loop)):
        if ARGS.target not in (name, "both"):
            continue
        best = float("inf")
        for _ in range(ARGS.rounds):
            dt, prof, _ = fn(ARGS.requests)
            best = min(best, dt)
        results[name] = best / ARGS.requests * 1e6
        print(f"{name}: {results[name]:.2f} µs of Python per request (best of {ARGS.rounds})")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if len(results) == 2:
        print(f"meshlet - raw: {results['meshlet'] - results['raw']:.2f} µs")
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())
