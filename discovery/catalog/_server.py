"""The catalog process: store + watch hub + timers + HTTP API, started and stopped in order.

Start: open SQLite and load state -> read (first time: make) the management token ->
bootstrap the local node -> arm check and session timers -> bind the HTTP listener
(HTTPS with ``tls_cert_file``/``tls_key_file``). Stop (reverse): stop accepting, wake blocked queries so
they answer at once, stop timers and probes, let the writer finish queued writes, close
the database. Every step of stop runs even if an earlier one failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from config import CATALOG_TOKEN_FILE

from ._auth import Gate, load_or_create
from ._checkdef import script_policy
from ._config import AgentConfig, ConfigError, apply_config, parse_config, read_config
from ._errors import CatalogError
from ._http import Router, error_reply, make_handler
from ._monitor import LogFanout
from ._prom import Stats
from ._model import State
from ._store import Store
from ._watch import WatchHub
from ._wire import HttpServer

__all__ = ["Options", "CatalogServer", "server_tls_context"]

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
    # Consul's enable_script_checks (script checks from the HTTP API and config files) and
    # enable_local_script_checks (from config files only). Both off, as in Consul: a script
    # check runs a command as this process's user.
    enable_script_checks: bool = False
    enable_local_script_checks: bool = False
    # Consul-style JSON config files/directories: services, checks, the script flags,
    # log_level. Read at start and again on reload (SIGHUP or PUT /v1/agent/reload).
    config_paths: tuple[str, ...] = ()
    log_level: str = "info"
    # The management token's file (_auth); None: <data_dir>/management-token.
    token_file: str | None = None
    # HTTPS instead of HTTP (Consul's tls.https cert_file/key_file); with a client CA,
    # clients must present a certificate it signed (Consul's verify_incoming).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None

    @property
    def management_token_file(self) -> str:
        return self.token_file or os.path.join(self.data_dir, CATALOG_TOKEN_FILE)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

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


def _level(name: str) -> int:
    """A --log-level or log_level name as a logging level ("warn"/"warning" alike)."""
    return {"trace": logging.DEBUG, "warn": logging.WARNING}.get(name, getattr(logging, name.upper(), logging.INFO))


def server_tls_context(opts: Options) -> ssl.SSLContext | None:
    """The listener's TLS context, or None for plain HTTP. ConfigError naming the file
    that cannot be used."""
    if not opts.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(opts.tls_cert_file, opts.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {opts.tls_cert_file} / key {opts.tls_key_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if opts.tls_client_ca_file:
        try:
            ctx.load_verify_locations(opts.tls_client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS client CA {opts.tls_client_ca_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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
        store = self.store
        self.hub = WatchHub(version=lambda: store.version, settled=store.settled,
                            is_settled=lambda: store.is_settled,
                            on_error=lambda exc: error_reply(exc, store.index))
        self.store.set_notifier(self.hub.notify, self.hub.prepare, self.hub.discard)
        adv = opts.advertise
        self.leader_addr = f"[{adv}]:8300" if ":" in adv else f"{adv}:8300"
        from ._checks import CheckRunner
        from ._sessions import SessionTimers

        self.checks = CheckRunner(self)
        self.sessions = SessionTimers(self)
        self._http: HttpServer | None = None
        self.monitor: LogFanout | None = None
        # Effective script flags: the command line or the config files read at start.
        self.enable_script_checks = opts.enable_script_checks
        self.enable_local_script_checks = opts.enable_local_script_checks
        self._components: list[Any] = [self.sessions, self.checks, TombstoneReaper(self)]
        self.bound: tuple[str, int] | None = None
        self.gate: Gate | None = None
        self.stats = Stats()
        self.store.on_written = self.stats.wrote

    def build_router(self) -> Router:
        from . import _h_agent, _h_catalog, _h_kv, _h_session

        router = Router()
        for module in (_h_kv, _h_agent, _h_catalog, _h_session):
            module.register(router)
        return router

    async def start(self) -> tuple[str, int]:
        from ._catalog import bootstrap_node

        config = parse_config(read_config(self.opts.config_paths))  # a bad file: no start
        tls = server_tls_context(self.opts)
        self.enable_script_checks = self.opts.enable_script_checks or config.enable_script_checks
        self.enable_local_script_checks = self.opts.enable_local_script_checks or config.enable_local_script_checks
        self._config_flags = (config.enable_script_checks, config.enable_local_script_checks)
        self.monitor = LogFanout(asyncio.get_running_loop(), _level(config.log_level or self.opts.log_level))
        self.monitor.install()
        await self.store.open()
        self.gate = Gate(load_or_create(self.opts.management_token_file))  # no token: no start
        st, opts = self.state, self.opts
        st.index_floor = self.store.index_floor
        await self.store.write(lambda tx: bootstrap_node(st, tx, opts.node, opts.advertise, opts.datacenter))
        await self._apply_config(config)
        for component in self._components:
            await component.start()
        # A client that goes away cancels its handler and unparks its blocking query at
        # once. Writes are shielded (Store.write): a write that was received is applied.
        self._http = HttpServer(make_handler(self.build_router(), self), self.hub)
        self.bound = await self._http.start(self.opts.host or None, self.opts.port, tls)
        log.info("catalog serving %s on %s:%d (node %s, index %d; token in %s)", self.opts.scheme, *self.bound,
                 self.opts.node, self.store.index, self.opts.management_token_file)
        return self.bound

    async def _apply_config(self, config: AgentConfig) -> None:
        st, node = self.state, self.opts.node
        refusal = script_policy("local", self.enable_script_checks, self.enable_local_script_checks)
        await self.store.write(lambda tx: apply_config(st, tx, node, config, refusal))

    async def reload(self) -> None:
        """Re-read the config files (Consul's reload): their services and checks, and
        log_level. Raises ConfigError (nothing applied) if a file cannot be used."""
        log.info("Reloading configuration...")
        try:
            config = parse_config(read_config(self.opts.config_paths))
            await self._apply_config(config)
        except CatalogError as exc:
            log.error("Failed to reload configs: %s", exc.reason)
            raise ConfigError(f"Failed to reload configs: {exc.reason}") from None
        if (config.enable_script_checks, config.enable_local_script_checks) != self._config_flags:
            log.warning("enable_script_checks and enable_local_script_checks take effect at the next start")
        if self.monitor is not None:
            self.monitor.set_base_level(_level(config.log_level or self.opts.log_level))

    async def stop(self) -> None:
        errors: list[BaseException] = []
        try:
            await self.hub.close()
        except Exception as exc:  # keep tearing down
            errors.append(exc)
        if self._http is not None:
            try:
                await self._http.stop()
            except Exception as exc:
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
        if self.monitor is not None:
            self.monitor.uninstall()
        for exc in errors:
            log.error("error while stopping: %s", exc)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await stop.wait()
