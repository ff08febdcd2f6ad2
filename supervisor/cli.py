"""The ``meshlet`` command: the one composition root of meshlet.

Subcommands::

    meshlet catalog ...        -> discovery.catalog.main(argv)   (the embedded catalog)
    meshlet dns ...            -> discovery.dns.main(argv)       (the DNS server)
    meshlet proxy ...          -> proxy.main(argv)               (the proxy)
    meshlet apply -f FILE      store the file's services in the catalog (supervisor.apply)
    meshlet up|status|logs|down  the supervisor's commands (supervisor.commands, supervisor.up)
    meshlet rollout status|history|pause|resume SERVICE, rollback SERVICE, restart SERVICE
                               rollouts, through the catalog (supervisor.rollout_cli)
    meshlet version

``catalog``, ``dns`` and ``proxy`` are imported only when asked for, so a missing
component is a clear message rather than an ImportError at startup. Exit codes: 0 ok,
1 runtime failure (catalog unreachable, child failed), 2 usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["main"]

# subcommand -> module whose main(argv) takes over
HANDOVER = {"catalog": "discovery.catalog", "dns": "discovery.dns", "proxy": "proxy"}


def _version() -> str:
    try:
        return version("meshlet")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlet", description="A small-fleet orchestrator and service mesh.")
    parser.add_argument("--log-level", default=os.environ.get("MESHLET_LOG_LEVEL", "WARNING"),
                        help="logging level on stderr (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in HANDOVER.items():
        sub.add_parser(name, help=f"run the {name} ({module}); see `meshlet {name} --help`", add_help=False)

    apply = sub.add_parser("apply", help="validate a meshlet.yaml and store its services in the catalog")
    apply.add_argument("-f", "--file", required=True, help="the meshlet.yaml to apply")
    apply.add_argument("--consul", metavar="URL",
                       help="catalog URL (default: $CONSUL_HTTP_ADDR, else the file's mesh.catalog)")
    apply.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    apply.add_argument("--prune", action="store_true", help="delete services that are not in the file")

    from supervisor import commands  # stdlib-only at import; `up` loads the supervisor when run
    commands.add_subcommands(sub)
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


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # catalog/dns/proxy own their whole command line (argparse cannot pass "--listen" through)
    # and their logging set-up.
    position = _command_position(args_list)
    if position is not None and args_list[position] in HANDOVER:
        return _handover(args_list[position], args_list[position + 1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    _setup_logging(args.log_level)
    if args.command == "version":
        print(f"meshlet {_version()}")
        return 0
    if args.command == "apply":
        from supervisor import apply
        return asyncio.run(apply.run(args.file, url=args.consul, dry_run=args.dry_run, prune=args.prune))
    from supervisor import commands
    if args.command in commands.COMMANDS:
        return commands.run(args)
    parser.print_help(sys.stderr)
    return 2


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


def _setup_logging(level: str) -> None:
    import logging
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
