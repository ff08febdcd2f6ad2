"""The ``meshlet`` command: the one composition root of meshlet.

Subcommands::

    meshlet catalog ...        -> discovery.catalog.main(argv)   (the embedded catalog)
    meshlet dns ...            -> discovery.dns.main(argv)       (the DNS server)
    meshlet proxy ...          -> proxy.main(argv)               (the proxy)
    meshlet apply -f FILE      store the file's services in the catalog (supervisor.apply)
    meshlet up -f FILE         embedded catalog + apply, until Ctrl-C (grows into the supervisor)
    meshlet version

``catalog``, ``dns`` and ``proxy`` are imported only when asked for, so a missing
component is a clear message rather than an ImportError at startup. Exit codes: 0 ok,
1 runtime failure (catalog unreachable, child failed), 2 usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["main", "up"]

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

    up = sub.add_parser("up", help="run the embedded catalog and apply FILE, until Ctrl-C")
    up.add_argument("-f", "--file", required=True, help="the meshlet.yaml to run")
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
    # catalog/dns/proxy own their whole command line (argparse cannot pass "--listen" through).
    position = next((i for i, a in enumerate(args_list) if not a.startswith("-")), None)
    if position is not None and args_list[position] in HANDOVER:
        _setup_logging(_log_level(args_list[:position]))
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
    if args.command == "up":
        try:
            return asyncio.run(up(args.file))
        except KeyboardInterrupt:
            return 130
    parser.print_help(sys.stderr)
    return 2


def _log_level(options: list[str]) -> str:
    for i, opt in enumerate(options):
        if opt.startswith("--log-level="):
            return opt.split("=", 1)[1]
        if opt == "--log-level" and i + 1 < len(options):
            return options[i + 1]
    return os.environ.get("MESHLET_LOG_LEVEL", "WARNING")


def _setup_logging(level: str) -> None:
    import logging
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- up


async def _answers(url: str) -> bool:
    """Does a Consul-compatible catalog answer at ``url``?"""
    from discovery.consul import connect
    client = connect(url, timeout=2.0)
    try:
        await client.status.leader()
        return True
    except Exception:  # noqa: BLE001 - anything but an answer means "no"
        return False
    finally:
        await client.close()


class ChildFailed(Exception):
    pass


async def _start_catalog(listen: str, data_dir: Path, timeout: float = 20.0
                         ) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m discovery.catalog`` and wait for its ready line -> (process, http address)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "discovery.catalog", "--listen", listen, "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            if not line:
                rc = await proc.wait()
                raise ChildFailed(f"the embedded catalog exited with status {rc} before it was ready "
                                  f"(listen {listen}, data dir {data_dir}); see its log above")
            text = line.decode("utf-8", "replace").strip()
            if text.startswith("ready "):
                roles = json.loads(text[6:])
                return proc, roles.get("http") or next(iter(roles.values()))
    except (asyncio.TimeoutError, ValueError, StopIteration) as exc:
        await _stop(proc)
        if isinstance(exc, asyncio.TimeoutError):
            raise ChildFailed(f"the embedded catalog did not report ready within {timeout:g}s") from None
        raise ChildFailed(f"the embedded catalog printed an unreadable ready line: {exc}") from None
    except BaseException:
        await _stop(proc)
        raise


async def _stop(proc: asyncio.subprocess.Process, grace: float = 10.0) -> int:
    if proc.returncode is None:
        try:
            proc.terminate()
            return await asyncio.wait_for(proc.wait(), grace)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            proc.kill()
    return await proc.wait()


async def up(path: str) -> int:
    """Minimal ``meshlet up``: the embedded catalog (started, or reused if one already answers at
    ``mesh.catalog_listen``), FILE applied, then wait for Ctrl-C/SIGTERM and stop the child.
    A later supervisor replaces this function."""
    import config
    from supervisor import apply

    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"meshlet up: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    mesh = cfg.mesh
    url = apply.resolve_catalog_url(None, {}, mesh.catalog, mesh.catalog_listen)
    proc: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if await _answers(url):
            print(f"meshlet up: using the catalog already answering at {url}", flush=True)
        elif mesh.catalog != "embedded":
            print(f"meshlet up: cannot reach the catalog at {url} (mesh.catalog)", file=sys.stderr)
            return 1
        else:
            data_dir = Path(mesh.data_dir)
            if not data_dir.is_absolute():
                data_dir = Path(path).resolve().parent / data_dir
            try:
                proc, address = await _start_catalog(mesh.catalog_listen, data_dir / "catalog")
            except (ChildFailed, OSError) as exc:
                print(f"meshlet up: {exc}", file=sys.stderr)
                return 1
            url = f"http://{address}"
            print(f"meshlet up: catalog at {url} (pid {proc.pid}, data in {data_dir / 'catalog'})", flush=True)
        changes = await apply.apply_to(url, cfg.services, mesh.vip_range)
        if changes is None:
            return 1
        for change in changes:
            for line in apply.format_change(change):
                print(line, flush=True)
        print("meshlet up: running; press Ctrl-C to stop", flush=True)
        waiters = [asyncio.create_task(stop.wait())]
        if proc is not None:
            waiters.append(asyncio.create_task(proc.wait()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if proc is not None and proc.returncode is not None:
            print(f"meshlet up: the embedded catalog exited with status {proc.returncode}", file=sys.stderr)
            return 1
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if proc is not None:
            rc = await _stop(proc)
            if rc not in (0, -signal.SIGTERM):
                print(f"meshlet up: the embedded catalog stopped with status {rc}", file=sys.stderr)
