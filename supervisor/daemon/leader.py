"""One supervisor acts; the others stand by: the leader lock.

Every supervisor (``meshlet up``, ``meshlet supervisor``) takes ``meshlet/leader`` in the
catalog through a Consul session before it acts. The others wait on the key with a
blocking query; when the leader stops (its session released) or dies (its session
expires), one of them takes the key, observes everything in full and adopts every running
workload, restarting none (``Supervisor.start``).

Timings (Consul semantics; the embedded catalog that ``meshlet up`` starts accepts the
short TTL, a Consul agent needs ``session_ttl_min`` <= 5s or the TTL falls back to 10 s):

    session TTL 5 s, renewed every second. Consul invalidates an unrenewed session after
    TTL x 2 = 10 s; a new holder then waits the 1 s lock-delay. kill -9 of the leader:
    a standby leads about 11 s later, then adopts (bench/leader measures it). A supervisor
    restarted on the leader's own host after it died does not wait: the lock names the
    holder's host, pid and process start time, and a holder whose process is gone has its
    session destroyed at once.

    fencing: a leader whose last successful renewal is 4 s old (< the TTL: the earliest
    Consul may invalidate it) stops acting (``Supervisor.fence``: no start, stop, write or
    sync), steps down and stands by. A new leader can act no earlier than TTL + lock-delay
    after that renewal, so two never act at once, even across a partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import consul

import config
from discovery.consul import CatalogAccess, LeaderLock, connect

from .supervisor import Supervisor

__all__ = ["lead", "holder_is_gone", "LEADER_TTL", "LOCK_DELAY", "RENEW_EVERY", "LOSE_AFTER", "FALLBACK_TTL"]

log = logging.getLogger("supervisor.leader")

LEADER_TTL = 5.0
FALLBACK_TTL = 10.0       # Consul's default session_ttl_min
RENEW_EVERY = 1.0
LOSE_AFTER = LEADER_TTL - 1.0
LOCK_DELAY = 1.0


def _started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, it names one process for good (a pid is reused, the pair is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def holder_is_gone(raw: bytes | None, host: str) -> bool:
    """Does the lock's value name a supervisor on this host whose process has ended (a
    kill -9, a crash)? Its session would hold the lock until its TTL runs out; a restart
    on the same host need not wait for that."""
    try:
        who = json.loads(raw or b"")
    except ValueError:
        return False
    if not isinstance(who, dict) or who.get("host") != host or not isinstance(who.get("pid"), int):
        return False
    return who["pid"] != os.getpid() and _started(who["pid"]) != who.get("started")


def _lock(client: Any, ttl: float, who: dict[str, Any]) -> LeaderLock:
    return LeaderLock(client, config.LEADER_KEY, ttl=f"{ttl:g}s", name="meshlet-supervisor",
                      value=json.dumps(who).encode(), lock_delay=f"{LOCK_DELAY:g}s",
                      renew_every=RENEW_EVERY if ttl == LEADER_TTL else ttl / 5,
                      lose_after=ttl - 1.0)


async def _acquire(lock: LeaderLock, stop: asyncio.Event) -> bool:
    """Wait for the lock or ``stop``; True when held."""
    acquiring = asyncio.ensure_future(lock.acquire())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([acquiring, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if acquiring.done():
        acquiring.result()      # a rejected session raises here
        return True
    acquiring.cancel()
    await asyncio.gather(acquiring, return_exceptions=True)
    return False


async def lead(url: str | CatalogAccess, make: Callable[[Callable[[], bool]], Supervisor], stop: asyncio.Event, *,
               on_lead: Callable[[Supervisor], Awaitable[None]],
               on_step_down: Callable[[Supervisor], Awaitable[None]],
               stop_workloads: Callable[[], bool], out: TextIO, admin: str | None = None) -> None:
    """Until ``stop``: stand by for the lock, lead (``make(fence)``, ``start()``,
    ``on_lead``) until ``stop`` or the lock is lost or stale, then step down
    (``on_step_down``; ``close`` with ``stop_workloads()`` when stopping, else leaving
    every workload running for the next leader) and stand by again."""
    client = connect(url, timeout=40.0)
    who = {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid()), "admin": admin}
    ttl = LEADER_TTL
    lock = _lock(client, ttl, who)
    try:
        while not stop.is_set():
            try:
                _, entry = await client.kv.get(config.LEADER_KEY)
            except Exception as exc:  # noqa: BLE001 - acquire() below waits for the catalog
                print(f"meshlet: standing by: the catalog does not answer ({exc or type(exc).__name__})",
                      file=out, flush=True)
                entry = None
            if entry is not None and entry.get("Session"):
                holder = (entry.get("Value") or b"").decode(errors="replace")
                if holder_is_gone(entry.get("Value"), who["host"]):
                    print(f"meshlet: the last leader on this host is gone ({holder}): taking over",
                          file=out, flush=True)
                    await client.session.destroy(entry["Session"])
                else:
                    print(f"meshlet: standing by: another supervisor leads ({holder})", file=out, flush=True)
            try:
                if not await _acquire(lock, stop):
                    return
            except consul.ConsulException as exc:
                if ttl == FALLBACK_TTL or "TTL" not in str(exc):
                    raise
                log.info("the catalog refuses a %gs session TTL (%s): using %gs", ttl, exc, FALLBACK_TTL)
                ttl = FALLBACK_TTL
                lock = _lock(client, ttl, who)
                continue
            sup = make(lock.fresh)
            stepped = False
            try:
                await sup.start()
                await on_lead(sup)
                waits = [asyncio.ensure_future(e.wait()) for e in (stop, lock.lost, sup.fenced)]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if not stop.is_set():
                    why = "the leader lock is stale" if sup.fenced.is_set() else "the leader lock was lost"
                    print(f"meshlet: stepping down: {why}; workloads keep running", file=out, flush=True)
                stepped = True
                await on_step_down(sup)
            finally:
                if not stepped:
                    await on_step_down(sup)
                await sup.close(stop=stop.is_set() and stop_workloads())
                await lock.release()
                lock = _lock(client, ttl, who)
    finally:
        await lock.release()
        await client.close()
