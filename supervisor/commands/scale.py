"""``meshlet scale SERVICE N``: set a service's replicas in the catalog, as ``meshlet apply``
writes a changed file (the same document, CAS on what was read), without the file.

A change of ``replicas`` alone keeps the running replicas (their revision does not count
replicas): slots are added or the highest ones retired. The next ``meshlet apply`` of a
file with another number sets that number again, as with ``kubectl scale``.

A fixed port needs a node per replica: N beyond the mesh's nodes (the file's with ``-f``,
else the one local node) is refused as ``apply`` refuses it.

Exit codes: 0 written (or already N); 1 the catalog; 2 usage (no such service, N < 0, a
fixed port on more replicas than nodes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any, TextIO

import config

from ..core.checks import check_mesh

__all__ = ["COMMAND", "add_subcommands", "run", "scale_service", "ScaleError"]

COMMAND = "scale"


class ScaleError(Exception):
    """Why a scale was refused: ``code`` 2 usage (no such service, a fixed port on more
    replicas than nodes; ``missing``: the former), 1 the catalog."""

    def __init__(self, message: str, code: int = 2, *, missing: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.missing = missing


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of replicas >= 0, got {text!r}")
    return n


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(COMMAND, help="set a service's number of replicas")
    p.add_argument("service")
    p.add_argument("replicas", type=_count)
    p.add_argument("-f", "--file", help="meshlet.yaml naming mesh.catalog and mesh.nodes")
    p.add_argument("--consul", metavar="URL", help="catalog URL (default: $CONSUL_HTTP_ADDR, else the file's)")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from ..core.apply_plan import resolve_catalog_url
    mesh = config.MESH_DEFAULTS
    if args.file:
        try:
            mesh = config.load(args.file).mesh
        except config.ConfigError as exc:
            for issue in exc.issues:
                print(issue, file=err)
            return 2
    nodes_from = args.file or "the one local node; give -f FILE for the mesh's"
    from discovery.consul import CatalogAccessError, access_for_mesh
    url = resolve_catalog_url(args.consul, os.environ, mesh.catalog.url, mesh.catalog_listen)
    try:
        access = access_for_mesh(url, mesh, os.environ)
    except CatalogAccessError as exc:
        print(f"meshlet scale: {exc}", file=err)
        return 2
    return asyncio.run(_scale(access, args.service, args.replicas, out, err, mesh, nodes_from))


async def scale_service(client: Any, service: str, replicas: int,
                        mesh: config.MeshSettings = config.MESH_DEFAULTS, nodes_from: str = "") -> str:
    """Set ``service``'s replicas in its catalog document (CAS, three tries); what to tell
    the user. ScaleError when refused; catalog errors as they come. Shared by the CLI and
    the admin API."""
    from discovery.consul import kv_get

    from .apply import TxnConflict, document_op, txn
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ScaleError(f"expected a number of replicas >= 0, got {replicas!r}")
    for attempt in (1, 2, 3):
        index, raw = await kv_get(client, config.service_key(service))
        if raw is None:
            raise ScaleError(f"no service {service!r} in the catalog (apply it first: `meshlet apply`)", missing=True)
        spec, vip, _ = config.parse_service_document(raw, source=config.service_key(service))
        if spec.replicas == replicas:
            return f"{service}: already {replicas} replica{'s' if replicas != 1 else ''}"
        scaled = dataclasses.replace(spec, replicas=replicas)
        # what apply would refuse for this service (a fixed port needs a node per replica)
        problems = [p for p in check_mesh(config.MeshConfig(mesh=mesh, services=config.FrozenDict({service: scaled})))
                    if p.keys[:3] == ("services", service, "replicas")]
        if problems:
            raise ScaleError("; ".join(f"{service}: {p.message} (nodes: {nodes_from})" for p in problems))
        new = config.service_document(scaled, vip)
        try:
            await txn(client, [document_op(service, json.loads(json.dumps(new)), index)])
        except TxnConflict:
            if attempt == 3:
                raise ScaleError(f"{service} kept changing meanwhile; try again", 1) from None
            continue
        return f"{service}: scaled (replicas {spec.replicas} → {replicas})"
    raise AssertionError("unreachable")


async def _scale(access: Any, service: str, replicas: int, out: TextIO, err: TextIO,
                 mesh: config.MeshSettings = config.MESH_DEFAULTS, nodes_from: str = "") -> int:
    import aiohttp
    import consul

    from discovery.consul import catalog_problem, connect
    try:
        client = connect(access, timeout=15.0)
    except ValueError as exc:
        print(f"meshlet scale: {exc}", file=err)
        return 2
    try:
        try:
            print(await scale_service(client, service, replicas, mesh, nodes_from), file=out)
            return 0
        except ScaleError as exc:
            print(f"meshlet scale: {exc}", file=err)
            return exc.code
    except config.ConfigError as exc:
        print(f"meshlet scale: {'; '.join(str(i) for i in exc.issues)}", file=err)
        return 1
    except BrokenPipeError:
        raise                            # our reader left: cli.main ends quietly
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
        print(f"meshlet scale: {catalog_problem(exc, access)}", file=err)
        return 1
    finally:
        await client.close()
