"""``meshlet apply``: store the services of a meshlet.yaml in the catalog, with stable VIPs.

Flow::

    config.load(FILE) --desired--+
    KV meshlet/services/ --current+--> core.apply_plan.plan_apply --ApplyPlan--> txn_chunks
    KV meshlet/vips/ ----in use--+                                           --> PUT /v1/txn (CAS)

The KV operations of a write are built here, once each (``document_op``, ``vip_claim_op``,
``vip_release_op``, ``restart_op``); ``meshlet rollback`` builds its transaction from them.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import consul
import consul.aio

import config
from discovery.consul import TxnRolledBack, connect, kv_op, kv_txn

from ..core.apply_plan import (CREATED, DELETED, UNCHANGED, UPDATED, ApplyError, ApplyPlan, ServiceChange,
                               VipRangeExhausted, diff_fields, format_change, plan_apply, resolve_catalog_url)
from ..core.revisions import read_restart_token

__all__ = [
    "ApplyError", "ApplyPlan", "ServiceChange", "TxnConflict", "VipRangeExhausted", "apply_services",
    "diff_fields", "format_change", "plan_apply", "read_state", "resolve_catalog_url", "run", "txn_chunks",
    "document_op", "vip_claim_op", "vip_release_op", "restart_op", "txn", "load_or_report", "apply_to",
    "CREATED", "UPDATED", "UNCHANGED", "DELETED",
]

log = logging.getLogger(__name__)

TXN_MAX_OPS = 64  # Consul rejects a transaction with more operations
ATTEMPTS = 8  # re-read and re-plan after a CAS conflict at most this often

class TxnConflict(ApplyError):
    """A CAS in the transaction failed: someone else changed the state we planned on."""


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


async def read_state(client: consul.aio.Consul) -> CatalogState:
    _, doc_entries = await client.kv.get(config.SERVICES_PREFIX, recurse=True)
    _, vip_entries = await client.kv.get(config.VIPS_PREFIX, recurse=True)
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
    return CatalogState(docs, doc_index, vips, vip_index)


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
