"""The catalog's tables and the derived indexes kept beside them.

Tables (key -> row; rows are Consul-shaped dicts, replaced whole on every change):

    kv        key -> {Key, Flags, LockIndex, Session, CreateIndex, ModifyIndex, Value: bytes|None}
    tombs     deleted KV key -> {i: index of the delete, t: unix time}  (Consul's "graveyard")
    nodes     node name -> {ID, Node, Address, Datacenter, TaggedAddresses, Meta, ...}
    services  (node, service ID) -> NodeService {ID, Service, Tags, Port, ...} (+ "_internal")
    checks    (node, check ID) -> HealthCheck {CheckID, Status, Output, ...} (+ "_def": how to run it)
    sessions  session ID -> {ID, Name, Node, LockDelay, Behavior, TTL, NodeChecks, ...}
    indexes   index name -> {i: last index}   (memory only; see _store: named indexes are wake-up topics)

Derived indexes (memory only, maintained by table observers so undo keeps them right):

    services_by_name   name -> {(node, id)}          services_by_node  node -> {id}
    service_tags       name -> Counter(tag)          (catalog/services answers from it)
    checks_by_service  (node, service id) -> {check id}    checks_by_node  node -> {check id}
    kv_by_session      session -> {key}              sessions_by_node  node -> {id}
    connect_by_dest    service name -> {(node, id)} of its proxies and Connect-native instances

Named indexes: ``kvs`` (any KV write), ``nodes``, ``services`` (any service row),
``service_names`` (the name -> tags map changed), ``service.<name>``,
``service_extinction`` (last time a service name disappeared), ``node.<name>``,
``checks``, ``sessions``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ._store import Row, Table

__all__ = ["State", "public", "svc_index_name", "node_index_name", "connect_destination"]

VERSION = "1.20.6"  # the Consul API level we answer as (agent/self Config.Version)


def _kv_dump(row: Row) -> tuple[str, bytes | None]:
    meta = {k: v for k, v in row.items() if k != "Value"}
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False), row.get("Value")


def _kv_load(doc: str, blob: bytes | None) -> Row:
    row = json.loads(doc)
    row["Value"] = bytes(blob) if blob else None
    return row


def public(row: Row) -> Row:
    """A row without its internal ("_"-prefixed) fields."""
    return {k: v for k, v in row.items() if k[0] != "_"}


def connect_destination(svc: Row) -> str:
    """The service a connect-proxy fronts, or a Connect-native service's own name, else ""."""
    if svc.get("Kind") == "connect-proxy":
        return (svc.get("Proxy") or {}).get("DestinationServiceName") or ""
    if (svc.get("Connect") or {}).get("Native"):
        return svc["Service"]
    return ""


def svc_index_name(name: str) -> str:
    return "service." + name


def node_index_name(name: str) -> str:
    return "node." + name


def _add(mapping: dict, key: Any, member: Any) -> None:
    mapping.setdefault(key, set()).add(member)


def _remove(mapping: dict, key: Any, member: Any) -> None:
    members = mapping.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del mapping[key]


class State:
    """All tables plus derived indexes. Reads are plain attribute access."""

    def __init__(self) -> None:
        self.kv: Table[str] = Table("kv", sorted_keys=True, dump=_kv_dump, load=_kv_load)
        self.tombs: Table[str] = Table("tombs", sorted_keys=True)
        self.nodes: Table[str] = Table("nodes")
        self.services: Table[tuple[str, str]] = Table("services", tuple_keys=True)
        self.checks: Table[tuple[str, str]] = Table("checks", tuple_keys=True)
        self.sessions: Table[str] = Table("sessions")
        self.indexes: Table[str] = Table("indexes", persist=False)

        self.services_by_name: dict[str, set[tuple[str, str]]] = {}
        self.services_by_node: dict[str, set[str]] = {}
        self.service_tags: dict[str, Counter[str]] = {}
        self.checks_by_service: dict[tuple[str, str], set[str]] = {}
        self.checks_by_node: dict[str, set[str]] = {}
        self.kv_by_session: dict[str, set[str]] = {}
        self.sessions_by_node: dict[str, set[str]] = {}
        # Connect: destination service name -> {(node, id)} of its connect-proxy instances
        # and of its Connect-native instances (health/connect, catalog/connect).
        self.connect_by_dest: dict[str, set[tuple[str, str]]] = {}
        # KV lock-delay: key -> monotonic time before which `acquire` fails (memory only,
        # like Consul's; a restart forgets it).
        self.lock_delays: dict[str, float] = {}
        # Named indexes are memory only: one not bumped since start reads as this (the
        # global index at start, set by the store when it loads).
        self.index_floor = 0

        self.services.observers.append(self._observe_service)
        self.checks.observers.append(self._observe_check)
        self.kv.observers.append(self._observe_kv)
        self.sessions.observers.append(self._observe_session)

    def tables(self) -> list[Table]:
        return [self.kv, self.tombs, self.nodes, self.services, self.checks, self.sessions, self.indexes]

    # -- observers ----------------------------------------------------------------------
    def _observe_service(self, key: tuple[str, str], old: Row | None, new: Row | None) -> None:
        node, sid = key
        if old is not None and (dest := connect_destination(old)):
            _remove(self.connect_by_dest, dest, key)
        if new is not None and (dest := connect_destination(new)):
            _add(self.connect_by_dest, dest, key)
        if old is not None:
            name = old["Service"]
            _remove(self.services_by_name, name, key)
            _remove(self.services_by_node, node, sid)
            tags = self.service_tags.get(name)
            if tags is not None:
                tags.subtract(set(old.get("Tags") or ()))
                for t in [t for t, n in tags.items() if n <= 0]:
                    del tags[t]
                if name not in self.services_by_name:
                    del self.service_tags[name]
        if new is not None:
            name = new["Service"]
            _add(self.services_by_name, name, key)
            _add(self.services_by_node, node, sid)
            self.service_tags.setdefault(name, Counter()).update(set(new.get("Tags") or ()))

    def _observe_check(self, key: tuple[str, str], old: Row | None, new: Row | None) -> None:
        node, cid = key
        if old is not None:
            _remove(self.checks_by_node, node, cid)
            if old.get("ServiceID"):
                _remove(self.checks_by_service, (node, old["ServiceID"]), cid)
        if new is not None:
            _add(self.checks_by_node, node, cid)
            if new.get("ServiceID"):
                _add(self.checks_by_service, (node, new["ServiceID"]), cid)

    def _observe_kv(self, key: str, old: Row | None, new: Row | None) -> None:
        if old is not None and old.get("Session"):
            _remove(self.kv_by_session, old["Session"], key)
        if new is not None and new.get("Session"):
            _add(self.kv_by_session, new["Session"], key)

    def _observe_session(self, key: str, old: Row | None, new: Row | None) -> None:
        if old is not None:
            _remove(self.sessions_by_node, old["Node"], key)
        if new is not None:
            _add(self.sessions_by_node, new["Node"], key)

    # -- reads --------------------------------------------------------------------------
    def index_of(self, name: str, default: int = 0) -> int:
        """A named index; one never bumped since start is the index at start (see _store)."""
        row = self.indexes.rows.get(name)
        return row["i"] if row is not None else max(default, self.index_floor)

    def service_names(self) -> dict[str, list[str]]:
        """catalog/services: name -> sorted unique tags."""
        return {name: sorted(tags) for name, tags in sorted(self.service_tags.items())}

    def instances(self, name: str) -> list[tuple[str, str]]:
        """Keys of a service's instances in state-store order (node, then service ID)."""
        return sorted(self.services_by_name.get(name, ()))

    def service_checks(self, node: str, sid: str) -> list[Row]:
        ids = self.checks_by_service.get((node, sid))
        if not ids:
            return []
        rows = self.checks.rows
        return [rows[(node, cid)] for cid in sorted(ids)]

    def node_checks(self, node: str) -> list[Row]:
        """Node-level checks (no ServiceID) of ``node``, by check ID."""
        ids = self.checks_by_node.get(node, ())
        rows = self.checks.rows
        out = [rows[(node, cid)] for cid in sorted(ids)]
        return [r for r in out if not r.get("ServiceID")]

    def all_node_checks(self, node: str) -> list[Row]:
        ids = self.checks_by_node.get(node, ())
        rows = self.checks.rows
        return [rows[(node, cid)] for cid in sorted(ids)]
