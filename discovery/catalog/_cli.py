"""``python -m discovery.catalog``: run the embedded catalog until SIGTERM/SIGINT.

Prints ``ready {"http": "host:port"}`` (``{"https": ...}`` with TLS) on stdout once the
listener is bound; logs go to stderr. Exit status: 0 after a clean stop, 1 if it could not start, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import config

from ._server import CatalogServer, Options

__all__ = ["main", "parse_args"]

log = logging.getLogger("discovery.catalog")


def _host_port(text: str) -> tuple[str, int]:
    try:
        return config.split_hostport(text, default_host="127.0.0.1")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    from ._decode import DecodeError, parse_go_duration

    try:
        return parse_go_duration(text) / 1e9
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="meshlet catalog", description="Embedded Consul-compatible catalog.")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8500), metavar="HOST:PORT",
                   help="HTTP API address (port 0 picks a free port); default 127.0.0.1:8500")
    p.add_argument("--data-dir", default=".meshlet/catalog", help="where the SQLite state lives")
    p.add_argument("--node", default="meshlet", help="this node's name in the catalog (default: meshlet)")
    p.add_argument("--datacenter", default="dc1")
    p.add_argument("--session-ttl-min", type=_seconds, default=10.0, metavar="DURATION",
                   help="shortest session TTL accepted (Consul's session_ttl_min); default 10s")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--enable-script-checks", action="store_true",
                   help="run script checks (Args) registered over HTTP or in config files (off, as in Consul)")
    p.add_argument("--enable-local-script-checks", action="store_true",
                   help="run script checks defined in config files only (off, as in Consul)")
    p.add_argument("--config-file", action="append", default=[], metavar="FILE",
                   help="Consul-style JSON config (services, checks, script flags, log_level); repeatable; "
                        "re-read on SIGHUP and PUT /v1/agent/reload")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="every *.json file in DIR, in name order, as --config-file")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"the management token's file, made (0600) at the first start; every request but "
                        f"/v1/status/* must send the token (default DATA_DIR/{config.CATALOG_TOKEN_FILE})")
    p.add_argument("--tls-cert-file", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key-file", metavar="FILE", help="...and this private key (PEM)")
    p.add_argument("--tls-client-ca-file", metavar="FILE",
                   help="require client certificates signed by this CA (Consul's verify_incoming)")
    a = p.parse_args(argv)
    if bool(a.tls_cert_file) != bool(a.tls_key_file):
        p.error("--tls-cert-file and --tls-key-file go together")
    if a.tls_client_ca_file and not a.tls_cert_file:
        p.error("--tls-client-ca-file needs --tls-cert-file and --tls-key-file (client certificates need HTTPS)")
    config.setup_logging(a.log_level)
    host, port = a.listen
    return Options(host=host, port=port, data_dir=a.data_dir, node=a.node, datacenter=a.datacenter,
                   session_ttl_min=a.session_ttl_min, enable_script_checks=a.enable_script_checks,
                   enable_local_script_checks=a.enable_local_script_checks,
                   config_paths=tuple(a.config_file) + tuple(a.config_dir), log_level=a.log_level,
                   token_file=a.token_file, tls_cert_file=a.tls_cert_file, tls_key_file=a.tls_key_file,
                   tls_client_ca_file=a.tls_client_ca_file)


async def _serve(opts: Options) -> int:
    server = CatalogServer(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:  # SIGHUP: re-read the config files, as Consul does
        task = loop.create_task(server.reload())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged by reload

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        host, port = await server.start()
    except Exception as exc:
        log.error("catalog could not start: %s", exc)
        await server.stop()
        return 1
    sys.stdout.write("ready " + json.dumps({opts.scheme: config.join_hostport(host, port)}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    log.info("stopping")
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2)
        return int(exc.code or 0)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable
        return asyncio.run(_serve(opts))
    return uvloop.run(_serve(opts))
