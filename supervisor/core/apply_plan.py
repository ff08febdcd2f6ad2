"""What ``meshlet apply`` writes: the service documents and VIP reservations. Pure.

``plan_apply(desired, current, vips_in_use, vip_range, prune) -> ApplyPlan``: per service
created / updated / unchanged / deleted, the documents to write (config's KV service
document) and the VIPs to claim and release. ``format_change`` and ``diff_fields`` word a
change as ``meshlet apply`` prints it. The transaction that writes a plan is built by
``commands.apply.txn_chunks``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import config

from .redact import is_secret_path
from .revisions import target_revision

__all__ = ["CREATED", "UPDATED", "UNCHANGED", "DELETED", "ApplyError", "VipRangeExhausted", "ServiceChange",
           "ApplyPlan", "plan_apply", "lowest_free_vip", "replica_revision", "diff_fields", "format_change",
           "resolve_catalog_url"]

CREATED, UPDATED, UNCHANGED, DELETED = "created", "updated", "unchanged", "deleted"


class ApplyError(Exception):
    """Something the user has to fix or retry; ``str()`` says what."""


class VipRangeExhausted(ApplyError):
    pass


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

    def line(k: str) -> str:
        if not is_secret_path(k):
            return f"{k}: {show(a, k)} → {show(b, k)}"
        return f"{k}: {'changed' if k in a and k in b else 'added' if k in b else 'removed'} (value not shown)"

    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, a) != b.get(k, a))
    lines = [line(k) for k in keys[:limit]]
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
