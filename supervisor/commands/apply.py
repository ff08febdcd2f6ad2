"""``meshlet apply``: store the services of a meshlet.yaml in the catalog, with stable VIPs.

Flow::

    config.load(FILE) --desired--+
    KV meshlet/services/ --current+--> core.apply_plan.plan_apply --ApplyPlan--> txn_chunks
    KV meshlet/vips/ ----in use--+                                           --> PUT /v1/txn (CAS)

The KV operations of a write are built here, once each (``document_op``, ``vip_claim_op``,
``vip_release_op``, ``restart_op``); ``meshlet rollback`` builds its transaction from them.

Secrets and configs (``read_objects``, then ``supervisor.secrets.plan_objects``): their
values are read from their sources (a missing file, an unset variable or an empty value is
an error with the file's line, exit 2, nothing written), a changed value becomes a new
version (a secret sealed with the mesh's key-encryption key), and every service spec names
the version it runs, so a change rolls the services that use it. New versions are written
before (or with) the documents that name them. Nothing prints a value: apply says
"secret token: changed (version 2)", and its dry-run diff shows ``env`` values whose
names look secret as changed, never what they are.

Every document write is a CAS on the ModifyIndex read (0 for a create) and every VIP is
reserved by creating ``meshlet/vips/<ip>`` with CAS 0, all in one transaction: two applies
racing each other cannot half-apply or hand out one VIP twice; the loser re-reads and
plans again (a few times). See config/README.md, "The KV service document".

Errors: :class:`ApplyError` (and its subclasses) for everything the user must fix or retry;
catalog transport errors (``aiohttp.ClientError``, ``OSError``, ``asyncio.TimeoutError``,
``consul.ConsulException``) escape :func:`apply_services` and are worded by :func:`run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import consul
import consul.aio

import config
from discovery.consul import (CatalogAccess, CatalogAccessError, TxnRolledBack, access_for_mesh, catalog_problem,
                              connect, kv_op, kv_txn)

from ..core.apply_plan import (CREATED, DELETED, UNCHANGED, UPDATED, ApplyError, ApplyPlan, ServiceChange,
                               VipRangeExhausted, diff_fields, format_change, plan_apply, resolve_catalog_url)
from ..core.checks import check_mesh
from ..core.revisions import read_restart_token
from ..core.volumes import conflicts, with_definitions
from ..secrets import (CONFIG, SECRET, KeyFileError, Keyring, ObjectChange, PlanError, Versions, key_source,
                       load_keyring, new_key, pin, plan_objects, read_versions)

__all__ = [
    "ApplyError", "ApplyPlan", "ServiceChange", "TxnConflict", "VipRangeExhausted", "apply_services",
    "diff_fields", "format_change", "plan_apply", "read_state", "resolve_catalog_url", "run", "txn_chunks",
    "document_op", "vip_claim_op", "vip_release_op", "restart_op", "txn", "load_or_report", "apply_to",
    "CREATED", "UPDATED", "UNCHANGED", "DELETED", "Objects", "SourceError", "read_objects", "apply_all",
    "Applied", "apply_config", "VolumeConflict", "check_volume_sources",
]

log = logging.getLogger(__name__)

TXN_MAX_OPS = 64  # Consul rejects a transaction with more operations
ATTEMPTS = 8  # re-read and re-plan after a CAS conflict at most this often

class TxnConflict(ApplyError):
    """A CAS in the transaction failed: someone else changed the state we planned on."""


class VolumeConflict(ApplyError):
    """The file's volumes contradict those of services already in the mesh; ``problems``:
    (volume name, why)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"volume {v}: {why}" for v, why in problems))
        self.problems = problems


def document_op(service: str, doc: Mapping[str, Any] | None, index: int) -> dict[str, Any]:
    """Write (CAS on ``index``; 0: create only) or, with ``doc`` None, delete (CAS) the
    service's document."""
    key = config.service_key(service)
    if doc is None:
        return kv_op("delete-cas", key, index)
    return kv_op("cas", key, index, config.canonical_json(doc).encode())


def vip_claim_op(ip: str, service: str) -> dict[str, Any]:
    """Reserve ``ip`` for ``service``: create-only, so no VIP is handed out twice."""
    return kv_op("cas", config.vip_key(ip), 0, service.encode())


def vip_release_op(ip: str, index: int) -> dict[str, Any]:
    return kv_op("delete-cas", config.vip_key(ip), index)


def restart_op(service: str, token: str | None, now: float) -> dict[str, Any]:
    """Set the service's rolling-restart token (or delete it: None)."""
    key = config.rollout_key(service, "restart")
    if token is None:
        return kv_op("delete", key)
    return kv_op("set", key, 0, config.canonical_json({"token": token, "at": now}).encode())


def txn_chunks(plan: ApplyPlan, doc_index: Mapping[str, int], vip_index: Mapping[str, int],
               limit: int = TXN_MAX_OPS) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    """The transaction(s) writing ``plan``: chunks of (service, ops) groups.

    One chunk, hence one atomic transaction, whenever the plan fits Consul's 64-operation
    limit (up to ~21 services changing VIPs, 64 otherwise). Only a larger plan is split, and
    then only between services: each service's document and VIP keys stay in one chunk, so
    each service is still all-or-nothing and a conflict in a later chunk is repaired by
    re-planning (the services already written then read back as unchanged).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for change in plan.changes:
        if change.action in (CREATED, UPDATED):
            groups.setdefault(change.name, []).append(document_op(
                change.name, change.new, doc_index.get(change.name, 0) if change.action == UPDATED else 0))
        elif change.action == DELETED:
            groups.setdefault(change.name, []).append(document_op(change.name, None, doc_index[change.name]))
    for vip, name in plan.claims.items():
        groups.setdefault(name, []).append(vip_claim_op(vip, name))
    for vip, name in plan.releases.items():
        groups.setdefault(name, []).append(vip_release_op(vip, vip_index[vip]))
    chunks: list[list[tuple[str, list[dict[str, Any]]]]] = []
    size = limit
    for name in sorted(groups):
        ops = groups[name]
        if size + len(ops) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append((name, ops))
        size += len(ops)
    return chunks


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True, slots=True)
class CatalogState:
    docs: dict[str, dict[str, Any]]  # name -> document ({} when unreadable)
    doc_index: dict[str, int]  # name -> ModifyIndex
    vips: dict[str, str]  # ip -> owner
    vip_index: dict[str, int]  # ip -> ModifyIndex
    secrets: dict[str, Versions] = dataclasses.field(default_factory=dict)
    configs: dict[str, Versions] = dataclasses.field(default_factory=dict)


async def read_state(client: consul.aio.Consul) -> CatalogState:
    _, doc_entries = await client.kv.get(config.SERVICES_PREFIX, recurse=True)
    _, vip_entries = await client.kv.get(config.VIPS_PREFIX, recurse=True)
    _, secret_entries = await client.kv.get(config.SECRETS_PREFIX, recurse=True)
    _, config_entries = await client.kv.get(config.CONFIGS_PREFIX, recurse=True)
    docs, doc_index, vips, vip_index = {}, {}, {}, {}
    for e in doc_entries or ():
        name = config.key_name(e["Key"], config.SERVICES_PREFIX)
        if name is None:
            continue
        try:
            doc = json.loads(e.get("Value") or b"")
        except ValueError:
            doc = None
        docs[name] = doc if isinstance(doc, dict) else {}  # unreadable: rewritten by this apply
        doc_index[name] = int(e["ModifyIndex"])
    for e in vip_entries or ():
        ip = e["Key"][len(config.VIPS_PREFIX):]
        vips[ip] = (e.get("Value") or b"").decode("utf-8", "replace")
        vip_index[ip] = int(e["ModifyIndex"])
    return CatalogState(docs, doc_index, vips, vip_index, read_versions(secret_entries or (), SECRET),
                        read_versions(config_entries or (), CONFIG))


async def _with_tokens(client: consul.aio.Consul, changes: list[ServiceChange]) -> list[ServiceChange]:
    """``changes`` with each created or updated service's restart token (which the
    replicas' revision includes), read after the write. One that cannot be read counts as
    none: the write is done, and only the revision printed is at stake."""
    async def token(name: str) -> str | None:
        try:
            _, entry = await client.kv.get(config.rollout_key(name, "restart"))
            return read_restart_token(json.loads((entry or {}).get("Value") or b"null"))
        except (ValueError, aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
            log.warning("cannot read the restart token of %s: %s", name, exc)
            return None

    wanted = [c for c in changes if c.action in (CREATED, UPDATED)]
    tokens = await asyncio.gather(*(token(c.name) for c in wanted))
    by_name = {c.name: dataclasses.replace(c, token=t) for c, t in zip(wanted, tokens)}
    return [by_name.get(c.name, c) for c in changes]


async def txn(client: consul.aio.Consul, ops: list[dict[str, Any]]) -> None:
    """Apply ``ops`` in one transaction; TxnConflict when a CAS failed."""
    try:
        await kv_txn(client, ops)
    except TxnRolledBack as exc:
        raise TxnConflict(str(exc)) from None


@dataclass(frozen=True)
class Objects:
    """The secrets and configs an apply stores: values read from their sources (name ->
    (bytes, source)), the names of external secrets, and the keyring to seal with."""
    secrets: Mapping[str, tuple[bytes, str]] = dataclasses.field(default_factory=dict)
    external: frozenset[str] = frozenset()
    configs: Mapping[str, tuple[bytes, str]] = dataclasses.field(default_factory=dict)
    keyring: Keyring | None = None

    def __repr__(self) -> str:   # never the values
        return (f"Objects(secrets={sorted(self.secrets)}, external={sorted(self.external)}, "
                f"configs={sorted(self.configs)})")


@dataclass(frozen=True)
class Applied:
    objects: list[ObjectChange]
    services: list[ServiceChange]


def _object_ops(*plans: Any) -> list[dict[str, Any]]:
    ops = []
    for p in plans:
        ops += [kv_op("cas", key, 0, doc) for key, doc in p.writes]      # create-only: a version is never rewritten
        ops += [kv_op("delete-cas", key, index) for key, index in p.deletes]
    return ops


async def apply_all(client: consul.aio.Consul, desired: Mapping[str, Any], vip_range: str, *,
                    objects: Objects = Objects(), prune: bool = False, dry_run: bool = False,
                    attempts: int = ATTEMPTS, clock: Any = time.time) -> Applied:
    """Plan against the catalog and write the plan: secret and config versions, then the
    service documents naming them. PlanError (a key that does not open the mesh's
    secrets, an external secret that is not there) and ApplyError escape; nothing is
    written after either."""
    done: dict[str, ServiceChange] = {}  # written by an earlier chunk of a split plan
    last = ""
    for attempt in range(attempts):
        state = await read_state(client)
        keyring = objects.keyring
        if keyring is None and dry_run and objects.secrets and not any(state.secrets.values()):
            keyring = Keyring.of([new_key()])     # nothing to compare with: every secret is new
        secret_plan = plan_objects(SECRET, objects.secrets, objects.external, state.secrets, keyring, clock())
        config_plan = plan_objects(CONFIG, objects.configs, (), state.configs, None, clock())
        versions = {**secret_plan.versions, **config_plan.versions}
        pinned = {name: pin(spec, versions) for name, spec in desired.items()}
        clash = conflicts(pinned, _stored_specs(state.docs))
        if clash:
            raise VolumeConflict(clash)
        plan = plan_apply(pinned, state.docs, state.vips, vip_range, prune)
        object_changes = [*secret_plan.changes, *config_plan.changes]
        if dry_run:
            return Applied(object_changes, await _with_tokens(client, list(plan.changes)))
        try:
            ops = _object_ops(secret_plan, config_plan)
            for i in range(0, len(ops), TXN_MAX_OPS):
                await txn(client, ops[i:i + TXN_MAX_OPS])
            for chunk in txn_chunks(plan, state.doc_index, state.vip_index):
                await txn(client, [op for _, ops in chunk for op in ops])
                by_name = {c.name: c for c in plan.changes}
                done.update((name, by_name[name]) for name, _ in chunk if name in by_name)
        except TxnConflict as exc:
            last = str(exc)
            log.info("apply: conflict with a concurrent change (%s); re-reading and planning again", last)
            await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
            continue
        results = {c.name: c for c in plan.changes}
        for name, change in done.items():  # what an earlier, conflicted attempt already wrote
            if name not in results or results[name].action == UNCHANGED:
                results[name] = change
        return Applied(object_changes, await _with_tokens(client, [results[name] for name in sorted(results)]))
    raise ApplyError(f"the catalog kept changing under this apply ({attempts} attempts); last conflict: {last}")


def _stored_specs(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, config.ServiceSpec]:
    out = {}
    for name, doc in docs.items():
        try:
            out[name] = config.parse_service_document(json.dumps(doc), source=name)[0]
        except (config.ConfigError, ValueError, TypeError):
            continue            # unreadable: rewritten or left as it is; it names no volume we can read
    return out


async def apply_services(client: consul.aio.Consul, desired: Mapping[str, Any], vip_range: str, *,
                         prune: bool = False, dry_run: bool = False,
                         attempts: int = ATTEMPTS) -> list[ServiceChange]:
    """``apply_all`` of services only; returns what happened to each service."""
    return (await apply_all(client, desired, vip_range, prune=prune, dry_run=dry_run, attempts=attempts)).services


# --------------------------------------------------------------------------- sources


class SourceError(Exception):
    """Secrets or configs whose source cannot be read; ``problems`` are ``file:line path:
    message`` lines, one per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def read_objects(cfg: config.MeshConfig, path: str | None, *, create_key: bool) -> Objects:
    """Read every secret's and config's value from its source, and the keyring when there
    are secrets. ``path``: the config file (for line numbers). SourceError names every
    source that is missing, unset, empty or too large; KeyFileError a key that cannot be
    had. ``create_key``: make the data dir's key file when it does not exist yet."""
    from ..secrets import MAX_VALUE
    problems: list[str] = []

    def problem(kind: str, name: str, field: str, message: str) -> None:
        line = config.locate(path, kind, name, field) if path else None
        where = f"{path}:{line}" if path and line else (path or "<config>")
        problems.append(f"{where} {kind}.{name}.{field}: {message}")

    def check(kind: str, name: str, field: str, value: bytes, source: str) -> tuple[bytes, str] | None:
        if not value:
            problem(kind, name, field, f"{source} is empty")
            return None
        if len(value) > MAX_VALUE:
            problem(kind, name, field, f"{source} holds {len(value)} bytes; a {kind[:-1]} may hold "
                                       f"{MAX_VALUE // 1024} KiB")
            return None
        return value, field

    def from_file(kind: str, name: str, file: str) -> tuple[bytes, str] | None:
        try:
            with open(file, "rb") as f:
                return check(kind, name, "file", f.read(MAX_VALUE + 1), file)
        except OSError as exc:
            problem(kind, name, "file", f"{file}: {exc.strerror or exc}")
            return None

    secrets: dict[str, tuple[bytes, str]] = {}
    external = set()
    for name, s in cfg.secrets.items():
        got = None
        if s.external:
            external.add(name)
        elif s.file is not None:
            got = from_file("secrets", name, s.file)
        elif s.env is not None:
            text = os.environ.get(s.env)
            if text is None:
                problem("secrets", name, "env", f"${s.env} is not set")
            else:
                got = check("secrets", name, "env", text.encode(), f"${s.env}")
        if got is not None:
            secrets[name] = got
    configs: dict[str, tuple[bytes, str]] = {}
    for name, c in cfg.configs.items():
        got = from_file("configs", name, c.file) if c.file is not None else \
            check("configs", name, "data", (c.data or "").encode(), "data")
        if got is not None:
            configs[name] = got
    if problems:
        raise SourceError(problems)
    keyring = None
    if secrets or external:
        keyring = load_keyring(key_source(cfg.mesh), create=create_key and bool(secrets))
    return Objects(secrets, frozenset(external), configs, keyring)


def check_volume_sources(cfg: config.MeshConfig, path: str | None) -> list[str]:
    """Host volumes whose directory is missing (and not ``create: true``) or is no directory,
    on this machine, as ``file:line path: message`` lines. A node checks again at start (on
    a fleet its directory is the node's, not this machine's)."""
    problems = []
    for name, vol in cfg.volumes.items():
        if vol.type != "host" or vol.create or vol.source is None or os.path.isdir(vol.source):
            continue
        line = config.locate(path, "volumes", name, "source") if path else None
        where = f"{path}:{line}" if path and line else (path or "<config>")
        why = "is not a directory" if os.path.exists(vol.source) else \
            "does not exist (create it, or set create: true on the volume)"
        problems.append(f"{where} volumes.{name}.source: {vol.source} {why}")
    return problems


def load_or_report(path: str, command: str, err: TextIO) -> config.MeshConfig | None:
    """FILE loaded and checked (the schema, then what only the whole mesh shows:
    ``core.checks``), or None after printing every problem in it (each with file, line and
    field path) or why it could not be read: the caller exits 2."""
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=err)
        return None
    except OSError as exc:
        print(f"meshlet {command}: cannot read {path}: {exc.strerror or exc}", file=err)
        return None
    problems = [(config.locate(path, *p.keys), p) for p in check_mesh(cfg)]
    for line, p in sorted(problems, key=lambda lp: lp[0] or 0):
        print(f"{path}:{line} {p.path}: {p.message}" if line else f"{path} {p.path}: {p.message}", file=err)
    return None if problems else cfg


async def run(path: str, *, url: str | None = None, dry_run: bool = False, prune: bool = False,
              force: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``meshlet apply``: 0 done, 1 catalog trouble, 2 invalid file (or secret sources)."""
    cfg = load_or_report(path, "apply", err)
    if cfg is None:
        return 2
    if prune and not cfg.services and not force:
        print(f"meshlet apply: {path} defines no services, and --prune deletes every service the file does "
              "not name: that is every service in the mesh. Add --force if that is what you want.", file=err)
        return 2
    mesh = cfg.mesh
    url = resolve_catalog_url(url, os.environ, mesh.catalog.url, mesh.catalog_listen)
    try:
        access = access_for_mesh(url, mesh, os.environ)
    except CatalogAccessError as exc:
        print(f"meshlet apply: {exc}", file=err)
        return 2
    code, applied = await apply_config(access, cfg, path, prune=prune, dry_run=dry_run, err=err)
    if applied is None:
        return code
    print_applied(applied, out, dry_run)
    if dry_run:
        print("dry run: nothing written", file=out)
    return 0


def print_applied(applied: Applied, out: TextIO, dry_run: bool = False) -> None:
    for o in applied.objects:
        print(o.line(dry_run), file=out)
    for change in applied.services:
        for line in format_change(change, dry_run):
            print(line, file=out)


async def apply_config(url: str | CatalogAccess, cfg: config.MeshConfig, path: str | None, *,
                       prune: bool = False, dry_run: bool = False,
                       err: TextIO = sys.stderr) -> tuple[int, Applied | None]:
    """Read the config's secret and config sources and apply everything to the catalog at
    ``url`` (a URL, or a CatalogAccess with its token and TLS files). (0, Applied) or (exit
    code, None) after printing why to ``err``: 2 a source, a host directory or the key is
    missing, or the volumes contradict the mesh's; 1 the catalog or a key mismatch."""
    missing = check_volume_sources(cfg, path)
    if missing:
        for line in missing:
            print(line, file=err)
        return 2, None
    try:
        objects = read_objects(cfg, path, create_key=not dry_run)
    except SourceError as exc:
        for line in exc.problems:
            print(line, file=err)
        return 2, None
    except KeyFileError as exc:
        print(f"meshlet apply: {exc}", file=err)
        return 2, None
    services = {name: with_definitions(spec, cfg.volumes) for name, spec in cfg.services.items()}
    try:
        applied = await apply_to(url, services, cfg.mesh.vip_range, prune=prune, dry_run=dry_run, err=err,
                                 objects=objects, full=True, raise_conflicts=True)
    except VolumeConflict as exc:
        for volume, why in exc.problems:
            line = config.locate(path, "volumes", volume, "per_replica") if path else None
            where = f"{path}:{line}" if path and line else (path or "<config>")
            print(f"{where} volumes.{volume}: {why}", file=err)
        return 2, None
    return (0, applied) if applied is not None else (1, None)


async def apply_to(url: str | CatalogAccess, services: Mapping[str, Any], vip_range: str, *, prune: bool = False,
                   dry_run: bool = False, err: TextIO = sys.stderr, objects: Objects = Objects(),
                   full: bool = False, raise_conflicts: bool = False) -> Any:
    """Apply to the catalog at ``url``; errors are printed to ``err`` (None returned). The
    service changes, or with ``full`` the Applied (secret and config changes too)."""
    try:
        access = url if isinstance(url, CatalogAccess) else CatalogAccess(url)
        client = connect(access, timeout=15.0)
    except ValueError as exc:
        print(f"meshlet apply: {exc}", file=err)
        return None
    try:
        applied = await apply_all(client, services, vip_range, objects=objects, prune=prune, dry_run=dry_run)
        return applied if full else applied.services
    except VolumeConflict as exc:
        if raise_conflicts:
            raise
        print(f"meshlet apply: {exc}", file=err)
    except (ApplyError, PlanError) as exc:
        print(f"meshlet apply: {exc}", file=err)
    except BrokenPipeError:
        raise                            # our reader left: cli.main ends quietly
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
        print(f"meshlet apply: {catalog_problem(exc, access)}", file=err)
    finally:
        await client.close()
    return None
