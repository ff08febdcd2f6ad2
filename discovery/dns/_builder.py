"""The zone builder: a child process that watches the catalog and builds zones.

``python -m discovery.dns._builder FD`` is started by ``_watch.CatalogProcess`` with one
end of a socketpair as FD. Over it, framed pickles (``frame``, ``read_frame``):

parent -> child, once: ``{"access", "settings", "timeout", "log_level"}`` (over the socket,
    not in the arguments: nothing of the configuration, the catalog token least of all,
    shows in the process list).
child -> parent: ``("zone", index, soa, services, names, changed)``: the first (and after a
    restart, again the first) carries every name with ``changed`` None; each later one
    only the names that changed (value None: the name is gone) and ``changed``, those
    names with the record types that changed (``_engine.Changed``); ``("error", text)``
    when the first View cannot be had; ``("catalog", state)`` when the catalog becomes
    unreachable or reachable again (``Mirror.catalog_state()``); ``("built", seconds)``
    after each zone: how long building it took (for ``/metrics``).

The child exits when the parent's end closes (the parent stopped or died): its socket
becomes readable with EOF. SIGINT is ignored, so a Ctrl-C to the process group reaches
the parent alone, which then closes the socket.

Why a process and not a thread: a catalog change costs ~2 ms of Python here (the
blocking query's round trip through aiohttp and py-consul, the View, the zone). On a
thread of the answering process that is GIL time the answering loop waits for, in slices
of ``sys.getswitchinterval()``: measured with ``bench/dns`` at 10k QPS and one change per
100 ms, p99 0.33-0.42 ms against 0.13-0.17 ms without changes. In its own process the
work runs wherever a core is free (under SCHED_IDLE: see ``Priority``), and the answering
loop only applies the names that changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from types import MappingProxyType
from typing import Any, Iterable

from config import setup_logging

from ._engine import Engine
from ._zone import Names, Settings

__all__ = ["main", "frame", "frame_size", "read_frame", "names_payload", "frozen_sets", "HEAD_SIZE", "MAX_FRAME"]

log = logging.getLogger("discovery.dns.builder")

_HEAD = struct.Struct("!I")
HEAD_SIZE = _HEAD.size
MAX_FRAME = 1 << 30
NICE = 10


def run_delay_ns() -> int | None:
    """How long this thread has waited for a CPU while runnable, in total (Linux
    /proc/thread-self/schedstat); None where unknown."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


class Priority:
    """How the builder yields the CPU to the answering process.

    A zone build is ~1 ms of Python in one piece. Measured on the 2-vCPU test machine with
    dnsperf at 10k QPS, a 1.5 ms burst every 100 ms at nice 10 already raised dnsmasq's p99
    from ~0.12 to ~0.20 ms, while the same burst under SCHED_IDLE changed nothing: the
    kernel treats a CPU running only SCHED_IDLE work as idle and wakes the answering
    process there at once. But SCHED_IDLE work starves on a saturated machine, and the
    catalog's changes must still reach the answers within 100 ms. So: SCHED_IDLE while the
    builder gets the CPU promptly; when it waited over ``STARVED_NS`` for a CPU during one
    change, normal scheduling at nice ``NICE`` until ``CALM_S`` seconds have passed without
    such a wait. Leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE >= 20 - NICE; without
    either, the builder stays at nice ``NICE`` (never in a class it could not leave).
    """

    STARVED_NS = 20_000_000
    CALM_S = 30.0

    def __init__(self, clock=None, delay=run_delay_ns, setter=None, can_leave_idle: bool | None = None) -> None:
        import time

        self.clock = clock or time.monotonic
        self.delay = delay
        self.setter = setter or _set_idle
        if can_leave_idle is None:
            can_leave_idle = _can_leave_idle()
        first = self.delay()
        self.enabled = can_leave_idle and first is not None
        self.idle = False
        self.last = first or 0
        self.since = self.clock()
        if self.enabled:
            self._switch(True)

    def after_change(self) -> None:
        """Call once per change handled: compares the CPU wait since the last call."""
        if not self.enabled:
            return
        now = self.delay() or 0
        waited, self.last = now - self.last, now
        if waited > self.STARVED_NS:
            self.since = self.clock()
            if self.idle:
                log.info("the zone builder waited %.0f ms for a CPU; scheduling it normally (nice %d)",
                         waited / 1e6, NICE)
                self._switch(False)
        elif not self.idle and self.clock() - self.since > self.CALM_S:
            self._switch(True)

    def _switch(self, idle: bool) -> None:
        try:
            self.setter(idle)
            self.idle = idle
        except OSError as exc:
            log.info("cannot change the zone builder's scheduling (%s); staying at nice %d", exc, NICE)
            self.enabled = False


def _set_idle(idle: bool) -> None:
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    os.sched_setscheduler(0, policy, os.sched_param(0))


def _can_leave_idle() -> bool:
    import resource

    if not hasattr(os, "SCHED_IDLE"):
        return False
    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - NICE:
        return True
    try:                                              # CAP_SYS_NICE is capability 23
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        return bool(int(caps.split()[1], 16) >> 23 & 1)
    except (OSError, StopIteration, ValueError, IndexError):
        return False


def frame(obj: Any) -> bytes:
    """One message on the wire: 4-byte length, then the pickle."""
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(body)) + body


def names_payload(names: Names, only: Iterable[str] | None = None) -> dict[str, dict[int, Any] | None]:
    """``names`` (or the ``only`` ones of it) as plain dicts, which pickle (the zone's
    read-only mapping proxies do not); None for a name in ``only`` that is gone."""
    keys = names.keys() if only is None else only
    out: dict[str, dict[int, Any] | None] = {}
    for name in keys:
        sets = names.get(name)
        out[name] = None if sets is None else dict(sets)
    return out


def frozen_sets(sets: dict[int, Any]) -> Any:
    """What the parent keeps of a received name: a read-only mapping, as in a built zone."""
    return MappingProxyType(sets)


def frame_size(head: bytes) -> int:
    """The body length a frame's ``HEAD_SIZE``-byte head announces; ValueError past MAX_FRAME."""
    (size,) = _HEAD.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return size


def read_frame(sock: socket.socket) -> Any:
    """One message from a blocking socket; EOFError when the peer closed."""
    return pickle.loads(_recv_exactly(sock, frame_size(_recv_exactly(sock, HEAD_SIZE))))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class _Builder:
    def __init__(self, sock: socket.socket, settings: Settings, priority: Priority | None = None) -> None:
        self.sock = sock
        self.engine = Engine(settings)        # for ``prepare`` and the last zone built
        self.sent = False
        self.priority = priority if priority is not None else Priority()

    def send(self, msg: Any) -> None:
        self.sock.sendall(frame(msg))

    def publish(self, view: Any) -> None:
        """Build the zone of ``view`` on the last one and send it: whole the first time,
        then only the names that changed."""
        started = time.perf_counter()
        update = self.engine.prepare(view, self.engine.zone)
        took = time.perf_counter() - started
        if update is None:
            return                            # logged; the parent keeps the last zone
        zone = self.engine.zone = update.zone
        changed = update.changed if self.sent else None
        self.send(("zone", zone.index, zone.soa, zone.services, names_payload(zone.names, changed), changed))
        self.send(("built", took))
        self.sent = True
        self.priority.after_change()

    async def run(self, access: Any, timeout: float) -> None:
        from discovery.consul import Mirror, MirrorError

        loop = asyncio.get_running_loop()
        parent_gone = loop.create_future()
        loop.add_reader(self.sock.fileno(), lambda: parent_gone.done() or parent_gone.set_result(None))
        started = False

        def changed(view: Any) -> None:
            if started:
                self.publish(view)

        def reachability(_reachable: bool) -> None:
            self.send(("catalog", mirror.catalog_state()))

        mirror = Mirror(access, on_change=changed, on_reachability=reachability)
        try:
            try:
                await mirror.start(timeout)
            except MirrorError as exc:
                self.send(("error", str(exc)))
                return
            started = True
            self.publish(mirror.view)
            await parent_gone
        finally:
            await mirror.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent handles Ctrl-C
    os.nice(NICE)
    sock = socket.socket(fileno=int(argv[0]))
    try:
        config = read_frame(sock)
    except (EOFError, OSError):
        return 0
    setup_logging(config.get("log_level", "INFO"))
    import uvloop

    builder = _Builder(sock, config["settings"])
    try:
        uvloop.run(builder.run(config["access"], config["timeout"]))
    except (BrokenPipeError, ConnectionResetError):
        pass                                          # the parent went away mid-send
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
