"""meshlet's data plane: an HTTP/1.1 and TCP proxy routing to the ready instances in the catalog.

``meshlet proxy --consul URL --listen 127.0.0.1:8080 [--workers N|auto] [--admin 127.0.0.1:9901]``
(or ``python -m proxy``). Once every listener is bound it prints one line,
``ready {"http": ["127.0.0.1:8080"], "admin": "127.0.0.1:9901"}`` (with TLS listeners also
``"https": [...]``, those of ``http`` that terminate TLS), and logs everything else to
stderr. SIGTERM/SIGINT drain (``--drain-timeout``) and exit 0. A TLS file that cannot be
used at start: one error line naming it and what is wrong, exit 1.

TLS (``_tls``): ``--listen '{address: HOST:PORT, tls: {cert_file, key_file, certificates:
[{hosts, cert_file, key_file}]}}'`` terminates TLS 1.2/1.3, the certificate chosen by SNI;
``--upstream-tls '{service, ca_file, server_name}'`` speaks TLS to that service's
instances, verified. The files are re-read when they change (every second); a bad file
then is logged and shown in ``/tls`` and ``/metrics``, and the certificates in force stay.

Layout: ``_framing`` (pure message-head rules and their memo), ``_http1`` (client
connections), ``_tls`` (certificates and their reload), ``_exchange`` (one request: attempts, retries, time-outs) with ``_relay``
(its response side) and ``_decisions`` (its pure rules), ``_upstream`` (upstream
connections and pools), ``_tcp`` (TCP VIPs), ``_listen`` (listening sockets and their
accept loop; plain HTTP to a TLS port), ``_server`` (listeners, table, sweep, drain),
``_workers`` (``--workers N``); routing and balancing: ``_routes``, ``_balance``,
``_outlier``, ``_retry``; observability: ``_metrics``, ``_admin``.

Time-outs: connect (``timeouts.connect``), per try (``retries.per_try_timeout``, from the
request being sent to the response head), overall (``timeouts.request``, from the client's
request being complete to the response head, across retries; 0 = none), idle
(``timeouts.idle``: no byte either way while a body streams; also the upstream keep-alive
idle time, capped at 30 s), request head (``--header-timeout``), client keep-alive idle
(``--idle-timeout``).

Default per try: Envoy and HAProxy have none (a frozen or vanished upstream holds a request
for the whole route time-out). Here, on a route without ``per_try_timeout``, a GET, HEAD,
OPTIONS or TRACE with no response head ``HEDGE_AFTER`` (2 s) after it was sent is also sent
to another endpoint, and the first response head wins (Envoy's
``hedge_on_per_try_timeout``): the first attempt is never cut short, so a slow answer still
arrives; once per request, within the retry attempts and budget.

Endpoints leaving: when an instance leaves the table (deregistered, not passing) its idle
pooled connections are closed at once; requests in flight on it finish there; retries
pick from the current table, never from the one the request began with. A connect
failure (nothing sent) is retried for any method outside the retry budget, with its own
allowance of ``attempts`` + one per endpoint, so that every endpoint gets a chance.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import signal
import sys
from typing import Any

import config

__all__ = ["main", "parse_args", "serve"]

log = logging.getLogger("meshlet.proxy")


_PROXY = config.MESH_DEFAULTS.proxy


def _hostport(value: str) -> tuple[str, int]:
    try:
        return config.split_hostport(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type) -> Any:
    def parse(value: str) -> Any:
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {value!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {value!r}")
        return v
    return parse


def _listener(value: str) -> config.ProxyListener:
    try:
        return config.proxy_listener(value)
    except config.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _upstream_tls(value: str) -> config.UpstreamTls:
    try:
        return config.upstream_tls(value)
    except config.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_count(value: str) -> int | str:
    if value == "auto":
        return value
    return _positive(int)(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshlet proxy", description="HTTP/1.1 and TCP proxy to the ready "
                                "instances of the services in the catalog.")
    config.add_catalog_arguments(p, default_url=config.DEFAULT_CATALOG_URL)
    p.add_argument("--listen", action="append", type=_listener, metavar="HOST:PORT|{...}",
                   help="entry listener, routing by Host and path (repeatable): HOST:PORT, or a "
                        "mesh.proxy.listen item as YAML/JSON, e.g. '{address: 127.0.0.1:8443, tls: "
                        "{cert_file: c.pem, key_file: k.pem}}' (relative paths: to the current directory) "
                        f"[{_PROXY.listen[0].address}]")
    p.add_argument("--upstream-tls", action="append", type=_upstream_tls, default=[], metavar="{...}",
                   help="TLS to a service's instances (repeatable): a mesh.proxy.upstream_tls item, "
                        "e.g. '{service: api, ca_file: ca.pem, server_name: api.internal}'")
    p.add_argument("--admin", type=_hostport, metavar="HOST:PORT",
                   help="admin listener: /metrics, /routes, /ready (with --workers: of all workers)")
    # Run alone the proxy is one process unless asked (mesh.proxy.workers, which `meshlet
    # up` passes, defaults to auto).
    p.add_argument("--workers", type=_worker_count, default=1,
                   help="processes sharing the listeners, or auto: one per CPU [%(default)s]")
    p.add_argument("--domain", default=config.MESH_DEFAULTS.domain,
                   help="DNS domain of <service>.service.<domain> [%(default)s]")
    p.add_argument("--drain-timeout", type=_positive(float), default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM [10]")
    p.add_argument("--access-log", action="store_true", help="JSON access log lines on stderr")
    p.add_argument("--max-connections", type=_positive(int), default=10000,
                   help="client connections per process before new ones get 503 [10000]")
    p.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="seconds to receive a request head [10]")
    p.add_argument("--idle-timeout", type=_positive(float), default=60.0,
                   help="seconds an idle client keep-alive connection stays open [60]")
    p.add_argument("--catalog-timeout", type=_positive(float), default=10.0,
                   help="seconds to wait for the first catalog view at start [10]")
    p.add_argument("--log-level", default=os.environ.get("MESHLET_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.listen:
        args.listen = list(_PROXY.listen)
    addresses = [listener.address for listener in args.listen if not listener.address.endswith(":0")]
    if len(set(addresses)) != len(addresses):   # (port 0: any free port, each its own)
        p.error(f"--listen: an address is given twice: {', '.join(addresses)}")
    services = [u.service for u in args.upstream_tls]
    if len(set(services)) != len(services):
        p.error(f"--upstream-tls: a service is given twice: {', '.join(services)}")
    args.workers = config.resolve_workers(args.workers)
    return args


def load_tls(args: argparse.Namespace, metrics: Any = None) -> tuple[list[Any], dict[str, Any]]:
    """The TLS side of each ``--listen`` (None for plain HTTP) and the upstream TLS by
    service, their files loaded and checked; TlsFileError names the first file that
    cannot be used."""
    from ._tls import TlsListener, UpstreamTls

    listeners = [TlsListener(item.address, item.tls, metrics) if item.tls is not None else None
                 for item in args.listen]
    upstreams = {}
    for item in args.upstream_tls:
        upstreams[item.service] = u = UpstreamTls(item, args.domain, metrics)
        u.publish(item.service)
    return listeners, upstreams


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def serve(args: argparse.Namespace) -> int:
    """One proxy process (the only one, or one worker): load, bind, ready, drain."""
    from discovery.consul import CatalogAccessError, Mirror, MirrorError, access_from_args

    from ._admin import start_admin
    from ._metrics import Metrics
    from ._routes import build_table
    from ._server import Limits, ProxyServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    from ._tls import TlsFileError

    metrics = Metrics()
    try:
        tls_listeners, upstream_tls = load_tls(args, metrics)
    except TlsFileError as exc:
        log.error("TLS: %s", exc)
        return 1
    limits = Limits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                    client_idle_timeout=args.idle_timeout)
    server = ProxyServer(metrics, limits, reuse_port=args.workers > 1, access_log=args.access_log)
    server.upstream_tls = upstream_tls

    def on_change(view: Any) -> None:
        try:
            table = build_table(view, domain=args.domain, previous=server.table, metrics=metrics)
        except Exception:  # noqa: BLE001 - keep serving the last good table
            log.exception("route table rebuild failed at catalog index %s; keeping the previous table",
                          getattr(view, "index", "?"))
            return
        server.set_table(table)

    try:
        access = access_from_args(args, os.environ)
    except CatalogAccessError as exc:
        log.error("%s", exc)
        return 2
    mirror = Mirror(access, on_change=on_change)
    metrics.catalog_up = lambda: mirror.catalog_reachable
    try:
        view = await mirror.start(timeout=args.catalog_timeout)
    except MirrorError as exc:
        log.error("%s", exc)
        return 1
    if server.table is None:  # on_change may already have delivered a newer view
        server.set_table(build_table(view, domain=args.domain, metrics=metrics))

    runner = None
    bound: list[str] = []
    https: list[str] = []
    try:
        for listener, tls in zip(args.listen, tls_listeners):
            host, port = config.split_hostport(listener.address)
            bound.append(config.join_hostport(*await server.listen(host, port, tls)))
            if tls is not None:
                https.append(bound[-1])
        await server.vips_settled()
        ready: dict[str, Any] = {"http": bound}   # every entry listener, in --listen order
        if https:
            ready["https"] = https                # those of them that terminate TLS
        if args.admin is not None:   # (a worker's: internal, the parent serves the address)
            runner, admin_port = await start_admin(args.admin[0], args.admin[1], get_table=lambda: server.table,
                                                   metrics=metrics, is_ready=lambda: not server.draining,
                                                   get_draining=server.draining_endpoints,
                                                   get_vip_failures=server.vip_failure_list,
                                                   get_tls=server.tls_status, get_catalog=mirror.catalog_state)
            ready["admin"] = config.join_hostport(args.admin[0], admin_port)
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await mirror.close()
        return 1
    server.start_sweep()
    # Everything allocated so far lives as long as the process: keep it out of the
    # collector's generations so full collections do not walk the imported modules.
    gc.collect()
    gc.freeze()
    sys.stdout.write("ready " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("proxy ready: %s (catalog %s, %d services)", json.dumps(ready), args.consul,
             len(view.services))

    await stop.wait()
    log.info("draining (up to %.1fs)", args.drain_timeout)
    await server.drain(args.drain_timeout)
    await mirror.close()
    if runner is not None:
        await runner.cleanup()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config.setup_logging(args.log_level)
    _raise_nofile()
    import uvloop

    if args.workers > 1 and args.worker_index is None:
        from ._workers import supervise

        return uvloop.run(supervise(args))
    if args.worker_index is not None:
        config.die_with_parent()   # a worker goes with its parent, even one killed by SIGKILL
    try:
        return uvloop.run(serve(args))
    except KeyboardInterrupt:
        return 0
