"""``meshlet dns`` / ``python -m discovery.dns``: flags, start-up and shut-down.

Start-up order: parse flags -> load the first catalog View (Mirror; fail with exit 1 if
the catalog does not answer within ``--start-timeout``) -> bind every listener -> print
``ready {...}``. Answering before the first View would send NXDOMAIN for every service,
which resolvers cache; so the server is not ready until it knows the catalog. After that
the Mirror's blocking queries keep the zone current (no polling) and keep the last good
View while the catalog is unreachable. The Mirror and the zone builds run in a child
process (``_watch.CatalogProcess``); the answering loop only applies the names that changed.

Shut-down (SIGTERM/SIGINT): close listeners and connections, stop the Mirror, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

import config

from ._engine import Engine
from ._forward import Forwarder
from ._server import Listeners
from ._zone import DEFAULT_NEGATIVE_TTL, DEFAULT_TTL, MODES, Settings

__all__ = ["main", "build_parser"]

log = logging.getLogger("discovery.dns")

_DNS = config.MESH_DEFAULTS.dns


def _duration(text: str) -> float:
    try:
        return float(config.parse_duration(text))
    except (config.UnitError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(text: str) -> int:
    seconds = _duration(text)
    if seconds >= 2**31:
        raise argparse.ArgumentTypeError(f"TTL too large: {text!r}")
    return int(round(seconds))


def _hostport(default_port: int) -> Callable[[str], tuple[str, int]]:
    def parse(text: str) -> tuple[str, int]:
        try:
            return config.split_hostport(text, default_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


_listen = _hostport(config.split_hostport(_DNS.listen[0])[1])
_recursor = _hostport(53)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshlet dns",
        description="Answer <service>.service.<domain> over UDP and TCP from the catalog.")
    p.add_argument("--listen", action="append", type=_listen, metavar="HOST:PORT",
                   help=f"address to answer on, UDP and TCP (repeatable; default {_DNS.listen[0]}; port 0 = any)")
    config.add_catalog_arguments(p, default_url=config.DEFAULT_CATALOG_URL)
    p.add_argument("--domain", default=config.MESH_DEFAULTS.domain,
                   help=f"DNS domain (default {config.MESH_DEFAULTS.domain})")
    p.add_argument("--mode", choices=MODES, default=_DNS.mode,
                   help="A/AAAA answer: the service VIP (vip, default) or its ready instances (endpoints); "
                        "a service's spec dns.mode overrides it")
    p.add_argument("--ttl", type=_ttl, default=DEFAULT_TTL, metavar="DURATION",
                   help=f"TTL of service and node records (default {DEFAULT_TTL}s: changes reach clients at once)")
    p.add_argument("--negative-ttl", type=_ttl, default=DEFAULT_NEGATIVE_TTL, metavar="DURATION",
                   help=f"SOA minimum: how long NXDOMAIN/NODATA may be cached (default {DEFAULT_NEGATIVE_TTL}s)")
    ready = p.add_mutually_exclusive_group()
    ready.add_argument("--only-passing", dest="include_warning", action="store_false",
                       help="answer only instances whose checks all pass (default)")
    ready.add_argument("--include-warning", dest="include_warning", action="store_true",
                       help="also answer instances with a warning check")
    p.set_defaults(include_warning=not _DNS.only_passing)
    p.add_argument("--recursor", action="append", type=_recursor, default=[], metavar="HOST:PORT",
                   help="where names outside the domain go, tried in order (repeatable; none: REFUSED)")
    p.add_argument("--recursor-timeout", type=_duration, default=2.0, metavar="DURATION",
                   help="time-out per recursor try (default 2s)")
    p.add_argument("--start-timeout", type=_duration, default=30.0, metavar="DURATION",
                   help="how long to wait for the catalog at start (default 30s)")
    p.add_argument("--tcp-idle-timeout", type=_duration, default=10.0, metavar="DURATION",
                   help="close idle TCP connections after this (default 10s)")
    p.add_argument("--max-tcp-connections", type=int, default=512, metavar="N",
                   help="open TCP connections at most (default 512)")
    p.add_argument("--udp-io", choices=["auto", "plain"], default="auto",
                   help="auto: batched recvmmsg/sendmmsg where available (Linux); plain: recvfrom/sendto")
    p.add_argument("--metrics", type=_hostport(0), metavar="HOST:PORT",
                   help="serve Prometheus /metrics and /ready (catalog reachability) over HTTP here")
    p.add_argument("--log-level", default=os.environ.get("MESHLET_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _ns_addresses(listens: list[tuple[str, int]]) -> tuple[str, ...]:
    out = []
    for host, _port in listens:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_unspecified and str(ip) not in out:
            out.append(str(ip))
    return tuple(out)


async def _serve(args: argparse.Namespace) -> int:
    from discovery.consul import CatalogAccessError, MirrorError, access_from_args  # only the server needs it

    from ._metrics import Counters, start_metrics
    from ._watch import CatalogProcess

    try:
        access = access_from_args(args, os.environ)
    except CatalogAccessError as exc:
        log.error("%s", exc)
        return 2

    listens = args.listen or [config.split_hostport(a) for a in _DNS.listen]
    settings = Settings(domain=args.domain, mode=args.mode, ttl=args.ttl, negative_ttl=args.negative_ttl,
                        include_warning=args.include_warning, forwarding=bool(args.recursor),
                        ns_addresses=_ns_addresses(listens))
    engine = Engine(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    mirror = CatalogProcess(access, engine, args.log_level)
    counters = Counters()
    mirror.on_built = counters.built
    try:
        start = asyncio.ensure_future(mirror.start(args.start_timeout))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            await mirror.close()
            return 0
        stopping.cancel()
        start.result()                       # the engine serves the first View's zone now
    except MirrorError as exc:
        log.error("%s", exc)
        await mirror.close()
        return 1

    forwarder = Forwarder(args.recursor, args.recursor_timeout) if args.recursor else None
    runner = None
    listeners = Listeners(engine, forwarder, idle_timeout=args.tcp_idle_timeout,
                          max_tcp=args.max_tcp_connections, batched=args.udp_io == "auto")
    listeners.shared.counters = counters
    try:
        ready: dict[str, str] = {}
        for i, (host, port) in enumerate(listens):
            udp, tcp = await listeners.bind(host, port)
            suffix = "" if i == 0 else str(i + 1)
            ready["udp" + suffix], ready["tcp" + suffix] = udp, tcp
            log.info("answering %s on udp %s and tcp %s", settings.domain, udp, tcp)
        if args.metrics is not None:
            host, port = args.metrics
            runner, ready["metrics"] = await start_metrics(host, port, counters=counters,
                                                          engine=engine, catalog=lambda: mirror.catalog)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        await listeners.close()
        await mirror.close()
        return 1
    # Everything allocated so far (modules, the first zone) lives for the whole run: keep
    # it out of the cyclic collector's scans so collections stay short on the query path.
    gc.freeze()
    sys.stdout.write("ready " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        if runner is not None:
            await runner.cleanup()
        await listeners.close()
        await mirror.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the DNS server until SIGTERM/SIGINT. Returns the exit status."""
    args = build_parser().parse_args(argv)
    config.setup_logging(args.log_level)
    try:
        settings_check = Settings(domain=args.domain)  # fail early on a bad domain
        del settings_check
    except ValueError as exc:
        print(f"meshlet dns: {exc}", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(_serve(args))
