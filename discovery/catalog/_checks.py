"""The check runner: HTTP, TCP and script probes, alias checks, TTL expiry,
DeregisterCriticalServiceAfter.

The runner keeps no state of its own that matters: after every commit it reconciles its
timers and probe tasks with the checks that changed (``on_commit``), and at start with
every check (so after a restart each TTL check gets its full TTL again).

* HTTP: ``Method`` (GET) ``url`` with ``Header``/``Body``, a new connection each time
  (like Consul); 2xx passing, 429 warning, else critical; Timeout 10s by default.
* TCP: connect -> passing (``TCP connect <addr>: Success``), else critical.
* Script (only registered when enable_script_checks / enable_local_script_checks allow
  it): the ``Args`` argv, no shell, killed with its process group at the timeout (30s by
  default); exit 0 passing, 1 warning, else critical (_script).
* Alias: mirrors the health of a service (and its node's checks), recomputed after every
  commit that touches that node (_checkdef.alias_status).
* Probes run every ``Interval``, at least ``check_interval_min`` (100ms) apart, the first
  one right away. SuccessBeforePassing/FailuresBefore* are applied (_checkdef.apply_result).
  A result that only changes the output is written at most every 5 minutes (Consul's
  ``check_update_interval``), so watchers are not woken by a changing response body.
* TTL: a check not updated within its TTL turns critical with output "TTL expired".
  Updates reset the deadline from inside the writer (``ttl_reset``), so an expiry queued
  behind an update cannot undo it.
* DeregisterCriticalServiceAfter: a service whose check stays critical that long is
  removed. Any value is honoured (Consul's minimum is 1m and its reaper runs every 30s);
  the time counts from when this process saw the check turn critical.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from ._catalog import reap_critical_service, set_check_status
from ._checkdef import CRITICAL, OUTPUT_MAX, PASSING, SCRIPT_TIMEOUT_NS, alias_status, apply_result, http_status
from ._errors import CatalogError
from ._script import run_script
from ._store import Commit, Tx

if TYPE_CHECKING:
    from ._server import CatalogServer

__all__ = ["CheckRunner", "OUTPUT_UPDATE_INTERVAL"]

log = logging.getLogger("discovery.catalog.checks")

OUTPUT_UPDATE_INTERVAL = 300.0  # check_update_interval
Key = tuple[str, str]


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class CheckRunner:
    def __init__(self, server: "CatalogServer") -> None:
        self.server = server
        self.state = server.state
        self.store = server.store
        self.floor = server.opts.check_interval_min
        self._probes: dict[Key, tuple[dict[str, Any], asyncio.Task]] = {}
        self._ttl: dict[Key, tuple[float, asyncio.TimerHandle, int]] = {}
        self._reap: dict[Key, tuple[float, asyncio.TimerHandle | None]] = {}
        self._output_written: dict[Key, float] = {}
        self._aliases: dict[Key, tuple[str, str]] = {}  # alias check -> (node, service ID) it mirrors
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"<CheckRunner probes={len(self._probes)} ttl={len(self._ttl)} reap={len(self._reap)}>"

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            headers={"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"},
        )
        self.store.add_listener(self.on_commit)
        for key in list(self.state.checks.rows):
            self._reconcile(key)

    async def stop(self) -> None:
        self._stopping = True
        for _, handle, _ in self._ttl.values():
            handle.cancel()
        for _, handle in self._reap.values():
            if handle is not None:
                handle.cancel()
        tasks = [task for _, task in self._probes.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:  # cancelled or failed: we are stopping either way
                pass
        self._probes.clear()
        if self._http is not None:
            await self._http.close()

    # -- reconcile --------------------------------------------------------------------
    def on_commit(self, commit: Commit) -> None:
        nodes: set[str] = set()
        for table, key in commit.dirty:
            if table == "checks":
                self._reconcile(key)
                nodes.add(key[0])
            elif table == "services":
                nodes.add(key[0])
        if self._aliases:
            for key, (node, _) in list(self._aliases.items()):
                if node in nodes:
                    self._update_alias(key)

    def _reconcile(self, key: Key) -> None:
        if self._stopping:
            return
        row = self.state.checks.get(key)
        d = (row.get("_def") or {}) if row is not None else {}
        kind = d.get("kind")
        probe = self._probes.get(key)
        if kind in ("http", "tcp", "script"):
            if probe is None or probe[0] != d:
                if probe is not None:
                    probe[1].cancel()
                task = asyncio.get_running_loop().create_task(self._probe_loop(key, d), name=f"check {key[1]}")
                self._probes[key] = (d, task)
        elif probe is not None:
            probe[1].cancel()
            del self._probes[key]
        if kind == "alias":
            target = (d.get("alias_node") or key[0], d.get("alias_service", ""))
            if self._aliases.get(key) != target:
                self._aliases[key] = target
                self._update_alias(key)
        else:
            self._aliases.pop(key, None)
        armed = self._ttl.get(key)
        if kind == "ttl":
            if armed is None or armed[2] != d["ttl"]:
                self.ttl_reset(key)
        elif armed is not None:
            armed[1].cancel()
            del self._ttl[key]
        self._reconcile_reap(key, row, d)
        if row is None:
            self._output_written.pop(key, None)

    def _reconcile_reap(self, key: Key, row: dict[str, Any] | None, d: dict[str, Any]) -> None:
        wanted = row is not None and row["Status"] == CRITICAL and d.get("deregister") and row.get("ServiceID")
        current = self._reap.get(key)
        if not wanted:
            if current is not None:
                if current[1] is not None:
                    current[1].cancel()
                del self._reap[key]
            return
        if current is None:
            loop = asyncio.get_running_loop()
            handle = loop.call_later(d["deregister"] / 1e9 + 0.001, self._reap_fire, key)
            self._reap[key] = (loop.time(), handle)

    # -- TTL --------------------------------------------------------------------------
    def ttl_reset(self, key: Key) -> None:
        """Start a TTL check's deadline over. Called from inside write ops."""
        row = self.state.checks.get(key)
        d = (row or {}).get("_def") or {}
        if d.get("kind") != "ttl" or self._stopping:
            return
        armed = self._ttl.pop(key, None)
        if armed is not None:
            armed[1].cancel()
        ttl = d["ttl"] / 1e9
        loop = asyncio.get_running_loop()
        handle = loop.call_later(ttl, self._ttl_fire, key)
        self._ttl[key] = (loop.time() + ttl, handle, d["ttl"])

    def _ttl_fire(self, key: Key) -> None:
        st = self.state
        loop = asyncio.get_running_loop()
        armed = self._ttl.get(key)
        if armed is None:
            return
        if armed[0] > loop.time():
            # Timers may fire up to a clock tick early (uvloop rounds to ms): wait the rest.
            handle = loop.call_later(armed[0] - loop.time() + 0.001, self._ttl_fire, key)
            self._ttl[key] = (armed[0], handle, armed[2])
            return

        def expire(tx: Tx) -> None:
            armed = self._ttl.get(key)
            if armed is None or armed[0] > loop.time():
                return  # reset (or removed) after the timer fired
            row = st.checks.get(key)
            if row is not None and (row.get("_def") or {}).get("kind") == "ttl":
                set_check_status(st, tx, key, CRITICAL, "TTL expired")

        self._submit(expire)

    # -- alias ------------------------------------------------------------------------
    def _update_alias(self, key: Key) -> None:
        """Mirror the aliased service's health (re-run after every commit touching its node)."""
        node, sid = self._aliases[key]
        st = self.state
        checks = [c for c in st.all_node_checks(node) if not c.get("_internal") and c.get("ServiceID") in ("", sid)]
        exists = not sid or (node, sid) in st.services
        status, output = alias_status(checks, exists, sid, node)
        row = st.checks.get(key)
        if row is None or (row["Status"], row["Output"]) == (status, output):
            return
        d = row.get("_def")
        self._submit(lambda tx: set_check_status(st, tx, key, status, output, expect_def=d))

    # -- DeregisterCriticalServiceAfter -----------------------------------------------
    def _reap_fire(self, key: Key) -> None:
        entry = self._reap.get(key)
        if entry is None:
            return
        since = entry[0]
        self._reap[key] = (since, None)
        row = self.state.checks.get(key)
        after = ((row or {}).get("_def") or {}).get("deregister", 0)
        st = self.state

        loop = asyncio.get_running_loop()

        def reap(tx: Tx) -> None:
            if reap_critical_service(st, tx, key, loop.time() - since, after):
                log.info("deregistered service %s of %s: check %s critical for %.1fs",
                         row and row.get("ServiceID"), key[0], key[1], loop.time() - since)

        self._submit(reap)

    def _submit(self, op: Any) -> None:
        if self._stopping:
            return
        fut = self.store.submit(op)
        fut.add_done_callback(_log_failure)

    # -- probes -----------------------------------------------------------------------
    async def _probe_loop(self, key: Key, d: dict[str, Any]) -> None:
        interval = max(d.get("interval", 0) / 1e9, self.floor)
        counters = (0, 0)
        probe = {"http": self._probe_http, "tcp": self._probe_tcp, "script": self._probe_script}[d["kind"]]
        while True:
            status, output = await probe(d)
            counters, new = apply_result(counters, status, d.get("sbp", 0), d.get("fbw", 0), d.get("fbc", 0))
            if new is not None:
                await self._record(key, d, new, output)
            await asyncio.sleep(interval)

    async def _record(self, key: Key, d: dict[str, Any], status: str, output: str) -> None:
        row = self.state.checks.get(key)
        if row is None or row.get("_def") != d:
            return
        if row["Status"] == status:
            if row["Output"] == output:
                return
            last = self._output_written.get(key, 0.0)
            if time.monotonic() - last < OUTPUT_UPDATE_INTERVAL:
                return  # output-only change: written at most every check_update_interval
        st = self.state
        try:
            wrote = await self.store.write(lambda tx: set_check_status(st, tx, key, status, output, expect_def=d))
        except CatalogError as exc:
            log.debug("check %s result not recorded: %s", key[1], exc.reason)
            return
        if wrote:
            self._output_written[key] = time.monotonic()

    async def _probe_http(self, d: dict[str, Any]) -> tuple[str, str]:
        assert self._http is not None
        method, url = d.get("method", "GET"), d["http"]
        headers = [(k, v) for k, values in (d.get("header") or {}).items() for v in values]
        timeout = aiohttp.ClientTimeout(total=d.get("timeout", 10_000_000_000) / 1e9)
        try:
            async with self._http.request(
                method, url, headers=headers or None, data=d.get("body") or None, timeout=timeout,
                ssl=False if d.get("tls_skip_verify") else True,
                allow_redirects=not d.get("disable_redirects"),
            ) as resp:
                body = await resp.content.read(4096)
                text = body.decode("utf-8", "replace")
                return http_status(resp.status), f"HTTP {method} {url}: {resp.status} {resp.reason} Output: {text}"
        except asyncio.TimeoutError:
            return CRITICAL, f'{method} "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return CRITICAL, f'{method} "{url}": {exc or type(exc).__name__}'

    async def _probe_script(self, d: dict[str, Any]) -> tuple[str, str]:
        return await run_script(d["args"], d.get("timeout", SCRIPT_TIMEOUT_NS), d.get("output_max") or OUTPUT_MAX)

    async def _probe_tcp(self, d: dict[str, Any]) -> tuple[str, str]:
        addr = d["tcp"]
        timeout = d.get("timeout", 10_000_000_000) / 1e9
        try:
            host, port = _split_addr(addr)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except asyncio.TimeoutError:
            return CRITICAL, f"dial tcp {addr}: i/o timeout"
        except (OSError, ValueError) as exc:
            return CRITICAL, f"dial tcp {addr}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return PASSING, f"TCP connect {addr}: Success"


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("timer write failed: %s", fut.exception())
