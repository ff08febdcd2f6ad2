"""``meshlet secret set|ls|rm|rotate-key``: the mesh's secrets, through the catalog.

    meshlet secret set NAME [--from-file F]   a new version from F or standard input (never
                                              an argument: arguments show in ``ps``); every
                                              service that mounts NAME names the new version,
                                              so it rolls, in the same transaction
    meshlet secret ls [--json]                names, versions, when, which services use them
    meshlet secret rm NAME                    every version; refused while a service uses it
    meshlet secret rotate-key                 a new key-encryption key: every data key is
                                              re-wrapped with it, without downtime

The catalog and the key come from ``-f FILE`` (its mesh.catalog and mesh.secrets), else
``--consul URL`` / ``$CONSUL_HTTP_ADDR`` and ``--key-file`` / ``--key-env``, else the
defaults (the embedded catalog's address, ``.meshlet/secrets.key``).

Rotation, in an order in which every supervisor can always open every secret: the key
file gets the new key first, in front of the old one (a supervisor that meets a key it
does not hold reads the file again); every stored version's data key is re-wrapped with
the new key (CAS writes, until none is left under the old one, so a concurrent ``set``
sealed with the old key is caught); then the old key leaves the file. A key held in an
environment variable cannot be rewritten here: rotate by hand (add the new key first in
the variable, comma-separated) or use a key file.

Exit codes: 0 done; 1 the catalog, a key that does not open the mesh's secrets, or a
secret in use; 2 usage (an empty value, an unknown secret, a bad file).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import config

from ..secrets import (SECRET, KeyFileError, Keyring, KeySource, PlanError, load_keyring, new_key, pin,
                       plan_objects, read_versions, rewrap, users, write_keyring)
from ..secrets._keyfile import DEFAULT_NAME

__all__ = ["add_subcommands", "run"]

COMMAND = "secret"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")     # config's names of secrets


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_subcommands(sub: Any) -> None:
    secret = sub.add_parser(COMMAND, help="set, list, remove the mesh's secrets; rotate their key")
    actions = secret.add_subparsers(dest="secret_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-f", "--file", help="meshlet.yaml naming mesh.catalog and mesh.secrets")
        p.add_argument("--consul", metavar="URL", help="catalog URL (default: $CONSUL_HTTP_ADDR, else the file's)")
        key = p.add_mutually_exclusive_group()
        key.add_argument("--key-file", metavar="PATH", help="the key-encryption key file")
        key.add_argument("--key-env", metavar="VAR", help="the variable holding the key (base64)")
        return p

    put = common(actions.add_parser("set", help="a new version of NAME from --from-file or standard input"))
    put.add_argument("name")
    put.add_argument("--from-file", metavar="F", help="read the value from F (default: standard input)")
    listing = common(actions.add_parser("ls", help="names, versions and the services using them (no values)"))
    listing.add_argument("--json", action="store_true")
    rm = common(actions.add_parser("rm", help="remove every version of NAME (refused while a service uses it)"))
    rm.add_argument("name")
    common(actions.add_parser("rotate-key", help="re-wrap every secret's data key with a new key-encryption key"))


def _where(args: argparse.Namespace) -> tuple[Any, KeySource]:
    from discovery.consul import CatalogAccessError, access_for_mesh

    from ..core.apply_plan import resolve_catalog_url
    from ..secrets import key_source
    mesh = config.MESH_DEFAULTS
    if args.file:
        try:
            mesh = config.load(args.file).mesh
        except config.ConfigError as exc:
            raise CliError("; ".join(str(i) for i in exc.issues), 2) from None
    url = resolve_catalog_url(args.consul, os.environ, mesh.catalog.url, mesh.catalog_listen)
    try:
        access = access_for_mesh(url, mesh, os.environ)
    except CatalogAccessError as exc:
        raise CliError(str(exc), 2) from None
    if args.key_file:
        source = KeySource(path=Path(args.key_file))
    elif args.key_env:
        source = KeySource(env=args.key_env)
    elif args.file:
        source = key_source(mesh)
    else:
        source = KeySource(path=Path(mesh.data_dir) / DEFAULT_NAME, default=True)
    return access, source


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None,
        stdin: Any = None) -> int:
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    try:
        access, source = _where(args)
        return asyncio.run(_run(args, access, source, out, err, stdin))
    except CliError as exc:
        print(f"meshlet secret {args.secret_command}: {exc}", file=err)
        return exc.code
    except (KeyFileError, PlanError) as exc:
        print(f"meshlet secret {args.secret_command}: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, access: Any, source: KeySource, out: TextIO, err: TextIO,
               stdin: Any) -> int:
    import aiohttp
    import consul

    from discovery.consul import catalog_problem, connect
    try:
        client = connect(access, timeout=15.0)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    handlers = {"set": lambda: _set(client, args, source, out, stdin), "ls": lambda: _ls(client, args, out),
                "rm": lambda: _rm(client, args, out), "rotate-key": lambda: _rotate(client, source, out)}
    try:
        return await handlers[args.secret_command]()
    except BrokenPipeError:
        raise                            # our reader left: cli.main ends quietly
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
        raise CliError(catalog_problem(exc, access)) from None
    finally:
        await client.close()


def _read_value(args: argparse.Namespace, stdin: Any) -> bytes:
    if args.from_file:
        try:
            with open(args.from_file, "rb") as f:
                value = f.read()
        except OSError as exc:
            raise CliError(f"{args.from_file}: {exc.strerror or exc}", 2) from None
    elif getattr(stdin, "isatty", lambda: False)():
        value = getpass.getpass(f"value of secret {args.name}: ").encode()
    else:
        value = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
    if not value:
        raise CliError(f"the value of secret {args.name} is empty", 2)
    return value


async def _services(client: Any) -> dict[str, tuple[int, config.ServiceSpec, str | None]]:
    """name -> (ModifyIndex, spec, vip) of every readable service document."""
    _, entries = await client.kv.get(config.SERVICES_PREFIX, recurse=True)
    out = {}
    for e in entries or ():
        name = config.key_name(e["Key"], config.SERVICES_PREFIX)
        if name is None:
            continue
        try:
            spec, vip, _ = config.parse_service_document(e.get("Value") or b"", source=e["Key"])
        except config.ConfigError:
            continue
        out[name] = (int(e["ModifyIndex"]), spec, vip)
    return out


async def _versions(client: Any) -> dict[str, Any]:
    _, entries = await client.kv.get(config.SECRETS_PREFIX, recurse=True)
    return read_versions(entries or (), SECRET)


async def _set(client: Any, args: argparse.Namespace, source: KeySource, out: TextIO, stdin: Any) -> int:
    from discovery.consul import kv_op

    from .apply import TxnConflict, document_op, txn
    if not NAME.fullmatch(args.name):
        raise CliError(f"{args.name!r}: a secret's name is letters, digits, '_', '.' and '-'", 2)
    value = _read_value(args, stdin)
    keyring = load_keyring(source, create=True)
    assert keyring is not None
    for attempt in (1, 2, 3):
        stored = await _versions(client)
        plan = plan_objects(SECRET, {args.name: (value, "cli")}, (), stored, keyring, time.time())
        (change,) = plan.changes
        rolled = []
        ops = [kv_op("cas", key, 0, doc) for key, doc in plan.writes]
        ops += [kv_op("delete-cas", key, index) for key, index in plan.deletes]
        if change.action != "unchanged":
            for name, (index, spec, vip) in sorted((await _services(client)).items()):
                new = pin(spec, plan.versions)
                if new != spec and any(m.name == args.name for m in spec.secrets):
                    ops.append(document_op(name, config.service_document(new, vip), index))
                    rolled.append(name)
        try:
            if ops:
                await txn(client, ops)
            break
        except TxnConflict:
            if attempt == 3:
                raise CliError(f"secret {args.name} or a service using it kept changing meanwhile; try again")
    print(change.line() + (f"; rolling {', '.join(rolled)}" if rolled else ""), file=out)
    return 0


async def _ls(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    stored = await _versions(client)
    specs = [spec for _, spec, _ in (await _services(client)).values()]
    rows = []
    for name in sorted(stored):
        v = stored[name]
        doc = v.docs[v.latest]
        rows.append({"name": name, "version": v.latest, "versions": sorted(v.docs),
                     "updated": doc.get("created_at"), "source": doc.get("source"), "key_id": doc.get("key_id"),
                     "used_by": users(SECRET, name, specs)})
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
        return 0
    if not rows:
        print("no secrets", file=out)
        return 0
    from .admin_client import format_age
    table = [("NAME", "VERSION", "UPDATED", "SOURCE", "USED BY")]
    now = time.time()
    for r in rows:
        age = format_age(max(0.0, now - r["updated"])) + " ago" if isinstance(r["updated"], (int, float)) else "-"
        table.append((r["name"], str(r["version"]), age, str(r["source"] or "-"), ", ".join(r["used_by"]) or "-"))
    widths = [max(len(t[c]) for t in table) for c in range(len(table[0]))]
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip(), file=out)
    return 0


async def _rm(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    from discovery.consul import kv_delete
    stored = await _versions(client)
    if args.name not in stored:
        raise CliError(f"no secret {args.name!r} in the mesh", 2)
    used = users(SECRET, args.name, [spec for _, spec, _ in (await _services(client)).values()])
    if used:
        raise CliError(f"secret {args.name} is used by {', '.join(used)}; remove it from their specs "
                       "(and apply) first")
    await kv_delete(client, config.secret_key(args.name), recurse=True)
    print(f"secret {args.name}: removed ({len(stored[args.name].docs)} versions)", file=out)
    return 0


async def _rotate(client: Any, source: KeySource, out: TextIO) -> int:
    from discovery.consul import kv_op

    from .apply import TXN_MAX_OPS, TxnConflict, txn
    if source.path is None:
        raise CliError(f"the key is in ${source.env}: rotate it there (put the new key first, comma-separated, "
                       "and run rotate-key with --key-file pointing at a copy), or use a key file", 2)
    old = load_keyring(source)
    if old is None:
        raise CliError(f"no key-encryption key at {source.path}: nothing to rotate", 2)
    fresh = new_key()
    both = Keyring.of([fresh, *old.keys])
    write_keyring(source.path, both)               # 1: every reader can open both from now on
    rewrapped = 0
    for _ in range(20):                             # 2: until nothing is under an old key
        stored = await _versions(client)
        ops = []
        for name, v in sorted(stored.items()):
            for version, doc in sorted(v.docs.items()):
                if doc.get("key_id") != both.ids[0]:
                    new = rewrap(both, fresh, name, version, doc)
                    ops.append(kv_op("cas", config.secret_key(name, version), v.index[version],
                                     config.canonical_json(new).encode()))
        if not ops:
            break
        try:
            for i in range(0, len(ops), TXN_MAX_OPS):
                await txn(client, ops[i:i + TXN_MAX_OPS])
            rewrapped += len(ops)
        except TxnConflict:
            continue
    else:
        raise CliError(f"secrets kept changing under the rotation; {source.path} holds the new and the old "
                       "key: run rotate-key again")
    write_keyring(source.path, Keyring.of([fresh]))   # 3: the old key goes
    print(f"re-wrapped {rewrapped} secret versions with key {both.ids[0]}; "
          f"{', '.join(old.ids)} removed from {source.path}", file=out)
    return 0
