"""Open-loop HTTP load with every request's outcome kept: for benches that compare windows.

    load = OpenLoad("127.0.0.1:8080", host="web.service.meshlet", rate=1000, connections=16)
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    ...                       # mark times with time.monotonic()
    stop.set(); await task
    load.window(t0, t1)       # the requests *scheduled* in [t0, t1)

Requests go out on a fixed schedule (request i at start + i/rate), whether or not earlier
ones have answered, over at most ``connections`` keep-alive connections (aiohttp pool;
a request finding them all busy waits for one). Latency is measured from the *scheduled*
time, so a stall shows in the latency of every request it held up (no coordinated
omission). A request fails when it gets no 200 within ``timeout``; failures keep their
reason (``HTTP 503``, ``ServerDisconnectedError``, ...) and the start of the answer.

Failures are counted into ``sink`` (default: the OpenLoad itself), any object with
``sent``, ``failed``, ``reasons`` and ``details`` (bench/heal passes its ``Run``, so its
counts are live while it kills replicas); ``outcomes`` always holds every request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["Outcome", "OpenLoad", "percentile"]


@dataclass(frozen=True, slots=True)
class Outcome:
    scheduled: float            # monotonic time the request was due
    latency: float              # seconds from ``scheduled`` to the end of the answer (or the failure)
    error: str | None = None    # None: 200 read in full


@dataclass
class OpenLoad:
    target: str                                 # host:port of the proxy's entry listener
    host: str                                   # Host header
    rate: float                                 # requests per second
    connections: int = 16
    timeout: float = 5.0
    path: str = "/"
    sink: Any = None                            # where sent/failed/reasons/details go; None: self
    outcomes: list[Outcome] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    details: list[tuple[float, float, str, str]] = field(default_factory=list)  # (due, failed at, reason, text)
    sent: int = 0
    failed: int = 0
    started: float = 0.0

    def window(self, t0: float, t1: float) -> list[Outcome]:
        return [o for o in self.outcomes if t0 <= o.scheduled < t1]

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set, then wait for the requests still out."""
        sink = self if self.sink is None else self.sink
        conn = aiohttp.TCPConnector(limit=self.connections)
        url, headers = f"http://{self.target}{self.path}", {"Host": self.host}
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            pending: set[asyncio.Task[None]] = set()

            async def one(due: float) -> None:
                error = text = None
                try:
                    async with session.get(url, headers=headers) as r:
                        body = await r.read()
                        if r.status != 200:
                            error, text = f"HTTP {r.status}", body[:300].decode("utf-8", "replace").strip()
                except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                    error, text = type(exc).__name__, str(exc)[:300]
                end = time.monotonic()
                self.outcomes.append(Outcome(due, end - due, error))
                if error is not None:
                    sink.failed += 1
                    sink.reasons[error] = sink.reasons.get(error, 0) + 1
                    sink.details.append((due, end, error, text or ""))

            self.started = start = time.monotonic()
            i = 0
            while not stop.is_set():
                due = start + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(due))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sink.sent += 1
                i += 1
            if pending:
                await asyncio.gather(*pending)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))] if q > 0 else s[0]
