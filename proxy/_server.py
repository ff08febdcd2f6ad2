"""The proxy process: listeners, the live route table, upstream pools, time-outs, drain.

Vocabulary
----------
entry listener
    ``--listen HOST:PORT``: HTTP, routed by Host and path prefix (``RouteTable.match``).
VIP listener
    One per ``(vip, vip_port)`` of ``table.vip_listeners``: HTTP (:class:`ClientConnection`
    with ``vip`` set) or TCP (:class:`TcpConnection`) per the cluster's protocol; bound and
    closed as the table changes.
table
    The current :class:`RouteTable`, replaced whole on every catalog change
    (``build_table(view, previous=current)``) and never written. Requests look it up once,
    when they start; a request in flight keeps the cluster it began with.
sweep
    Every ``TICK`` seconds one callback compares each connection's ``deadline`` with the
    clock and calls ``on_deadline`` on those due: header read, keep-alive idle, connect,
    per-try, overall and streaming-idle time-outs all ride on it (and, every second,
    the check of the TLS files: proxy._tls). A per-request
    ``call_later`` handle costs ~1.1 µs to arm and cancel on uvloop (two per request would
    be ~15 % of the request budget at 60k req/s); a float store costs nothing. Time-outs
    therefore fire up to ``TICK`` late.

Lifecycle: ``start()`` loads the first table, binds every listener, then the caller prints
the ready line. ``drain(timeout)`` (SIGTERM) closes the listeners, closes idle
connections, lets busy ones finish their current response with ``Connection: close``,
and aborts whatever is left at the deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import config

from ._http1 import ClientConnection
from ._listen import Listener
from ._tcp import TcpConnection
from ._tls import RELOAD_EVERY
from ._upstream import Pool

if TYPE_CHECKING:  # pragma: no cover
    from ._metrics import Metrics
    from ._routes import RouteTable
    from ._tls import TlsListener, UpstreamTls

__all__ = ["ProxyServer", "Limits", "TICK"]

log = logging.getLogger("meshlet.proxy")

TICK = 0.05  # seconds between deadline sweeps
UPSTREAM_IDLE_MAX = 30.0  # upstream keep-alive connections idle longer than this are closed
TLS_CHECK_TICKS = max(1, round(RELOAD_EVERY / TICK))  # sweeps between checks of the TLS files


class Limits:
    """Per-process limits and client-side time-outs (service time-outs come from the table)."""

    def __init__(self, *, max_connections: int = 10000, max_head_bytes: int = 64 * 1024, max_url: int = 8192,
                 max_headers: int = 100, header_timeout: float = 10.0, client_idle_timeout: float = 60.0,
                 upstream_max_idle: int = 1024) -> None:
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.max_url = max_url
        self.max_headers = max_headers
        self.header_timeout = header_timeout
        self.client_idle_timeout = client_idle_timeout
        self.upstream_max_idle = upstream_max_idle


class ProxyServer:
    """Everything one proxy process serves; see the module docstring."""

    def __init__(self, metrics: Metrics, limits: Limits | None = None, *, reuse_port: bool = False,
                 access_log: bool = False) -> None:
        limits = limits or Limits()
        self.loop = asyncio.get_running_loop()
        self.metrics = metrics
        self.table: RouteTable | None = None
        self.pools: dict[str, Pool] = {}
        # Endpoints that left the table with requests still in flight on them (a rollout's
        # retired replica): listed in /routes as "draining" until those requests end.
        self.leaving: dict[str, tuple[str, Any]] = {}
        self.connections: set[Any] = set()
        self.max_connections = limits.max_connections
        self.max_head_bytes = limits.max_head_bytes
        self.max_url = limits.max_url
        self.max_headers = limits.max_headers
        self.header_timeout = limits.header_timeout
        self.client_idle_timeout = limits.client_idle_timeout
        self.upstream_max_idle = limits.upstream_max_idle
        self.reuse_port = reuse_port
        self.draining = False
        self.access_log: Callable[..., None] | None = self._access_log if access_log else None
        self.rid_prefix = os.urandom(8).hex().encode()  # X-Request-Id: <prefix>-<counter, hex>
        self.rid_line = b"x-request-id: " + self.rid_prefix + b"-"  # (the counter follows)
        self.rid_counter = itertools.count(1)
        self.entry_servers: list[Listener] = []
        self.vip_servers: dict[tuple[str, int], tuple[str, Listener]] = {}
        self.vip_failures: dict[tuple[str, int], str] = {}
        self._vip_task: asyncio.Task | None = None
        self._vip_dirty = False
        self._vip_retry: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._ticks = 0
        self.tls_listeners: list[TlsListener] = []
        self.upstream_tls: dict[str, UpstreamTls] = {}   # service -> its upstream TLS

    # -- table -----------------------------------------------------------------------

    def set_table(self, table: RouteTable) -> None:
        """Publish a new table; bind/close VIP listeners and retire pools to match."""
        old, self.table = self.table, table
        live: set[str] = set()
        for cluster in table.clusters.values():
            for ep in cluster.endpoints:
                live.add(ep.id)
        if old is not None:
            for cluster in old.clusters.values():
                for ep in cluster.endpoints:
                    if ep.id not in live and ep.active > 0:
                        self.leaving[ep.id] = (cluster.name, ep)
        for ep_id in [i for i in self.pools if i not in live]:
            self.pools.pop(ep_id).retire()
        self.reconcile_vips()

    def pool_for(self, ep: Any, cluster: Any) -> Pool:
        pool = self.pools.get(ep.id)
        if pool is None or pool.port != ep.port or pool.address != ep.address or pool.retired:
            if pool is not None:
                pool.retire()
            pool = Pool(ep.address, ep.port, max_idle=self.upstream_max_idle,
                        idle_timeout=min(cluster.settings.timeouts.idle, UPSTREAM_IDLE_MAX),
                        gauge=self.metrics.upstream_connections, loop=self.loop,
                        tls=self.upstream_tls.get(cluster.name) if self.upstream_tls else None)
            self.pools[ep.id] = pool
        return pool

    def draining_endpoints(self) -> list[dict[str, Any]]:
        """Endpoints no longer in the table that still carry requests (for /routes)."""
        out = []
        for ep_id, (service, ep) in list(self.leaving.items()):
            if ep.active <= 0 or ep.id in self.pools and not self.pools[ep.id].retired:
                del self.leaving[ep_id]  # done, or back in the table
                continue
            out.append({"service": service, "id": ep.id, "instance": ep.instance_id, "address": ep.address,
                        "port": ep.port, "active": ep.active})
        return out

    def vip_failure_list(self) -> list[dict[str, Any]]:
        """VIP listeners that could not be bound (for /routes): their VIP refuses connections."""
        table = self.table
        out = []
        for (vip, port), error in sorted(self.vip_failures.items()):
            c = table.vip_listeners.get((vip, port)) if table is not None else None
            out.append({"listen": config.join_hostport(vip, port), "service": c.name if c else None, "error": error})
        return out

    # -- listeners -----------------------------------------------------------------------

    async def listen(self, host: str, port: int, tls: TlsListener | None = None) -> tuple[str, int]:
        """Bind an entry listener (accepted by proxy._listen); with ``tls``, TLS is terminated
        on it (the handshake must end within the request head time-out), and plain HTTP sent
        to it is answered 400 in plain text."""
        factory = (lambda: ClientConnection(self)) if tls is None else (lambda: ClientConnection(self, None, True))
        server = await Listener.open(self, host, port, factory, tls=tls, reuse_port=self.reuse_port)
        self.entry_servers.append(server)
        sock = server.sockets[0].getsockname()
        if tls is not None:
            tls.publish(config.join_hostport(sock[0], sock[1]))
            self.tls_listeners.append(tls)
        return sock[0], sock[1]

    def reconcile_vips(self) -> None:
        if self._vip_task is not None and not self._vip_task.done():
            self._vip_dirty = True
            return
        self._vip_task = self.loop.create_task(self._reconcile_vips())

    async def _reconcile_vips(self) -> None:
        while True:
            self._vip_dirty = False
            table = self.table
            want = {} if table is None or self.draining else {
                key: c.protocol for key, c in table.vip_listeners.items()}
            for key in list(self.vip_servers):
                proto, server = self.vip_servers[key]
                if want.get(key) != proto:
                    del self.vip_servers[key]
                    server.close()
                    log.info("VIP listener %s:%d closed", *key)
            failed = {}
            for key, proto in want.items():
                if key in self.vip_servers:
                    continue
                if proto == "tcp":
                    factory: Callable[[], asyncio.Protocol] = _factory(TcpConnection, self, key)
                else:
                    factory = _factory(ClientConnection, self, key)
                try:
                    server = await Listener.open(self, key[0], key[1], factory, reuse_port=self.reuse_port)
                except OSError as exc:
                    failed[key] = exc.strerror or str(exc)
                    if self.vip_failures.get(key) != failed[key]:
                        log.error("VIP listener %s:%d (%s) could not be bound: %s", key[0], key[1], proto,
                                  failed[key])
                    continue
                self.vip_servers[key] = (proto, server)
                log.info("VIP listener %s:%d (%s) bound", key[0], key[1], proto)
            self.vip_failures = failed
            if not self._vip_dirty:
                break
        if failed and not self.draining and self._vip_retry is None:
            def retry() -> None:
                self._vip_retry = None
                self.reconcile_vips()
            self._vip_retry = self.loop.call_later(5.0, retry)

    async def vips_settled(self) -> None:
        """Wait until the VIP listeners match the current table (used before "ready")."""
        while self._vip_task is not None and not self._vip_task.done():
            await asyncio.shield(self._vip_task)

    # -- time-outs ------------------------------------------------------------------------

    def start_sweep(self) -> None:
        self._tick = self.loop.call_later(TICK, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        due = [c for c in self.connections if c.deadline <= now]
        for c in due:
            try:
                c.on_deadline(now)
            except Exception:  # noqa: BLE001 - one broken connection must not stop the sweep
                log.exception("time-out handling failed; aborting that connection")
                try:
                    c.abort()
                except Exception:  # noqa: BLE001
                    pass
        self._ticks += 1
        if self._ticks % 20 == 0:
            for ep_id, pool in list(self.pools.items()):
                pool.expire(now)
        if self._ticks % TLS_CHECK_TICKS == 0 and (self.tls_listeners or self.upstream_tls):
            self.check_tls()
        self._tick = self.loop.call_later(TICK, self._sweep)

    # -- TLS ----------------------------------------------------------------------------

    def check_tls(self) -> None:
        """Reload TLS files that changed (see proxy._tls); never raises."""
        for item in (*self.tls_listeners, *self.upstream_tls.values()):
            try:
                item.check()
            except Exception:  # noqa: BLE001 - a bug here must not stop the sweep
                log.exception("TLS check of %s %s failed", item.kind, item.name)

    def tls_status(self) -> dict[str, Any]:
        """For the admin API's /tls."""
        return {"listeners": [t.status() for t in self.tls_listeners],
                "upstreams": [u.status() for u in self.upstream_tls.values()]}

    # -- drain --------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop accepting, finish in-flight requests within ``timeout``, then close."""
        self.draining = True
        for server in self.entry_servers:
            server.close()
        for _proto, server in self.vip_servers.values():
            server.close()
        self.vip_servers.clear()
        if self._vip_retry is not None:
            self._vip_retry.cancel()
        for c in list(self.connections):
            c.shutdown()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.connections)
        if left:
            log.warning("drain deadline (%.1fs) passed with %d connection(s) still busy; closing them",
                        timeout, left)
        for c in list(self.connections):
            log.info("closing at the drain deadline: %s", c.describe())
            c.abort()
        for pool in self.pools.values():
            pool.retire()
        if self._tick is not None:
            self._tick.cancel()
        await asyncio.sleep(0)

    # -- access log ---------------------------------------------------------------------

    def _access_log(self, ex: Any, now: float, latency: float, aborted: bool) -> None:
        head = ex.head
        ep = ex.ep
        rec = {
            "ts": round(time.time(), 3),
            "client": ex.client.peer_ip.decode("ascii", "replace"),
            "method": head.method.decode("latin-1"),
            "host": head.host.decode("latin-1"),
            "path": head.target.decode("latin-1")[:1024],
            "status": ex.status,
            "service": ex.service,
            "upstream": f"{ep.address}:{ep.port}" if ep is not None else None,
            "retries": ex.retries,
            "duration_ms": round(latency * 1000, 3),
            "bytes_out": ex.bytes_out,
            "request_id": (head.request_id or b"").decode("latin-1") or None,
            "aborted": aborted,
        }
        sys.stderr.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _factory(cls: type, server: ProxyServer, key: tuple[str, int]) -> Callable[[], asyncio.Protocol]:
    return lambda: cls(server, key)
