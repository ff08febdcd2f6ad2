"""Lean load for the catalog bench: raw keep-alive HTTP watchers and a write-CPU probe.

The py-consul watchers of run.py measure what a Python client sees, but their own work
(1,000 aiohttp responses and JSON documents per flip, ~190 ms of CPU on the same 2 cores)
dominates the figure. These watchers only find the end of each response (Content-Length)
and look for the new status in its bytes, so the time they record is the time the catalog
took to *tell* every watcher: the fan-out itself.

* ``bench_lean_watchers``: N raw connections block on ``/v1/health/service/hot``; a TTL
  flip is sent F times; per flip: the time until the last watcher has the answer, from
  the flip sent and from its acknowledgement, and each watcher's own delay.
* ``bench_write_cpu``: the catalog's CPU per TTL flip with no watcher at all (one
  keep-alive connection, flips in sequence): what each write costs the shared cores.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Callable

__all__ = ["bench_lean_watchers", "bench_write_cpu"]

_INDEX = re.compile(rb"\r\nx-consul-index: *(\d+)", re.I)
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
_CRITICAL = b'"Status":"critical"'


class _Watcher(asyncio.Protocol):
    """One keep-alive connection running blocking queries back to back."""

    def __init__(self, fan: "_Fanout", path: bytes) -> None:
        self.fan = fan
        self.path = path
        self.buf = b""
        self.need = -1
        self.head_end = 0
        self.index = 0
        self.status = b""
        self.arrival = 0.0
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connected.set_result(None)

    def ask(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET %s?index=%d&wait=120s HTTP/1.1\r\nHost: bench\r\n\r\n" % (self.path, self.index))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end]
                self.head_end = end + 4
                self.need = self.head_end + int(_LENGTH.search(head).group(1))  # type: ignore[union-attr]
                self.index = int(_INDEX.search(head).group(1))  # type: ignore[union-attr]
            if len(self.buf) < self.need:
                return
            body = self.buf[self.head_end:self.need]
            self.buf = self.buf[self.need:]
            self.need = -1
            status = b"critical" if _CRITICAL in body else b"passing"
            if status != self.status:
                self.status = status
                self.arrival = time.perf_counter()
                self.fan.told(status)
            self.ask()

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self.fan.lost += 1


class _Fanout:
    def __init__(self) -> None:
        self.want = b""
        self.remaining = 0
        self.done = asyncio.Event()
        self.lost = 0

    def told(self, status: bytes) -> None:
        if status == self.want:
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))]


async def _put(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"PUT {path}: {head[:40]!r}")
    m = _LENGTH.search(head)
    if m and int(m.group(1)):
        await reader.readexactly(int(m.group(1)))


async def bench_lean_watchers(
    host: str, port: int, pid: int, n_watchers: int, flips: int, blocked: Callable[[], "asyncio.Future[int]"],
    cpu_seconds: Callable[[int], float], gauges: Callable[[], "asyncio.Future[dict[str, float]]"] | None = None,
) -> dict[str, float]:
    """``hot`` (check ``service:hot-1``) must exist and be passing. See the module docstring.

    ``gauges()``: the catalog's metrics, read after each flip for its own timing of it
    (``last_write_ms``: batch taken -> durable; ``last_fanout_ms``: durable -> every
    woken watcher written to), which leaves out this process's reading of 1,000 sockets."""
    loop = asyncio.get_running_loop()
    fan = _Fanout()
    watchers = []
    for _ in range(n_watchers):
        _, w = await loop.create_connection(lambda: _Watcher(fan, b"/v1/health/service/hot"), host, port)
        watchers.append(w)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        fan.want, fan.remaining = b"passing", n_watchers
        for w in watchers:
            w.ask()  # index 0: the current answer at once, then block with its index
        await asyncio.wait_for(fan.done.wait(), 60)
        cpu0 = cpu_seconds(pid)
        from_sent: list[float] = []
        from_ack: list[float] = []
        each: list[float] = []
        server_write: list[float] = []
        server_fanout: list[float] = []
        for k in range(flips):
            while await blocked() < n_watchers:
                await asyncio.sleep(0.01)
            status = b"critical" if k % 2 == 0 else b"passing"
            fan.want, fan.remaining = status, n_watchers
            fan.done.clear()
            sent = time.perf_counter()
            await _put(reader, writer, "/v1/agent/check/" + ("fail" if status == b"critical" else "pass") + "/service:hot-1")
            acked = time.perf_counter()
            await asyncio.wait_for(fan.done.wait(), 60)
            last = max(w.arrival for w in watchers)
            from_sent.append(last - sent)
            from_ack.append(last - acked)
            each.extend(w.arrival - sent for w in watchers)
            if gauges is not None:
                g = await gauges()
                server_write.append(g["meshlet.catalog.last_write_ms"])
                server_fanout.append(g["meshlet.catalog.last_fanout_ms"])
        cpu = cpu_seconds(pid) - cpu0
    finally:
        writer.close()
        for w in watchers:
            if w.transport is not None:
                w.transport.close()
    ms = 1000.0
    return {
        "sent_p50": statistics.median(from_sent) * ms, "sent_p99": _pct(from_sent, 99) * ms,
        "ack_p50": statistics.median(from_ack) * ms, "ack_p99": _pct(from_ack, 99) * ms,
        "each_p50": statistics.median(each) * ms, "each_p99": _pct(each, 99) * ms,
        "server_cpu_ms": cpu / flips * ms,
        **({"srv_total_p50": statistics.median(a + b for a, b in zip(server_write, server_fanout)),
            "srv_total_p99": _pct([a + b for a, b in zip(server_write, server_fanout)], 99),
            "srv_fanout_p50": statistics.median(server_fanout), "srv_fanout_p99": _pct(server_fanout, 99)}
           if server_fanout else {}),
    }


async def bench_write_cpu(host: str, port: int, pid: int, flips: int,
                          cpu_seconds: Callable[[int], float]) -> dict[str, float]:
    """Catalog CPU per TTL flip of ``service:hot-1``, nobody watching."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _put(reader, writer, "/v1/agent/check/pass/service:hot-1")
        cpu0 = cpu_seconds(pid)
        start = time.perf_counter()
        for k in range(flips):
            await _put(reader, writer, "/v1/agent/check/" + ("fail" if k % 2 == 0 else "pass") + "/service:hot-1")
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0
    finally:
        writer.close()
    return {"cpu_ms": cpu / flips * 1000.0, "rate": flips / elapsed}
