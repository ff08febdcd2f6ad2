#!/usr/bin/env python3
"""A client's view of a new connection while wrk loads the proxy: one connection at a time,
each timed from connect to the last byte of its response (with TLS: handshake included).

wrk's latency starts when the request is written, after the connection (and handshake) is
up, so with ``--new-conns`` it leaves out the part a proxy may make a client wait longest
for. run.py runs this beside wrk with ``--new-conns`` and reports both. At most ``RATE``
connections a second, so the probe's own CPU (a Python TLS client) stays out of the figures
it sits beside.

Usage: probe.py PORT HOST PATH SECONDS [--tls]   (prints one JSON line: n, p50_ms, p99_ms)
The bench's certificate is a throwaway self-signed one on loopback: not verified.
"""

from __future__ import annotations

import json
import socket
import ssl
import statistics
import sys
import time

RATE = 20   # probe connections per second, at most


def main() -> int:
    port, host, path, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    ctx = None
    if "--tls" in sys.argv[5:]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    times: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < end:
        time.sleep(max(0.0, next_at - time.monotonic()))   # pacing (see RATE), not a wait for a condition
        next_at += 1 / RATE
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s = ctx.wrap_socket(raw) if ctx is not None else raw
                s.sendall(request)
                got = b""
                while True:   # Connection: close, so the response ends at EOF
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            if not got.startswith(b"HTTP/1.1 200"):
                errors += 1
                continue
        except OSError:
            errors += 1
            continue
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    out = {"n": len(times), "errors": errors,
           "p50_ms": statistics.median(times) if times else None,
           "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
