"""The ``meshlet`` command: the one entry point of meshlet, and the one composition root.

Every subcommand is declared here, once, and handed to the module that runs it::

    meshlet catalog ...            discovery.catalog.main(argv)   the embedded catalog
    meshlet dns ...                discovery.dns.main(argv)       the DNS server
    meshlet proxy ...              proxy.main(argv)               the proxy
    meshlet up -f FILE [--keep]    daemon.up.up                   everything on this machine
    meshlet supervisor --consul URL --data-dir DIR
                                   daemon.up.run_standalone       the supervisor alone
    meshlet apply -f FILE          commands.apply                 store services in the catalog
    meshlet plan -f FILE [--json]  commands.plan                  where apply would place replicas
    meshlet node run --catalog URL --address IP
                                   daemon.node_side.run_node      a fleet host's DNS and proxy
    meshlet status | logs | events | down | explain | node ls|cordon|uncordon|drain | volume ls|rm | rebalance
                                   commands.admin_client          ask the running supervisor
    meshlet rollout status|history|pause|resume, rollback, restart
                                   commands.rollout               rollouts, through the catalog
    meshlet secret set|ls|rm|rotate-key
                                   commands.secret                the mesh's secrets
    meshlet scale SERVICE N        commands.scale                 set a service's replicas
    meshlet version

``catalog``, ``dns`` and ``proxy`` own their whole command line and are imported only when
asked for; so are the daemon and each command's module. Exit codes: 0 ok, 1 runtime
failure (catalog unreachable, child failed), 2 usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import config

from .commands import admin_client, plan, rollout, scale, secret

__all__ = ["main", "build_parser"]

# subcommand -> module whose main(argv) takes over
HANDOVER = {"catalog": "discovery.catalog", "dns": "discovery.dns", "proxy": "proxy"}


def _version() -> str:
    try:
        return version("meshlet")
    except PackageNotFoundError:
        return "unknown"


def _daemon_subcommands(sub: Any) -> None:
    up = sub.add_parser("up", help="run the mesh on this machine (catalog, DNS, proxy, supervisor) "
                                   "and apply FILE, until Ctrl-C")
    up.add_argument("-f", "--file", required=True, help="the meshlet.yaml to run")
    up.add_argument("--keep", action="store_true",
                    help="on exit leave the workloads running for the next `meshlet up` to adopt")

    sup = sub.add_parser("supervisor", help="run the supervisor alone against a running catalog "
                                            "(no catalog, DNS or proxy of its own; no apply)")
    config.add_catalog_arguments(sup, url_required=True)
    sup.add_argument("--data-dir", required=True, help="state of the nodes' runtimes")
    sup.add_argument("--admin", metavar="HOST:PORT", help="serve the admin API here (loopback)")
    sup.add_argument("--stop-on-exit", action="store_true",
                     help="deregister and stop the workloads when stopped")
    sup.add_argument("--runtime", choices=config.RUNTIME_NAMES,
                     help="the local node's runtime (default: docker if an engine answers)")
    sup.add_argument("--engine", metavar="URL",
                     help="run the local node on this Docker engine (e.g. unix:///path/docker.sock); "
                          "implies --runtime docker")
    sup.add_argument("--dns", metavar="IP", help="resolver (port 53) named in the containers' resolv.conf")
    sup.add_argument("--proxy-admin", action="append", default=[], metavar="HOST:PORT",
                     help="a proxy's admin API: retired replicas wait for its in-flight requests "
                          "before SIGTERM (repeatable)")
    key = sup.add_mutually_exclusive_group()
    key.add_argument("--secrets-key-file", metavar="PATH",
                     help="the mesh's key-encryption key file (default: DATA_DIR/secrets.key)")
    key.add_argument("--secrets-key-env", metavar="VAR", help="...or the variable holding it (base64)")


def _apply_subcommand(sub: Any) -> None:
    apply = sub.add_parser("apply", help="validate a meshlet.yaml and store its services in the catalog")
    apply.add_argument("-f", "--file", required=True, help="the meshlet.yaml to apply")
    apply.add_argument("--consul", metavar="URL",
                       help="catalog URL (default: $CONSUL_HTTP_ADDR, else the file's mesh.catalog)")
    apply.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    apply.add_argument("--prune", action="store_true", help="delete services that are not in the file")
    apply.add_argument("--force", action="store_true", help="with --prune: go on even if the file names no service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlet", description="A small-fleet orchestrator and service mesh.")
    parser.add_argument("--log-level", default=os.environ.get("MESHLET_LOG_LEVEL", "WARNING"),
                        help="logging level on stderr (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in HANDOVER.items():
        sub.add_parser(name, help=f"run the {name} ({module}); see `meshlet {name} --help`", add_help=False)
    _daemon_subcommands(sub)
    _apply_subcommand(sub)
    plan.add_subcommand(sub)
    admin_client.add_subcommands(sub)
    rollout.add_subcommands(sub)
    secret.add_subcommands(sub)
    scale.add_subcommands(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _handover(command: str, argv: list[str]) -> int:
    module_name = HANDOVER[command]
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"meshlet {command}: this component is not available ({module_name}: {exc})", file=sys.stderr)
        return 1
    entry = getattr(target, "main", None)
    if entry is not None and not callable(entry):  # a submodule named main
        entry = getattr(entry, "main", None)
    if entry is None:
        try:
            entry = importlib.import_module(module_name + ".__main__").main
        except (ImportError, AttributeError):
            print(f"meshlet {command}: this component is not available ({module_name} has no main())",
                  file=sys.stderr)
            return 1
    rc = entry(argv)
    return rc if isinstance(rc, int) else 0


def _command_position(argv: list[str]) -> int | None:
    i = 0
    while i < len(argv):
        if argv[i] == "--log-level":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return i
    return None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO, err: TextIO) -> int:
    if args.command == "version":
        print(f"meshlet {_version()}", file=out)
        return 0
    if args.command == "apply":
        from .commands import apply
        return asyncio.run(apply.run(args.file, url=args.consul, dry_run=args.dry_run, prune=args.prune,
                                     force=args.force, out=out, err=err))
    if args.command == plan.COMMAND:
        return plan.run(args.file, args.json, out, err)
    if args.command == "up":
        from .daemon.up import up
        try:
            return asyncio.run(up(args.file, keep=args.keep, out=out, err=err))
        except KeyboardInterrupt:
            return 130
    if args.command == "supervisor":
        if args.engine and args.runtime not in (None, "docker"):
            parser.error(f"--engine is a Docker engine; it cannot go with --runtime {args.runtime}")
        from pathlib import Path

        from .daemon.up import run_standalone
        from .secrets import KeySource
        key = KeySource(path=Path(args.secrets_key_file)) if args.secrets_key_file else \
            KeySource(env=args.secrets_key_env) if args.secrets_key_env else None
        from discovery.consul import CatalogAccessError, access_from_args
        try:
            access = access_from_args(args, os.environ)
        except CatalogAccessError as exc:
            parser.error(str(exc))
        return asyncio.run(run_standalone(access, args.data_dir, args.admin, args.stop_on_exit,
                                          args.runtime, args.dns, args.proxy_admin, args.engine, key))
    if args.command == "node" and args.node_command == "run":
        from .daemon.node_side import run_node
        try:
            return asyncio.run(run_node(args.catalog, name=args.name, address=args.address, path=args.file,
                                        data_dir=args.data_dir, proxy_admin=args.proxy_admin, out=out, err=err))
        except KeyboardInterrupt:
            return 130
    if args.command in admin_client.COMMANDS:
        return admin_client.run(args, out, err)
    if args.command in rollout.COMMANDS:
        return rollout.run(args, out, err)
    if args.command == secret.COMMAND:
        return secret.run(args, out, err)
    if args.command == scale.COMMAND:
        return scale.run(args, out, err)
    parser.print_help(err)
    return 2


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # catalog/dns/proxy own their whole command line (argparse cannot pass "--listen" through)
    # and their logging set-up.
    position = _command_position(args_list)
    if position is not None and args_list[position] in HANDOVER:
        return _handover(args_list[position], args_list[position + 1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    # the supervisor alone logs what it does (INFO) unless told otherwise, like the components
    level = args.log_level
    if args.command == "supervisor" and "--log-level" not in args_list and "MESHLET_LOG_LEVEL" not in os.environ:
        level = "INFO"
    config.setup_logging(level)
    try:
        code = run(args, parser, out or sys.stdout, err or sys.stderr)
        (out or sys.stdout).flush()      # here, not at exit: a closed pipe is ours to handle
        return code
    except BrokenPipeError:
        # the reader of our output went away (`meshlet status | head -2`): nothing to say,
        # and nothing more to flush to it at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
