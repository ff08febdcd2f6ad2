"""``meshlet apply``: store the services of a meshlet.yaml in the catalog, with stable VIPs.

Flow::

    config.load(FILE) --desired--+
    KV meshlet/services/ --current+--> plan_apply (pure) --ApplyPlan--> txn_chunks (pure)
    KV meshlet/vips/ ----in use--+                                   --> PUT /v1/txn (CAS)

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
import ipaddress
import json
import logging
import os
import random
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
import consul
import consul.aio

import config
from discovery.consul import TxnRolledBack, connect, kv_op, kv_txn

from .rollout_keys import restart_key, restart_token, target_revision

__all__ = [
    "ApplyError", "ApplyPlan", "ServiceChange", "TxnConflict", "VipRangeExhausted", "apply_services",
    "diff_fields", "format_change", "plan_apply", "read_state", "resolve_catalog_url", "run", "txn_chunks",
]

log = logging.getLogger(__name__)

SERVICES_PREFIX = "meshlet/services/"
VIPS_PREFIX = "meshlet/vips/"
TXN_MAX_OPS = 64  # Consul rejects a transaction with more operations
ATTEMPTS = 8  # re-read and re-plan after a CAS conflict at most this often

CREATED, UPDATED, UNCHANGED, DELETED = "created", "updated", "unchanged", "deleted"


class ApplyError(Exception):
    """Something the user has to fix or retry; ``str()`` says what."""


class VipRangeExhausted(ApplyError):
    pass


class TxnConflict(ApplyError):
    """A CAS in the transaction failed: someone else changed the state we planned on."""


# --------------------------------------------------------------------------- pure planning


@dataclass(frozen=True, slots=True)
class ServiceChange:
    name: str
    action: str  # CREATED | UPDATED | UNCHANGED | DELETED
    old: Mapping[str, Any] | None  # the current document (None when created)
    new: Mapping[str, Any] | None  # the document to write (None when deleted)
    token: str | None = None  # the service's rolling-restart token (``meshlet restart``), if any

    @property
    def revision(self) -> str | None:
        """The document's revision (the whole spec, replicas included)."""
        return (self.new or {}).get("revision")

    @property
    def old_revision(self) -> str | None:
        return (self.old or {}).get("revision")

    @property
    def replica_revision(self) -> str | None:
        """The revision the replicas run after this change: what ``meshlet status`` and
        ``meshlet rollout history`` show (the document's revision counts ``replicas`` too)."""
        return replica_revision(self.new, self.token)

    @property
    def old_replica_revision(self) -> str | None:
        return replica_revision(self.old, self.token)

    @property
    def vip(self) -> str | None:
        return (self.new or {}).get("vip")


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    changes: tuple[ServiceChange, ...]  # by name
    claims: Mapping[str, str] = field(default_factory=dict)  # VIP -> service: reservations to create
    releases: Mapping[str, str] = field(default_factory=dict)  # VIP -> service: reservations to delete

    @property
    def writes(self) -> bool:
        return bool(self.claims or self.releases or any(c.action != UNCHANGED for c in self.changes))


def replica_revision(doc: Mapping[str, Any] | None, token: str | None) -> str | None:
    """The revision replicas of the service document ``doc`` run (None: no readable spec)."""
    if not doc:
        return None
    try:
        spec, _, _ = config.parse_service_document(json.dumps(doc))
    except (config.ConfigError, TypeError, ValueError):
        return None
    return target_revision(spec, token)


def _replicas(doc: Mapping[str, Any] | None) -> Any:
    spec = (doc or {}).get("spec")
    return spec.get("replicas") if isinstance(spec, Mapping) else None


def _has_ports(spec: Any) -> bool:
    ports = spec.get("ports") if isinstance(spec, Mapping) else getattr(spec, "ports", None)
    return bool(ports)


def _document(spec: Any, vip: str | None) -> dict[str, Any]:
    """The KV document of ``spec`` (through config), as it reads back from JSON."""
    return json.loads(json.dumps(config.service_document(spec, vip=vip)))


def _usable(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return max(0, net.num_addresses - 2)


def lowest_free_vip(vip_range: str, taken: Iterable[str]) -> str | None:
    """The lowest address of ``vip_range`` that is not in ``taken``, never the first (network)
    or last (broadcast) address of the range; None when all are taken."""
    net = ipaddress.ip_network(vip_range, strict=False)
    used = {int(ipaddress.ip_address(a)) for a in taken if _is_ip(a)}
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    candidate = first
    for value in sorted(u for u in used if first <= u <= last):
        if value > candidate:
            break
        candidate = value + 1
    return str(ipaddress.ip_address(candidate)) if candidate <= last else None


def _is_ip(text: object) -> bool:
    try:
        ipaddress.ip_address(text)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def plan_apply(desired: Mapping[str, Any], current: Mapping[str, Mapping[str, Any]],
               vips_in_use: Mapping[str, str], vip_range: str, prune: bool) -> ApplyPlan:
    """Decide what ``meshlet apply`` writes.

    ``desired``: ServiceSpec by name (from the file). ``current``: the KV documents by name
    (an unreadable one as ``{}``). ``vips_in_use``: ``meshlet/vips/<ip>`` -> owner.

    A service keeps its VIP while it has ports (even if the range changed since); a new
    service with ports gets the lowest free address of ``vip_range``; one that loses all its
    ports gives its VIP back; with ``prune``, services absent from ``desired`` are deleted
    and give their VIP back. A VIP given back in this plan is not handed out again in the
    same plan. Raises VipRangeExhausted when no address is left.
    """
    try:
        net = ipaddress.ip_network(vip_range, strict=False)
    except ValueError as exc:
        raise ApplyError(f"mesh.vip_range: {exc}") from None
    taken = set(vips_in_use) | {str(d.get("vip")) for d in current.values() if d.get("vip")}
    claims: dict[str, str] = {}
    releases: dict[str, str] = {}
    changes: list[ServiceChange] = []

    def release(name: str, vip: Any) -> None:
        if isinstance(vip, str) and vips_in_use.get(vip) == name:
            releases[vip] = name

    for name in sorted(desired):
        spec, old = desired[name], current.get(name)
        old_vip = old.get("vip") if old else None
        vip: str | None = None
        if _has_ports(spec):
            owner = vips_in_use.get(old_vip) if isinstance(old_vip, str) else None
            if isinstance(old_vip, str) and _is_ip(old_vip) and owner in (None, name) and old_vip not in claims:
                vip = old_vip
                if owner is None:  # the reservation is missing: take it again
                    claims[vip] = name
            else:
                vip = lowest_free_vip(vip_range, taken)
                if vip is None:
                    raise VipRangeExhausted(
                        f"no free virtual IP left in mesh.vip_range {vip_range} for service {name!r}: "
                        f"all {_usable(net)} usable addresses are in use; widen the range")
                taken.add(vip)
                claims[vip] = name
        elif old_vip:
            release(name, old_vip)
        new = _document(spec, vip)
        action = CREATED if old is None else UNCHANGED if dict(old) == new else UPDATED
        changes.append(ServiceChange(name, action, old, new))
    if prune:
        for name in sorted(current.keys() - desired.keys()):
            release(name, current[name].get("vip"))
            changes.append(ServiceChange(name, DELETED, current[name], None))
    changes.sort(key=lambda c: c.name)
    return ApplyPlan(tuple(changes), claims, releases)


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
        key = SERVICES_PREFIX + change.name
        if change.action in (CREATED, UPDATED):
            body = json.dumps(change.new, sort_keys=True, separators=(",", ":")).encode()
            groups.setdefault(change.name, []).append(
                kv_op("cas", key, doc_index.get(change.name, 0) if change.action == UPDATED else 0, body))
        elif change.action == DELETED:
            groups.setdefault(change.name, []).append(kv_op("delete-cas", key, doc_index[change.name]))
    for vip, name in plan.claims.items():
        groups.setdefault(name, []).append(kv_op("cas", VIPS_PREFIX + vip, 0, name.encode()))
    for vip, name in plan.releases.items():
        groups.setdefault(name, []).append(kv_op("delete-cas", VIPS_PREFIX + vip, vip_index[vip]))
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


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and (value or not path):  # an empty root adds no field
        for k in value:
            _flatten(value[k], f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
    else:
        out[path] = value


def diff_fields(old: Any, new: Any, limit: int = 20) -> list[str]:
    """Field-level differences ``path: old → new`` between two specs (plain data)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old or {}, "", a)
    _flatten(new or {}, "", b)

    def show(d: dict[str, Any], k: str) -> str:
        if k not in d:
            return "(absent)"
        text = json.dumps(d[k], sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, a) != b.get(k, a))
    lines = [f"{k}: {show(a, k)} → {show(b, k)}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


def format_change(change: ServiceChange, dry_run: bool = False) -> list[str]:
    """The line(s) printed for one service. Revisions are the replicas' (as ``meshlet
    status`` and ``rollout history`` show them): a new one means a rollout; a change of
    ``replicas`` alone is a scale, which keeps the running replicas."""
    verb = {CREATED: "would create", UPDATED: "would update", DELETED: "would delete"}.get(change.action) \
        if dry_run else None
    verb = verb or change.action
    if change.action == CREATED:
        vip = f", vip {change.vip}" if change.vip else ""
        return [f"{change.name}: {verb} (revision {change.replica_revision or change.revision}{vip})"]
    if change.action == UPDATED:
        old_vip = (change.old or {}).get("vip")
        vip = "" if old_vip == change.vip else f", vip {change.vip}" if change.vip else ", vip released"
        old_rev, new_rev = change.old_replica_revision, change.replica_revision or change.revision
        old_n, new_n = _replicas(change.old), _replicas(change.new)
        scale = f"replicas {old_n} → {new_n}" if old_n != new_n and old_rev is not None else ""
        if old_rev != new_rev:
            lines = [f"{change.name}: {verb} (revision {old_rev or '(unreadable)'} → {new_rev}"
                     f"{', ' + scale if scale else ''}{vip})"]
        elif scale:
            lines = [f"{change.name}: {'would scale' if dry_run else 'scaled'} ({scale}, revision {new_rev}{vip})"]
        else:
            lines = [f"{change.name}: {verb} (revision {new_rev} unchanged{vip})"]
        if dry_run:
            lines += ["    " + d for d in diff_fields((change.old or {}).get("spec"), (change.new or {}).get("spec"))]
        return lines
    return [f"{change.name}: {verb}"]


def resolve_catalog_url(cli_url: str | None, env: Mapping[str, str], catalog: str, catalog_listen: str) -> str:
    """--consul, else $CONSUL_HTTP_ADDR, else the file's mesh.catalog (embedded: its listen address)."""
    url = cli_url or env.get("CONSUL_HTTP_ADDR") or (
        f"http://{catalog_listen}" if catalog == "embedded" else catalog)
    return url if "//" in url else "http://" + url


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True, slots=True)
class CatalogState:
    docs: dict[str, dict[str, Any]]  # name -> document ({} when unreadable)
    doc_index: dict[str, int]  # name -> ModifyIndex
    vips: dict[str, str]  # ip -> owner
    vip_index: dict[str, int]  # ip -> ModifyIndex


async def read_state(client: consul.aio.Consul) -> CatalogState:
    _, doc_entries = await client.kv.get(SERVICES_PREFIX, recurse=True)
    _, vip_entries = await client.kv.get(VIPS_PREFIX, recurse=True)
    docs, doc_index, vips, vip_index = {}, {}, {}, {}
    for e in doc_entries or ():
        name = e["Key"][len(SERVICES_PREFIX):]
        if not name or "/" in name:
            continue
        try:
            doc = json.loads(e.get("Value") or b"")
        except ValueError:
            doc = None
        docs[name] = doc if isinstance(doc, dict) else {}  # unreadable: rewritten by this apply
        doc_index[name] = int(e["ModifyIndex"])
    for e in vip_entries or ():
        ip = e["Key"][len(VIPS_PREFIX):]
        vips[ip] = (e.get("Value") or b"").decode("utf-8", "replace")
        vip_index[ip] = int(e["ModifyIndex"])
    return CatalogState(docs, doc_index, vips, vip_index)


async def _with_tokens(client: consul.aio.Consul, changes: list[ServiceChange]) -> list[ServiceChange]:
    """``changes`` with each created or updated service's restart token (which the
    replicas' revision includes), read after the write. One that cannot be read counts as
    none: the write is done, and only the revision printed is at stake."""
    async def token(name: str) -> str | None:
        try:
            _, entry = await client.kv.get(restart_key(name))
            return restart_token(json.loads((entry or {}).get("Value") or b"null"))
        except (ValueError, aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
            log.warning("cannot read the restart token of %s: %s", name, exc)
            return None

    wanted = [c for c in changes if c.action in (CREATED, UPDATED)]
    tokens = await asyncio.gather(*(token(c.name) for c in wanted))
    by_name = {c.name: dataclasses.replace(c, token=t) for c, t in zip(wanted, tokens)}
    return [by_name.get(c.name, c) for c in changes]


async def _txn(client: consul.aio.Consul, ops: list[dict[str, Any]]) -> None:
    try:
        await kv_txn(client, ops)
    except TxnRolledBack as exc:
        raise TxnConflict(str(exc)) from None


async def apply_services(client: consul.aio.Consul, desired: Mapping[str, Any], vip_range: str, *,
                         prune: bool = False, dry_run: bool = False,
                         attempts: int = ATTEMPTS) -> list[ServiceChange]:
    """Plan against the catalog and write the plan; returns what happened to each service."""
    done: dict[str, ServiceChange] = {}  # written by an earlier chunk of a split plan
    last = ""
    for attempt in range(attempts):
        state = await read_state(client)
        plan = plan_apply(desired, state.docs, state.vips, vip_range, prune)
        if dry_run:
            return await _with_tokens(client, list(plan.changes))
        try:
            for chunk in txn_chunks(plan, state.doc_index, state.vip_index):
                await _txn(client, [op for _, ops in chunk for op in ops])
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
        return await _with_tokens(client, [results[name] for name in sorted(results)])
    raise ApplyError(f"the catalog kept changing under this apply ({attempts} attempts); last conflict: {last}")


def load_or_report(path: str, command: str, err: TextIO) -> config.MeshConfig | None:
    """FILE loaded and checked, or None after printing every problem in it (each with
    file, line and field path) or why it could not be read: the caller exits 2."""
    try:
        return config.load(path)
    except config.ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=err)
    except OSError as exc:
        print(f"meshlet {command}: cannot read {path}: {exc.strerror or exc}", file=err)
    return None


async def run(path: str, *, url: str | None = None, dry_run: bool = False, prune: bool = False,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``meshlet apply``: 0 done, 1 catalog trouble, 2 invalid file."""
    cfg = load_or_report(path, "apply", err)
    if cfg is None:
        return 2
    mesh = cfg.mesh
    url = resolve_catalog_url(url, os.environ, mesh.catalog, mesh.catalog_listen)
    changes = await apply_to(url, cfg.services, mesh.vip_range, prune=prune, dry_run=dry_run, err=err)
    if changes is None:
        return 1
    for change in changes:
        for line in format_change(change, dry_run):
            print(line, file=out)
    if dry_run:
        print("dry run: nothing written", file=out)
    return 0


async def apply_to(url: str, services: Mapping[str, Any], vip_range: str, *, prune: bool = False,
                   dry_run: bool = False, err: TextIO = sys.stderr) -> list[ServiceChange] | None:
    """Apply to the catalog at ``url``; errors are printed to ``err`` (None returned)."""
    try:
        client = connect(url, timeout=15.0)
    except ValueError as exc:
        print(f"meshlet apply: {exc}", file=err)
        return None
    try:
        return await apply_services(client, services, vip_range, prune=prune, dry_run=dry_run)
    except ApplyError as exc:
        print(f"meshlet apply: {exc}", file=err)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        print(f"meshlet apply: cannot reach the catalog at {url}: {exc or type(exc).__name__}", file=err)
    except consul.ConsulException as exc:
        print(f"meshlet apply: the catalog at {url} refused the request: {exc}", file=err)
    finally:
        await client.close()
    return None
