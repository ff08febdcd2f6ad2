"""Layer 4: a TCP connection to a service VIP spliced to one ready endpoint.

One :class:`TcpConnection` per client connection; it reads nothing until an upstream
connection is established (connect failures are retried on other endpoints, within the
service's retry attempts), then copies bytes both ways with backpressure (a full write
buffer on one side pauses reading on the other) and half-closes (EOF is passed on with
``write_eof``). The connection closes after ``timeouts.idle`` without a byte either way,
or when the drain deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ._server import ProxyServer

__all__ = ["TcpConnection"]

log = logging.getLogger("meshlet.proxy.tcp")
INF = float("inf")


class _Upstream(asyncio.Protocol):
    __slots__ = ("peer", "transport", "closed")

    def __init__(self, peer: TcpConnection) -> None:
        self.peer = peer
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer.server.metrics.upstream_connections.value += 1

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        peer.last_io = peer.loop.time()
        if not peer.closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if not peer.closed and peer.transport.can_write_eof():
            peer.transport.write_eof()
        peer.up_eof = True
        if peer.down_eof:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.peer.server.metrics.upstream_connections.value -= 1
        self.peer.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.closed:
            self.peer.transport.resume_reading()


class TcpConnection(asyncio.Protocol):
    """A client connection on a TCP VIP listener; see the module docstring."""

    __slots__ = ("server", "key", "loop", "transport", "cluster", "ep", "up", "task", "tried", "t0", "deadline",
                 "last_io", "closed", "up_eof", "down_eof", "draining", "peer_ip", "retries", "pending", "rtt", "early")

    def __init__(self, server: ProxyServer, key: tuple[str, int]) -> None:
        self.server = server
        self.key = key
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.cluster: Any = None
        self.ep: Any = None
        self.up: _Upstream | None = None
        self.task: asyncio.Task | None = None
        self.tried: set[str] = set()
        self.t0 = 0.0
        self.deadline = INF
        self.last_io = 0.0
        self.closed = False
        self.up_eof = False
        self.down_eof = False
        self.draining = False
        self.peer_ip = b""
        self.retries = 0
        self.pending = False
        self.rtt = 0.0
        self.early: list[bytes] = []  # bytes read before the upstream connection exists

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections or server.draining:
            self.closed = True
            transport.close()
            return
        server.connections.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0].encode("ascii")
        self.t0 = self.last_io = self.loop.time()
        table = server.table
        cluster = table.vip_listeners.get(self.key) if table is not None else None
        if cluster is None:
            self.close()
            return
        self.cluster = cluster
        if not cluster.try_acquire_pending():
            log.warning("tcp %s: too many pending connections; refusing one", cluster.name)
            self.close()
            return
        self.pending = True
        self._connect()

    def _connect(self) -> None:
        cluster = self.cluster
        key = self.peer_ip if cluster.settings.hash_on is not None else None
        ep = cluster.pick(key, self.tried) if self.tried else cluster.pick(key)
        if ep is None:
            log.info("tcp %s: no ready instance for %s", cluster.name, self.peer_ip.decode())
            self.close()
            return
        cluster.begin(ep)
        self.ep = ep
        self.t0 = now = self.loop.time()
        self.deadline = now + cluster.settings.timeouts.connect
        self.task = self.loop.create_task(self.loop.create_connection(lambda: _Upstream(self), ep.address, ep.port))
        self.task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task is not self.task:
            if not task.cancelled() and task.exception() is None:
                task.result()[0].close()
            return
        self.task = None
        if self.closed:
            if not task.cancelled() and task.exception() is None:
                task.result()[0].close()
            return
        if task.cancelled() or task.exception() is not None:
            self._connect_failed(str(task.exception() or "time-out"))
            return
        self.up = up = task.result()[1]
        if self.early:
            early, self.early = self.early, []
            up.transport.writelines(early)
        if self.down_eof and up.transport.can_write_eof():
            up.transport.write_eof()
        if self.pending:
            self.pending = False
            self.cluster.release_pending()
        self.last_io = self.loop.time()
        self.rtt = self.last_io - self.t0
        self.deadline = self.last_io + self.cluster.settings.timeouts.idle
        self.transport.resume_reading()

    def _connect_failed(self, why: str) -> None:
        cluster, ep = self.cluster, self.ep
        now = self.loop.time()
        cluster.end(ep, status=None, failure="connect", latency=now - self.t0)
        self.ep = None
        self.tried.add(ep.id)
        log.info("tcp %s: connect to %s:%d failed: %s", cluster.name, ep.address, ep.port, why)
        if self.retries < cluster.settings.retries.attempts and cluster.retry_allowed():
            self.retries += 1
            self.server.metrics.retry(cluster.name)
            self._connect()
            return
        self.close()

    # -- client side ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        up = self.up
        if up is not None:
            if not up.closed:
                up.transport.write(data)
            return
        # uvloop may deliver a first read although reading was paused in connection_made.
        self.early.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.down_eof = True
        up = self.up
        if up is not None and not up.closed and up.transport.can_write_eof():
            up.transport.write_eof()
        return not self.up_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._release()
        up = self.up
        if up is not None and not up.closed:
            up.transport.close()

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and not up.closed:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and not up.closed:
            up.transport.resume_reading()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.close()

    def _release(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
        if self.pending:
            self.pending = False
            self.cluster.release_pending()
        if self.ep is not None:
            ep, self.ep = self.ep, None
            self.cluster.end(ep, status=None, failure=None, latency=self.rtt)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.discard(self)
            self._release()
            self.transport.close()
        up = self.up
        if up is not None and not up.closed:
            up.transport.close()

    # -- time-outs and drain --------------------------------------------------------------

    def on_deadline(self, now: float) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            self._connect_failed("connect time-out")
            return
        if self.cluster is None:
            return
        idle = self.cluster.settings.timeouts.idle
        if now - self.last_io >= idle:
            log.info("tcp %s: idle for %.0fs; closing", self.cluster.name, now - self.last_io)
            self.close()
        else:
            self.deadline = self.last_io + idle

    def describe(self) -> str:
        name = self.cluster.name if self.cluster is not None else "?"
        return f"tcp {self.peer_ip.decode('ascii', 'replace')} -> {name} ({'connected' if self.up else 'connecting'})"

    def shutdown(self) -> None:
        self.draining = True  # TCP has no way to ask the peer to finish: wait for the deadline

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.connections.discard(self)
            self._release()
            self.transport.abort()
        up = self.up
        if up is not None and not up.closed:
            up.transport.abort()
