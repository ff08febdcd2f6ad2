"""``GET /v1/agent/monitor``: the catalog's log, streamed to whoever asks.

``loglevel`` takes hclog's names, case-insensitive (trace, debug, info, warn, error,
off; default info); anything else is 400 ``Unknown log level: <x>`` (agent_endpoint.go
AgentMonitor). Lines are hclog's text format (``2026-12-07T01:22:16.134Z [INFO]
discovery.catalog: message``) or, with ``logjson``, one JSON object per line with
``@level``, ``@message``, ``@module``, ``@timestamp``.

Ownership: ``LogFanout`` is a logging.Handler on the root logger. Each monitor owns a
bounded queue (512 lines, Consul's buffer size); when a slow reader lets it fill, new
lines are dropped and counted, never queued without bound. While a monitor asks for more
detail than ``--log-level``, the root logger is opened to that level; stderr keeps its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

__all__ = ["LogFanout", "monitor_level", "format_record"]

BUFFER = 512
TRACE = 5  # Python has no TRACE: below DEBUG
OFF = logging.CRITICAL + 10
_LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "error": logging.ERROR, "off": OFF}
_BRACKETS = {TRACE: "[TRACE]", logging.DEBUG: "[DEBUG]", logging.INFO: "[INFO] ", logging.WARNING: "[WARN] ",
             logging.ERROR: "[ERROR]", logging.CRITICAL: "[ERROR]"}
_NAMES = {TRACE: "trace", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "error"}


def monitor_level(name: str) -> int | None:
    """hclog.LevelFromString: the level for ``name``, or None if it is not one."""
    return _LEVELS.get(name.strip().lower())


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def format_record(levelno: int, name: str, message: str, created: float, as_json: bool) -> str:
    level = max((lv for lv in _BRACKETS if lv <= levelno), default=TRACE)
    if as_json:
        return json.dumps({"@level": _NAMES[level], "@message": message, "@module": name,
                           "@timestamp": _timestamp(created)}) + "\n"
    return f"{_timestamp(created)} {_BRACKETS[level]} {name}: {message}\n"


class _Monitor:
    __slots__ = ("level", "queue", "dropped")

    def __init__(self, level: int) -> None:
        self.level = level
        self.queue: asyncio.Queue[tuple[int, str, str, float]] = asyncio.Queue(BUFFER)
        self.dropped = 0


class LogFanout(logging.Handler):
    """See the module docstring. ``base_level``: the level stderr logs at."""

    def __init__(self, loop: asyncio.AbstractEventLoop, base_level: int) -> None:
        super().__init__(level=TRACE)
        self.loop = loop
        self.base_level = base_level
        self.monitors: set[_Monitor] = set()
        self._loop_thread = threading.get_ident()

    def install(self) -> None:
        root = logging.getLogger()
        for handler in root.handlers:
            handler.setLevel(self.base_level)
        root.addHandler(self)
        self._open_root()

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self)

    def set_base_level(self, level: int) -> None:
        self.base_level = level
        for handler in logging.getLogger().handlers:
            if handler is not self:
                handler.setLevel(level)
        self._open_root()

    def _open_root(self) -> None:
        logging.getLogger().setLevel(min([self.base_level] + [m.level for m in self.monitors]))

    def subscribe(self, level: int) -> _Monitor:
        monitor = _Monitor(level)
        self.monitors.add(monitor)
        self._open_root()
        return monitor

    def unsubscribe(self, monitor: _Monitor) -> None:
        self.monitors.discard(monitor)
        self._open_root()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.monitors:
            return
        try:
            item = (record.levelno, record.name, record.getMessage(), record.created)
        except Exception:  # a bad format string: logging's own rule is to report, not raise
            self.handleError(record)
            return
        if threading.get_ident() == self._loop_thread:
            self._deliver(item)
        else:
            self.loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item: tuple[int, str, str, float]) -> None:
        for monitor in self.monitors:
            if item[0] >= monitor.level:
                try:
                    monitor.queue.put_nowait(item)
                except asyncio.QueueFull:
                    monitor.dropped += 1

    async def stream(self, level: int, as_json: bool, write: Any) -> None:
        """Write log lines at ``level`` and above until cancelled (the client went away)."""
        monitor = self.subscribe(level)
        try:
            while True:
                levelno, name, message, created = await monitor.queue.get()
                write(format_record(levelno, name, message, created, as_json))
        finally:
            self.unsubscribe(monitor)
            if monitor.dropped:
                logging.getLogger("discovery.catalog").warning(
                    "Dropped logs during monitor request: dropped_count=%d", monitor.dropped)
