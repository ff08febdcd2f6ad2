"""``--workers N``: a parent that starts N proxy processes sharing the listeners.

Each worker is a full proxy (``python -m proxy ... --worker-index i``) with its own catalog
Mirror and route table, binding every listener with SO_REUSEPORT so the kernel spreads
connections over them. The parent binds each entry listener first (without listening:
a bound, non-listening socket receives no connections) to resolve port 0 and to hold the
port while a worker restarts. The parent serves the admin listener: each worker runs an
internal one on 127.0.0.1 (a free port, reported in its ready line), and the parent
answers ``/metrics``, ``/routes`` and ``/ready`` from all of them (``_admin``), so the
metrics count every worker's traffic and a rollout waits for requests in flight on a
retired replica in any worker.

The parent prints the ready line once every worker printed its own, restarts a worker
that exits unexpectedly (1 s backoff, doubling to 30 s), forwards SIGTERM/SIGINT, waits
for the workers to drain and exits 0 when they all did.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import config
from config import join_hostport, module_argv

__all__ = ["supervise", "worker_argv"]

log = logging.getLogger("meshlet.proxy.workers")

def worker_argv(args: argparse.Namespace, index: int, listens: list[config.ProxyListener]) -> list[str]:
    """The command line of worker ``index`` (pure: tested directly). ``listens``: the
    listeners with the ports the parent holds."""
    argv = module_argv("proxy", "--consul", args.consul, "--workers", str(args.workers),
            "--worker-index", str(index), "--domain", args.domain, "--drain-timeout", repr(args.drain_timeout),
            "--max-connections", str(args.max_connections), "--header-timeout", repr(args.header_timeout),
            "--idle-timeout", repr(args.idle_timeout), "--catalog-timeout", repr(args.catalog_timeout),
            "--log-level", args.log_level)
    for listener in listens:
        argv += ["--listen", config.proxy_listener_arg(listener)]
    for item in args.upstream_tls:
        argv += ["--upstream-tls", config.upstream_tls_arg(item)]
    if args.admin is not None:
        argv += ["--admin", "127.0.0.1:0"]   # internal: the parent serves args.admin
    if args.access_log:
        argv.append("--access-log")
    # the catalog's TLS files and token file; a token from $CONSUL_HTTP_TOKEN reaches the
    # workers in the environment they inherit, never in their argv
    for flag, value in (("--token-file", args.token_file), ("--ca-file", args.ca_file),
                        ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if value:
            argv += [flag, value]
    return argv


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str] | None) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] | None = None

    async def spawn(self, timeout: float) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdout=asyncio.subprocess.PIPE,
                                                         stdin=asyncio.subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("ready "):
            await self.proc.wait()
            raise RuntimeError(f"worker {self.index} exited with {self.proc.returncode} before it was ready")
        self.ready = json.loads(text[6:])
        return self.ready


async def supervise(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from . import load_tls
    from ._tls import TlsFileError
    try:
        load_tls(args)   # each worker loads them again; a bad file is reported once, here
    except TlsFileError as exc:
        log.error("TLS: %s", exc)
        return 1
    held: list[socket.socket] = []
    listens: list[config.ProxyListener] = []
    try:
        for listener in args.listen:
            host, port = config.split_hostport(listener.address)
            s = _reserve(host, port)
            held.append(s)
            listens.append(dataclasses.replace(listener, address=join_hostport(host, s.getsockname()[1])))
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        for s in held:
            s.close()
        return 1
    workers = [_Worker(i, worker_argv(args, i, listens), None) for i in range(args.workers)]
    admin = None
    if args.admin is not None:
        from ._admin import start_workers_admin

        def peers() -> list[str]:
            return [w.ready["admin"] for w in workers
                    if w.ready and "admin" in w.ready and w.proc is not None and w.proc.returncode is None]
        try:
            admin, admin_port = await start_workers_admin(args.admin[0], args.admin[1], peers=peers,
                                                          is_draining=stop.is_set, workers=args.workers)
        except OSError as exc:
            log.error("cannot listen on the admin address: %s", exc)
            for s in held:
                s.close()
            return 1
    start_timeout = args.catalog_timeout + 15.0
    try:
        await asyncio.gather(*(w.spawn(start_timeout) for w in workers))
    except (RuntimeError, asyncio.TimeoutError, OSError) as exc:
        log.error("workers did not start: %s", exc or "time-out")
        await _stop_all(workers, args.drain_timeout)
        if admin is not None:
            await admin.cleanup()
        return 1
    ready: dict[str, Any] = {"http": [listener.address for listener in listens]}
    if any(listener.tls is not None for listener in listens):
        ready["https"] = [listener.address for listener in listens if listener.tls is not None]
    if admin is not None:
        ready["admin"] = join_hostport(args.admin[0], admin_port)
    sys.stdout.write("ready " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("proxy ready with %d workers: %s", args.workers, json.dumps(ready))

    backoff = {w.index: 1.0 for w in workers}
    while not stop.is_set():
        waits = {asyncio.ensure_future(w.proc.wait()): w for w in workers if w.proc is not None}  # type: ignore[union-attr]
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        for f in waits:
            if f not in done:
                f.cancel()
        if stopper not in done:
            stopper.cancel()
        if stop.is_set():
            break
        for f in done:
            w = waits.get(f)
            if w is None:
                continue
            log.error("worker %d exited with %s; restarting in %.0fs", w.index, w.proc.returncode, backoff[w.index])
            try:
                await asyncio.wait_for(stop.wait(), backoff[w.index])
                break
            except asyncio.TimeoutError:
                pass
            backoff[w.index] = min(backoff[w.index] * 2, 30.0)
            try:
                await w.spawn(start_timeout)
            except (RuntimeError, asyncio.TimeoutError, OSError) as exc:
                log.error("worker %d did not restart: %s", w.index, exc or "time-out")
    rc = await _stop_all(workers, args.drain_timeout)
    if admin is not None:
        await admin.cleanup()
    for s in held:
        s.close()
    return rc


async def _stop_all(workers: list[_Worker], drain_timeout: float) -> int:
    procs = [w.proc for w in workers if w.proc is not None and w.proc.returncode is None]
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)   # not send_signal: its poll() would reap before asyncio's watcher
        except ProcessLookupError:
            pass
    rc = 0
    for p in procs:
        try:
            code = await asyncio.wait_for(p.wait(), drain_timeout + 5.0)
        except asyncio.TimeoutError:
            log.error("worker pid %d did not stop in time; killing it", p.pid)
            p.kill()
            code = await p.wait()
        if code != 0:
            rc = 1
    return rc
