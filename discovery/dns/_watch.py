"""The catalog watch in a process of its own, so a catalog change never stalls answering.

A change costs ~2 ms of Python (the blocking query's round trip through aiohttp and
py-consul, the View, the zone build). Run on a thread of the answering process, that was
GIL time the answering loop had to wait for: at 10k QPS with one change per 100 ms, p99
latency rose from ~0.15 to ~0.4 ms (``bench/dns``). So the Mirror and the zone builds run
in a child process (``_builder``, ``python -m discovery.dns._builder``), which sends the
names that changed; the answering loop applies them and drops the cached answers of the
record types that changed (``Engine.commit``), microseconds per change.

If the child dies, the answering loop keeps the last zone, logs it, and starts a new
child (0.5 s, doubling to 30 s between attempts); its first zone replaces the whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable

from config import module_argv

from ._builder import HEAD_SIZE, frame, frame_size, frozen_sets
from ._engine import Engine, Update
from ._zone import Zone

__all__ = ["CatalogProcess"]

log = logging.getLogger(__name__)

_RESTART_FIRST, _RESTART_MAX = 0.5, 30.0
_RESTART_TIMEOUT = 3600.0   # a restarted child waits this long for the catalog (then again)


class CatalogProcess:
    """``start()`` returns once the child's first zone is served (``MirrorError`` when the
    catalog does not answer within ``timeout``, or the child cannot start); every later
    change reaches ``engine.commit`` on the answering loop, in order. ``close()`` stops
    the child."""

    def __init__(self, access: Any, engine: Engine, log_level: str | int = "INFO") -> None:
        """``access``: a ``discovery.consul.CatalogAccess`` (or a URL), sent to the child
        over the socket: its token never shows in a process's arguments."""
        self.access, self.engine, self.log_level = access, engine, log_level
        # What the child last said about the catalog (Mirror.catalog_state): the zone is
        # served from the last known state while ``reachable`` is false.
        self.catalog: dict[str, Any] = {"reachable": True}
        self.on_built: Callable[[float], None] | None = None   # seconds each zone build took
        self._names: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout: float = 10.0) -> None:
        from discovery.consul import MirrorError

        try:
            reader = await self._spawn(timeout)
            msg = await asyncio.wait_for(_read(reader), timeout + 30.0)
            while msg[0] == "catalog":            # an outage before the first zone: keep it, read on
                self.catalog = msg[1]
                msg = await asyncio.wait_for(_read(reader), timeout + 30.0)
        except (EOFError, asyncio.IncompleteReadError, OSError, asyncio.TimeoutError) as exc:
            code = self._proc.returncode if self._proc is not None else None
            await self.close()
            raise MirrorError(f"the DNS zone builder did not start ({type(exc).__name__}, exit code {code})") from None
        if msg[0] == "error":
            await self.close()
            raise MirrorError(msg[1])
        self._apply(msg)
        self._task = asyncio.get_running_loop().create_task(self._follow(reader))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._stop_child()

    # -- the child

    async def _spawn(self, timeout: float) -> asyncio.StreamReader:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding discovery/
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *module_argv("discovery.dns._builder", str(theirs.fileno())),
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        self._writer.write(frame({"access": self.access, "settings": self.engine.settings,
                                  "timeout": timeout, "log_level": self.log_level}))
        return reader

    async def _stop_child(self) -> None:
        if self._writer is not None:
            self._writer.close()                 # EOF: the child stops
            self._writer = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):   # not proc.kill(): its poll() reaps early
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """Apply the child's zones; when it dies, keep the last zone and start another."""
        delay = _RESTART_FIRST
        while not self._closing:
            try:
                while True:
                    msg = await _read(reader)
                    if msg[0] == "error":
                        log.error("DNS zone builder: %s", msg[1])
                        continue
                    if msg[0] == "catalog":
                        self.catalog = msg[1]
                        continue
                    if msg[0] == "built":
                        if self.on_built is not None:
                            self.on_built(msg[1])
                        continue
                    self._apply(msg)
                    delay = _RESTART_FIRST
            except Exception as exc:  # noqa: BLE001 - EOF, a broken frame or a bug in applying it: start over
                if self._closing:
                    return
                code = self._proc.returncode if self._proc is not None else None
                if code is None and self._proc is not None:
                    try:
                        code = await asyncio.wait_for(self._proc.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                how = ("still running" if code is None else
                       f"killed by signal {-code}" if code < 0 else f"exit code {code}")
                log.error("the DNS zone builder stopped (%s%s); answering from the last zone (view %d) "
                          "and starting it again in %.1fs", how,
                          "" if isinstance(exc, (EOFError, asyncio.IncompleteReadError)) else f", {exc}",
                          self.engine.zone.index, delay)
            await self._stop_child()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX)
            try:
                reader = await self._spawn(_RESTART_TIMEOUT)
                self.restarts += 1
            except OSError as exc:
                log.error("cannot start the DNS zone builder: %s", exc)
                reader = _closed_reader()

    # -- on the answering loop

    def _apply(self, msg: tuple[Any, ...]) -> None:
        """Bring the served zone to the child's: all names (``changed`` None) or the changed
        ones, in place. Nothing awaits between the update and ``commit``, so no query sees
        a half-applied zone."""
        _kind, index, soa, services, names, changed = msg
        if changed is None:
            self._names = {name: frozen_sets(sets) for name, sets in names.items()}
        else:
            for name, sets in names.items():
                if sets is None:
                    self._names.pop(name, None)
                else:
                    self._names[name] = frozen_sets(sets)
        zone = Zone(self.engine.settings, self._names, soa, index, services)
        self.engine.commit(Update(zone, changed))


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    size = frame_size(await reader.readexactly(HEAD_SIZE))
    msg = pickle.loads(await reader.readexactly(size))
    if not isinstance(msg, tuple) or not msg or msg[0] not in ("zone", "error", "catalog", "built"):
        raise ValueError("unexpected message from the DNS zone builder")
    return msg


def _closed_reader() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_eof()
    return reader
