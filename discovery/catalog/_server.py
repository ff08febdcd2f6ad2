"""The catalog process: store + watch hub + timers + HTTP API, started and stopped in order.

Start: open SQLite and load state -> bootstrap the local node -> arm check and session
timers -> bind the HTTP listener. Stop (reverse): stop accepting, wake blocked queries so
they answer at once, stop timers and probes, let the writer finish queued writes, close
the database. Every step of stop runs even if an earlier one failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ._http import Router, make_handler
from ._model import State
from ._render import RenderCache
from ._store import Store
from ._watch import WatchHub

__all__ = ["Options", "CatalogServer"]

log = logging.getLogger("discovery.catalog")



@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8500
    data_dir: str = ".meshlet/catalog"
    node: str = "meshlet"
    datacenter: str = "dc1"
    # Shortest session TTL accepted (Consul's session_ttl_min, 10s). Lower it for tests.
    session_ttl_min: float = 10.0
    # Floor for HTTP/TCP check intervals (Consul clamps to 1s; py-consul's own tests
    # register 10ms/100ms checks and expect them to run).
    check_interval_min: float = 0.1

    @property
    def advertise(self) -> str:
        """The node's address: the listen host as an IP (a wildcard or an unresolvable
        name gives 127.0.0.1), since DNS answers and clients use it as an address."""
        host = self.host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        try:
            return socket.gethostbyname(host)
        except OSError:
            return "127.0.0.1"


class TombstoneReaper:
    """Drops KV tombstones older than 15 minutes, checking every minute."""

    INTERVAL = 60.0

    def __init__(self, server: "CatalogServer") -> None:
        self.server = server
        self._handle: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.INTERVAL, self._tick)

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        from ._kv import reap_tombstones

        st = self.server.state
        if st.tombs.rows:
            now = time.time()
            fut = self.server.store.submit(lambda tx: reap_tombstones(st, tx, now))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() and log.warning(
                "tombstone reaping failed: %s", f.exception()))
        self._handle = asyncio.get_running_loop().call_later(self.INTERVAL, self._tick)


class CatalogServer:
    """One catalog: owns its store, hub, timers and HTTP site."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.state = State()
        self.store = Store(opts.data_dir, self.state.tables())
        self.hub = WatchHub()
        self.store.set_notifier(self.hub.notify)
        adv = opts.advertise
        self.leader_addr = f"[{adv}]:8300" if ":" in adv else f"{adv}:8300"
        self.render_cache = RenderCache()
        from ._checks import CheckRunner
        from ._sessions import SessionTimers

        self.checks = CheckRunner(self)
        self.sessions = SessionTimers(self)
        self._runner: web.ServerRunner | None = None
        self._components: list[Any] = [self.sessions, self.checks, TombstoneReaper(self)]
        self.bound: tuple[str, int] | None = None

    def build_router(self) -> Router:
        from . import _h_agent, _h_catalog, _h_kv, _h_session

        router = Router()
        for module in (_h_kv, _h_agent, _h_catalog, _h_session):
            module.register(router)
        return router

    async def start(self) -> tuple[str, int]:
        from ._catalog import bootstrap_node

        await self.store.open()
        st, opts = self.state, self.opts
        await self.store.write(lambda tx: bootstrap_node(st, tx, opts.node, opts.advertise, opts.datacenter))
        for component in self._components:
            await component.start()
        # handler_cancellation: a blocking query whose client went away stops waiting at
        # once instead of holding its subscriptions for up to ten minutes. Writes are
        # shielded (Store.write): a write that was received is applied either way.
        http = web.Server(make_handler(self.build_router(), self), access_log=None, handler_cancellation=True)
        self._runner = web.ServerRunner(http, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.host or None, self.opts.port, reuse_address=True, backlog=1024)
        await site.start()
        addr = self._runner.addresses[0]
        self.bound = (addr[0], addr[1])
        log.info("catalog serving on %s:%d (node %s, index %d)", addr[0], addr[1], self.opts.node, self.store.index)
        return self.bound

    async def stop(self) -> None:
        errors: list[BaseException] = []
        self.hub.close()
        if self._runner is not None:
            try:
                await self._runner.cleanup()
            except Exception as exc:  # keep tearing down
                errors.append(exc)
        for component in reversed(self._components):
            try:
                await component.stop()
            except Exception as exc:
                errors.append(exc)
        try:
            await self.store.close()
        except Exception as exc:
            errors.append(exc)
        for exc in errors:
            log.error("error while stopping: %s", exc)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await stop.wait()
