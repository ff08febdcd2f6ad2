"""Nodes, services and checks: the write ops behind the agent and catalog endpoints.

Every function here is an op body (``fn(st, tx, ...)`` run by the store's writer): it
validates everything first, then writes, and bumps exactly the indexes whose answers
changed (see _model for their names), so that blocking queries wake only when theirs did:

* a service row: ``service.<name>``, ``services``, ``node.<node>``; ``service_names`` if
  the name -> tags map changed; ``service_extinction`` when a name's last instance goes;
* a check row: ``checks``, ``node.<node>`` and ``service.<name>`` of its service, or of
  every service on the node for a node-level check (its status shows in all of them);
* a node row: ``nodes``, ``node.<node>`` and every service on the node.

A write that changes nothing (same row, same status and output) takes no index.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

from ._checkdef import CRITICAL, PASSING, STATUSES, check_definition, definition_json, has_script, truncate_output
from ._connect import proxy_json, sidecar_definition, sidecar_id, split_sidecar
from ._decode import format_go_duration
from ._errors import BadRequest, CatalogError, NotFound
from ._model import State, node_index_name, svc_index_name
from ._sessions import invalidate_for_check, invalidate_for_node
from ._store import Row, Tx

__all__ = [
    "bootstrap_node", "register_service", "deregister_service", "register_check", "deregister_check",
    "update_ttl_check", "set_check_status", "service_maintenance", "node_maintenance",
    "catalog_register", "catalog_deregister", "unknown_service", "unknown_check", "reap_critical_service",
]

SERF_HEALTH = "serfHealth"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT = "_node_maintenance"
DEFAULT_SERVICE_REASON = "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
DEFAULT_NODE_REASON = "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def unknown_service(sid: str) -> NotFound:
    return NotFound(f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.')


def unknown_check(cid: str) -> NotFound:
    return NotFound(f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')


def _strip(row: Row | None) -> Row | None:
    if row is None:
        return None
    return {k: v for k, v in row.items() if k not in ("CreateIndex", "ModifyIndex")}


def _is_internal(row: Row | None) -> bool:
    return bool(row and row.get("_internal"))


# -- index bookkeeping -------------------------------------------------------------------
def _names(st: State, names: set[str]) -> dict[str, frozenset[str] | None]:
    return {n: (frozenset(st.service_tags[n]) if n in st.service_tags else None) for n in names}


class _ServiceNames:
    """Bumps ``service_names``/``service_extinction`` if the names touched by an op changed."""

    def __init__(self, st: State, tx: Tx, *names: str) -> None:
        self.st, self.tx = st, tx
        self.before = _names(st, {n for n in names if n})

    def add(self, name: str) -> None:
        if name and name not in self.before:
            self.before[name] = _names(self.st, {name})[name]

    def done(self) -> None:
        after = _names(self.st, set(self.before))
        if after != self.before:
            self.tx.bump("service_names")
        if any(self.before[n] is not None and after[n] is None for n in self.before):
            self.tx.bump("service_extinction")


def _bump_service(tx: Tx, node: str, *names: str) -> None:
    tx.bump("services", node_index_name(node), *{svc_index_name(n) for n in names if n})


def _bump_node_services(st: State, tx: Tx, node: str) -> None:
    names = {st.services.rows[(node, sid)]["Service"] for sid in st.services_by_node.get(node, ())}
    tx.bump(node_index_name(node), *(svc_index_name(n) for n in names))


def _bump_check(st: State, tx: Tx, row: Row) -> None:
    tx.bump("checks", node_index_name(row["Node"]))
    if row.get("ServiceID"):
        if row.get("ServiceName"):
            tx.bump(svc_index_name(row["ServiceName"]))
    else:
        _bump_node_services(st, tx, row["Node"])


def _put_check(st: State, tx: Tx, row: Row) -> bool:
    """Write a check row (without indexes) if it differs; True if written."""
    key = (row["Node"], row["CheckID"])
    prev = st.checks.get(key)
    if prev is not None and _strip(prev) == row:
        return False
    idx = tx.index
    tx.put(st.checks, key, {**row, "CreateIndex": prev["CreateIndex"] if prev else idx, "ModifyIndex": idx})
    _bump_check(st, tx, row)
    if row["Status"] == CRITICAL and (prev is None or prev["Status"] != CRITICAL):
        invalidate_for_check(st, tx, row["Node"], row["CheckID"])
    return True


def _remove_check(st: State, tx: Tx, node: str, cid: str) -> None:
    row = st.checks.get((node, cid))
    if row is None:
        return
    tx.delete(st.checks, (node, cid))
    _bump_check(st, tx, row)
    invalidate_for_check(st, tx, node, cid)


def _remove_service(st: State, tx: Tx, node: str, sid: str) -> None:
    svc = st.services.get((node, sid))
    if svc is None:
        return
    names = _ServiceNames(st, tx, svc["Service"])
    for cid in sorted(st.checks_by_service.get((node, sid), ())):
        _remove_check(st, tx, node, cid)
    tx.delete(st.services, (node, sid))
    _bump_service(tx, node, svc["Service"])
    names.done()


def reap_critical_service(st: State, tx: Tx, key: tuple[str, str], critical_for: float,
                          after_ns: int) -> bool:
    """DeregisterCriticalServiceAfter: remove the check's service if the check is still
    critical, still asks for it, and has been critical for long enough."""
    row = st.checks.get(key)
    if row is None or row["Status"] != CRITICAL or not row.get("ServiceID"):
        return False
    if (row.get("_def") or {}).get("deregister") != after_ns or critical_for * 1e9 + 5e7 < after_ns:
        return False
    _remove_service(st, tx, row["Node"], row["ServiceID"])
    return True


# -- validation ---------------------------------------------------------------------------
def _validate_meta(meta: dict[str, str], what: str = "Service") -> None:
    if len(meta) > 64:
        raise BadRequest(f"Invalid {what} Meta: Node metadata cannot contain more than 64 key/value pairs")
    for k, v in meta.items():
        problem = None
        if not k:
            problem = "Key cannot be blank"
        elif len(k) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif not _META_KEY.match(k):
            problem = "Key contains invalid characters"
        elif k.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(v) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise BadRequest(f"Invalid {what} Meta: Couldn't load metadata pair ('{k}', '{v}'): {problem}")


def _weights(d: dict[str, Any]) -> dict[str, int]:
    w = d.get("Weights")
    if w is None:
        return {"Passing": 1, "Warning": 1}
    passing, warning = w.get("Passing", 0), w.get("Warning", 0)
    if passing < 1:
        raise BadRequest("Invalid Weights: Passing must be greater than 0")
    if warning < 0:
        raise BadRequest("Invalid Weights: Warning must be greater or equal than 0")
    if passing > 65535 or warning > 65535:
        raise BadRequest("Invalid Weights: weight must be inferior to 65536")
    return {"Passing": passing, "Warning": warning}


def _service_row(d: dict[str, Any], sid: str, name: str, agent: bool = False) -> Row:
    addr = d.get("Address", "")
    if addr in ("0.0.0.0", "::", "[::]"):
        raise BadRequest("Invalid service address")
    meta = d.get("Meta") or {}
    _validate_meta(meta)
    for ns_field in ("Namespace", "Partition"):
        if d.get(ns_field) not in (None, "", "default"):
            raise BadRequest(f"Invalid {ns_field.lower()} {d[ns_field]!r}: only 'default' exists here")
    row: Row = {"ID": sid, "Service": name, "Tags": list(d.get("Tags") or [])}
    for f in ("Kind", "TaggedAddresses", "SocketPath", "Locality", "Proxy", "Connect"):
        if d.get(f):
            row[f] = d[f]
    if agent:  # decoded ServiceDefinition: Connect holds only Native, Proxy shows Consul's defaults
        row.pop("Connect", None)
        if (d.get("Connect") or {}).get("Native"):
            row["Connect"] = {"Native": True}
        if d.get("Proxy"):
            row["Proxy"] = proxy_json(d["Proxy"])
    row.update(Address=addr, Meta=meta, Port=d.get("Port", 0), Weights=_weights(d),
               EnableTagOverride=bool(d.get("EnableTagOverride")))
    return row


def _agent_check_row(node: str, cid: str, name: str, c: dict[str, Any], dfn: dict[str, Any],
                     prev: Row | None, sid: str = "", svc_name: str = "", tags: list[str] | None = None) -> Row:
    status = prev["Status"] if prev else (c.get("Status") or CRITICAL)
    return {
        "Node": node, "CheckID": cid, "Name": name, "Status": status, "Notes": c.get("Notes", ""),
        "Output": prev["Output"] if prev else "", "ServiceID": sid, "ServiceName": svc_name,
        "ServiceTags": list(tags or []), "Type": dfn["kind"],
        "Interval": format_go_duration(dfn["interval"]) if dfn.get("interval") else "",
        "Timeout": format_go_duration(dfn["timeout"]) if dfn.get("timeout") else "",
        "ExposedPort": 0, "Definition": definition_json(dfn), "_def": dfn,
    }


# -- bootstrap ----------------------------------------------------------------------------
def bootstrap_node(st: State, tx: Tx, node: str, address: str, datacenter: str) -> None:
    """Make sure the catalog's own node, its serfHealth check and the consul service exist."""
    prev = st.nodes.get(node)
    row: Row = {
        "ID": prev["ID"] if prev else str(uuid.uuid4()),
        "Node": node,
        "Address": address,
        "Datacenter": datacenter,
        "TaggedAddresses": {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address},
        "Meta": {"consul-network-segment": ""},
    }
    if _strip(prev) != row:
        idx = tx.index
        tx.put(st.nodes, node, {**row, "CreateIndex": prev["CreateIndex"] if prev else idx, "ModifyIndex": idx})
        tx.bump("nodes")
        _bump_node_services(st, tx, node)
    _put_check(st, tx, {
        "Node": node, "CheckID": SERF_HEALTH, "Name": "Serf Health Status", "Status": PASSING,
        "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
        "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
        "_internal": True,
    })
    consul = {"ID": "consul", "Service": "consul", "Tags": [], "Address": "", "Meta": {"raft_version": "3"},
              "Port": 8300, "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "_internal": True}
    prev_svc = st.services.get((node, "consul"))
    if _strip(prev_svc) != consul:
        names = _ServiceNames(st, tx, "consul")
        idx = tx.index
        tx.put(st.services, (node, "consul"),
               {**consul, "CreateIndex": prev_svc["CreateIndex"] if prev_svc else idx, "ModifyIndex": idx})
        _bump_service(tx, node, "consul")
        names.done()


# -- agent: services ----------------------------------------------------------------------
def register_service(st: State, tx: Tx, node: str, d: dict[str, Any], replace_checks: bool = False,
                     script_refusal: str | None = None, local: bool = False) -> None:
    """Agent service registration. ``script_refusal``: why a script check may not be
    registered from where this came (``_checkdef.script_policy``), None if it may;
    ``local``: it comes from a config file (reload removes what the files no longer
    name). A ``Connect.SidecarService`` registers ``<id>-sidecar-proxy`` too (_connect)."""
    parent, sidecar = split_sidecar(d)
    sid = _register_one(st, tx, node, parent, replace_checks, script_refusal, local)
    if sidecar is not None:
        key = (node, sidecar_id(sid))
        current = st.services.get(key)
        used = [st.services.rows[(node, other)].get("Port", 0) for other in st.services_by_node.get(node, ())
                if (node, other) != key]
        definition = sidecar_definition(parent, sid, sidecar, used, current["Port"] if current else None)
        _register_one(st, tx, node, definition, replace_checks, script_refusal, local, sidecar_of=sid)


def _register_one(st: State, tx: Tx, node: str, d: dict[str, Any], replace_checks: bool,
                  script_refusal: str | None, local: bool, sidecar_of: str = "") -> str:
    name = d.get("Name", "")
    if not name:
        raise BadRequest("Missing service name")
    sid = d.get("ID") or name
    row = _service_row(d, sid, name, agent=True)
    if local:
        row["_local"] = True
    if sidecar_of:
        row["_sidecar_of"] = sidecar_of
    checks_in = [c for c in ([d.get("Check")] + list(d.get("Checks") or [])) if c]
    defs = [check_definition(c) for c in checks_in]
    if script_refusal and has_script(defs):
        raise CatalogError(script_refusal)
    existing = st.services.get((node, sid))
    if _is_internal(existing):
        raise BadRequest(f'Invalid service ID "{sid}": reserved by the catalog')
    names = _ServiceNames(st, tx, name, existing["Service"] if existing else "")
    if _strip(existing) != row:
        idx = tx.index
        tx.put(st.services, (node, sid),
               {**row, "CreateIndex": existing["CreateIndex"] if existing else idx, "ModifyIndex": idx})
        _bump_service(tx, node, name, existing["Service"] if existing else "")
    wanted: set[str] = set()
    for i, (c, dfn) in enumerate(zip(checks_in, defs)):
        cid = c.get("ID") or (f"service:{sid}" + (f":{i + 1}" if len(checks_in) > 1 else ""))
        wanted.add(cid)
        cname = c.get("Name") or f"Service '{name}' check"
        prev = st.checks.get((node, cid))
        if _is_internal(prev):
            raise BadRequest(f'Invalid check ID "{cid}": reserved by the catalog')
        check_row = _agent_check_row(node, cid, cname, c, dfn, prev, sid, name, row["Tags"])
        if local:
            check_row["_local"] = True
        _put_check(st, tx, check_row)
    for cid in sorted(st.checks_by_service.get((node, sid), set()) - wanted):
        old = st.checks.rows[(node, cid)]
        if replace_checks and not cid.startswith(SERVICE_MAINT_PREFIX):
            _remove_check(st, tx, node, cid)
        elif old["ServiceName"] != name or old["ServiceTags"] != row["Tags"]:
            _put_check(st, tx, {**_strip(old), "ServiceName": name, "ServiceTags": list(row["Tags"])})  # type: ignore[dict-item]
    names.done()
    return sid


def deregister_service(st: State, tx: Tx, node: str, sid: str) -> None:
    svc = st.services.get((node, sid))
    if svc is None or _is_internal(svc):
        raise unknown_service(sid)
    _remove_service(st, tx, node, sid)
    # A sidecar registered through this service's SidecarService goes with it.
    sidecar = st.services.get((node, sidecar_id(sid)))
    if sidecar is not None and sidecar.get("_sidecar_of") == sid:
        _remove_service(st, tx, node, sidecar_id(sid))


def service_maintenance(st: State, tx: Tx, node: str, sid: str, enable: bool, reason: str) -> None:
    svc = st.services.get((node, sid))
    if svc is None or _is_internal(svc):
        raise unknown_service(sid)
    cid = SERVICE_MAINT_PREFIX + sid
    if not enable:
        _remove_check(st, tx, node, cid)
        return
    if (node, cid) in st.checks:
        return  # already in maintenance: keep the first reason, as Consul does
    _put_check(st, tx, {
        "Node": node, "CheckID": cid, "Name": "Service Maintenance Mode", "Status": CRITICAL,
        "Notes": reason or DEFAULT_SERVICE_REASON, "Output": "", "ServiceID": sid, "ServiceName": svc["Service"],
        "ServiceTags": list(svc.get("Tags") or []), "Type": "maintenance", "Interval": "", "Timeout": "",
        "ExposedPort": 0, "Definition": {},
    })


def node_maintenance(st: State, tx: Tx, node: str, enable: bool, reason: str) -> None:
    if not enable:
        _remove_check(st, tx, node, NODE_MAINT)
        return
    if (node, NODE_MAINT) in st.checks:
        return
    _put_check(st, tx, {
        "Node": node, "CheckID": NODE_MAINT, "Name": "Node Maintenance Mode", "Status": CRITICAL,
        "Notes": reason or DEFAULT_NODE_REASON, "Output": "", "ServiceID": "", "ServiceName": "",
        "ServiceTags": [], "Type": "maintenance", "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
    })


# -- agent: checks ------------------------------------------------------------------------
def register_check(st: State, tx: Tx, node: str, c: dict[str, Any], script_refusal: str | None = None,
                   local: bool = False) -> None:
    """Agent check registration; ``script_refusal`` and ``local`` as for register_service."""
    name = c.get("Name", "")
    if not name:
        raise BadRequest("Missing check name")
    dfn = check_definition(c)
    cid = c.get("ID") or name
    sid = c.get("ServiceID", "")
    svc = None
    if sid:
        svc = st.services.get((node, sid))
        if svc is None or _is_internal(svc):
            raise NotFound(f'ServiceID "{sid}" does not exist')  # agent_endpoint.go: 404
    prev = st.checks.get((node, cid))
    if _is_internal(prev):
        raise BadRequest(f'Invalid check ID "{cid}": reserved by the catalog')
    if script_refusal and has_script([dfn]):
        raise CatalogError(script_refusal)
    row = _agent_check_row(node, cid, name, c, dfn, prev, sid, svc["Service"] if svc else "",
                           svc.get("Tags") if svc else None)
    if local:
        row["_local"] = True
    if prev is not None and prev.get("ServiceID") and prev["ServiceID"] != sid:
        _remove_check(st, tx, node, cid)  # moves to another service: both services' indexes move
        prev = None
    _put_check(st, tx, row)


def deregister_check(st: State, tx: Tx, node: str, cid: str) -> None:
    row = st.checks.get((node, cid))
    if row is None or _is_internal(row):
        raise unknown_check(cid)
    _remove_check(st, tx, node, cid)


def set_check_status(st: State, tx: Tx, key: tuple[str, str], status: str, output: str,
                     expect_def: dict[str, Any] | None = None) -> bool:
    """Record a check result; nothing is written (no index) if status and output are the same.

    ``expect_def``: only if the check still has this definition (a probe of a check that
    was re-registered or removed meanwhile must not write).
    """
    row = st.checks.get(key)
    if row is None or (expect_def is not None and row.get("_def") != expect_def):
        return False
    dfn = row.get("_def") or {}
    if dfn.get("kind") != "script":  # a script's output is already cut, Consul's way (_script)
        output = truncate_output(output, dfn.get("output_max") or 4096)
    if row["Status"] == status and row["Output"] == output:
        return False
    return _put_check(st, tx, {**_strip(row), "Status": status, "Output": output})  # type: ignore[dict-item]


def update_ttl_check(st: State, tx: Tx, node: str, cid: str, status: str, output: str,
                     ttl_reset: Callable[[tuple[str, str]], None]) -> None:
    """pass/warn/fail/update of a TTL check: reset its TTL, then record the status."""
    if status not in STATUSES:
        raise BadRequest(f"Invalid check status: '{status}'")
    row = st.checks.get((node, cid))
    if row is None or _is_internal(row):
        raise unknown_check(cid)
    if (row.get("_def") or {}).get("kind") != "ttl":
        raise CatalogError(f'CheckID "{cid}" does not have associated TTL')
    ttl_reset((node, cid))
    set_check_status(st, tx, (node, cid), status, output)


# -- catalog register/deregister ----------------------------------------------------------
def catalog_register(st: State, tx: Tx, d: dict[str, Any], local_node: str, datacenter: str) -> None:
    node = d.get("Node", "")
    if not node:
        raise BadRequest("Must provide node")
    prev = st.nodes.get(node)
    skip = bool(d.get("SkipNodeUpdate")) and prev is not None
    if not skip and not d.get("Address"):
        raise BadRequest("Must provide address if SkipNodeUpdate is not set")
    svc_in = d.get("Service")
    svc_row = None
    if svc_in:
        sname = svc_in.get("Service", "")
        if not sname:
            raise BadRequest("Must provide service name with ID")
        svc_row = _service_row(svc_in, svc_in.get("ID") or sname, sname)
        if _is_internal(st.services.get((node, svc_row["ID"]))):
            raise BadRequest(f'Invalid service ID "{svc_row["ID"]}": reserved by the catalog')
    checks_in = [c for c in ([d.get("Check")] + list(d.get("Checks") or [])) if c]
    for c in checks_in:
        if c.get("Node") and c["Node"] != node:
            raise BadRequest(f"Node mismatch, {c['Node']!r} != {node!r}")
        if c.get("Status") and c["Status"] not in STATUSES:
            raise BadRequest("Status for checks must 'passing', 'warning', 'critical'")
        if not (c.get("CheckID") or c.get("Name")):
            raise BadRequest("Must provide check ID or name")
        if _is_internal(st.checks.get((node, c.get("CheckID") or c["Name"]))):
            raise BadRequest(f'Invalid check ID "{c.get("CheckID") or c["Name"]}": reserved by the catalog')
    if d.get("NodeMeta"):
        _validate_meta(d["NodeMeta"], "Node")
    if not skip:
        row: Row = {
            "ID": d.get("ID") or (prev["ID"] if prev else ""),
            "Node": node,
            "Address": d["Address"],
            "Datacenter": datacenter,
            "TaggedAddresses": d.get("TaggedAddresses") or (prev.get("TaggedAddresses") if prev else {}) or {},
            "Meta": d.get("NodeMeta") or (prev.get("Meta") if prev else {}) or {},
        }
        if node == local_node and prev is not None:
            row["ID"] = prev["ID"]
        if _strip(prev) != row:
            idx = tx.index
            tx.put(st.nodes, node, {**row, "CreateIndex": prev["CreateIndex"] if prev else idx, "ModifyIndex": idx})
            tx.bump("nodes")
            _bump_node_services(st, tx, node)
    if svc_row is not None:
        key = (node, svc_row["ID"])
        existing = st.services.get(key)
        names = _ServiceNames(st, tx, svc_row["Service"], existing["Service"] if existing else "")
        if _strip(existing) != svc_row:
            idx = tx.index
            tx.put(st.services, key,
                   {**svc_row, "CreateIndex": existing["CreateIndex"] if existing else idx, "ModifyIndex": idx})
            _bump_service(tx, node, svc_row["Service"], existing["Service"] if existing else "")
        names.done()
    for c in checks_in:
        cid = c.get("CheckID") or c["Name"]
        sid = c.get("ServiceID", "")
        svc = st.services.get((node, sid)) if sid else None
        if sid and svc is None:
            raise CatalogError("Missing service registration")
        prev_check = st.checks.get((node, cid))
        _put_check(st, tx, {
            "Node": node, "CheckID": cid, "Name": c.get("Name", ""), "Status": c.get("Status") or CRITICAL,
            "Notes": c.get("Notes", ""), "Output": c.get("Output", ""), "ServiceID": sid,
            "ServiceName": svc["Service"] if svc else "", "ServiceTags": list(svc.get("Tags") or []) if svc else [],
            "Type": c.get("Type", ""), "Interval": c.get("Interval", ""), "Timeout": c.get("Timeout", ""),
            "ExposedPort": c.get("ExposedPort", 0), "Definition": c.get("Definition") or {},
            **({"_def": prev_check["_def"]} if prev_check and prev_check.get("_def") else {}),
        })


def catalog_deregister(st: State, tx: Tx, d: dict[str, Any], local_node: str) -> None:
    node = d.get("Node", "")
    if not node:
        raise BadRequest("Must provide node")
    if d.get("ServiceID") and d.get("CheckID"):
        raise BadRequest("Must not provide both ServiceID and CheckID")
    if node not in st.nodes:
        return
    if d.get("ServiceID"):
        if not _is_internal(st.services.get((node, d["ServiceID"]))):
            _remove_service(st, tx, node, d["ServiceID"])
        return
    if d.get("CheckID"):
        if not _is_internal(st.checks.get((node, d["CheckID"]))):
            _remove_check(st, tx, node, d["CheckID"])
        return
    # The whole node. The catalog's own node stays (with its serfHealth and consul
    # service): only what was registered on it goes.
    for sid in sorted(st.services_by_node.get(node, ())):
        if not _is_internal(st.services.rows[(node, sid)]):
            _remove_service(st, tx, node, sid)
    for cid in sorted(st.checks_by_node.get(node, ())):
        if not _is_internal(st.checks.rows[(node, cid)]):
            _remove_check(st, tx, node, cid)
    if node != local_node:
        for sid in sorted(st.services_by_node.get(node, ())):
            _remove_service(st, tx, node, sid)
        invalidate_for_node(st, tx, node)
        tx.delete(st.nodes, node)
        tx.bump("nodes", node_index_name(node))
