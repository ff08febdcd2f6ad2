"""Rows -> Consul's JSON shapes.

Rows are already Consul-shaped (see _model); rendering picks the fields each endpoint
shows, fills Consul's defaults (``Proxy``/``Connect`` objects, ``[]`` not null) and drops
internal fields. Rendered answers are memoised by the watch hub (one encoding per query
and store version), so every watcher woken by one change shares one rendering.
"""

from __future__ import annotations

from typing import Any

from ._model import State

__all__ = [
    "node_json", "node_service_json", "agent_service_json", "check_json", "catalog_service_json",
    "health_entries", "catalog_service_entries",
]

_DEFAULT_PROXY = {"Mode": "", "MeshGateway": {}, "Expose": {}}
_OPTIONAL_SERVICE_FIELDS = ("Kind", "TaggedAddresses", "SocketPath", "Locality")
_CHECK_FIELDS = (
    "Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "ServiceName", "ServiceTags",
    "Type", "Interval", "Timeout", "ExposedPort", "Definition", "CreateIndex", "ModifyIndex",
)


def node_json(node: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": node.get("ID", ""),
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": node["Datacenter"],
        "TaggedAddresses": node.get("TaggedAddresses") or {},
        "Meta": node.get("Meta") or {},
        "CreateIndex": node["CreateIndex"],
        "ModifyIndex": node["ModifyIndex"],
    }


def node_service_json(svc: dict[str, Any]) -> dict[str, Any]:
    """structs.NodeService as health/service and catalog/node show it."""
    out: dict[str, Any] = {"ID": svc["ID"], "Service": svc["Service"], "Tags": svc.get("Tags") or []}
    for f in _OPTIONAL_SERVICE_FIELDS:
        if svc.get(f):
            out[f] = svc[f]
    out.update(
        Address=svc.get("Address", ""),
        Meta=svc.get("Meta") or {},
        Port=svc.get("Port", 0),
        Weights=svc.get("Weights") or {"Passing": 1, "Warning": 1},
        EnableTagOverride=bool(svc.get("EnableTagOverride")),
        Proxy=svc.get("Proxy") or dict(_DEFAULT_PROXY),
        Connect=svc.get("Connect") or {},
        PeerName="",
        CreateIndex=svc["CreateIndex"],
        ModifyIndex=svc["ModifyIndex"],
    )
    return out


def agent_service_json(svc: dict[str, Any], datacenter: str) -> dict[str, Any]:
    """api.AgentService as /v1/agent/services shows it (omitempty fields left out)."""
    out: dict[str, Any] = {"ID": svc["ID"], "Service": svc["Service"], "Tags": svc.get("Tags") or []}
    for f in _OPTIONAL_SERVICE_FIELDS:
        if svc.get(f):
            out[f] = svc[f]
    out.update(
        Meta=svc.get("Meta") or {},
        Port=svc.get("Port", 0),
        Address=svc.get("Address", ""),
        Weights=svc.get("Weights") or {"Passing": 1, "Warning": 1},
        EnableTagOverride=bool(svc.get("EnableTagOverride")),
        Datacenter=datacenter,
    )
    for f in ("Proxy", "Connect"):
        if svc.get(f):
            out[f] = svc[f]
    return out


def check_json(check: dict[str, Any]) -> dict[str, Any]:
    out = {f: check.get(f, "") for f in _CHECK_FIELDS}
    out["ServiceTags"] = check.get("ServiceTags") or []
    out["ExposedPort"] = check.get("ExposedPort", 0)
    out["Definition"] = check.get("Definition") or {}
    return out


def catalog_service_json(node: dict[str, Any], svc: dict[str, Any]) -> dict[str, Any]:
    """structs.ServiceNode: the flat shape of /v1/catalog/service/<name>."""
    return {
        "ID": node.get("ID", ""),
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": node["Datacenter"],
        "TaggedAddresses": node.get("TaggedAddresses") or {},
        "NodeMeta": node.get("Meta") or {},
        "ServiceKind": svc.get("Kind", ""),
        "ServiceID": svc["ID"],
        "ServiceName": svc["Service"],
        "ServiceTags": svc.get("Tags") or [],
        "ServiceAddress": svc.get("Address", ""),
        "ServiceTaggedAddresses": svc.get("TaggedAddresses") or {},
        "ServiceWeights": svc.get("Weights") or {"Passing": 1, "Warning": 1},
        "ServiceMeta": svc.get("Meta") or {},
        "ServicePort": svc.get("Port", 0),
        "ServiceSocketPath": svc.get("SocketPath", ""),
        "ServiceEnableTagOverride": bool(svc.get("EnableTagOverride")),
        "ServiceProxy": svc.get("Proxy") or dict(_DEFAULT_PROXY),
        "ServiceConnect": svc.get("Connect") or {},
        "ServiceLocality": svc.get("Locality"),
        "CreateIndex": svc["CreateIndex"],
        "ModifyIndex": svc["ModifyIndex"],
    }


def _has_tags(svc: dict[str, Any], tags: tuple[str, ...]) -> bool:
    if not tags:
        return True
    have = svc.get("Tags") or ()
    return all(t in have for t in tags)


def _node_meta_matches(node: dict[str, Any], node_meta: tuple[tuple[str, str], ...]) -> bool:
    meta = node.get("Meta") or {}
    return all(meta.get(k) == v for k, v in node_meta)


def health_entries(
    st: State, name: str, tags: tuple[str, ...] = (), passing: bool = False,
    node_meta: tuple[tuple[str, str], ...] = (), connect: bool = False,
) -> list[dict[str, Any]]:
    """/v1/health/service/<name>: Node, Service and Checks (node checks too) per instance.
    ``connect``: the instances that serve ``name`` over Connect instead (health/connect)."""
    out = []
    nodes = st.nodes.rows
    for node_name, sid in (sorted(st.connect_by_dest.get(name, ())) if connect else st.instances(name)):
        svc = st.services.rows[(node_name, sid)]
        if not _has_tags(svc, tags):
            continue
        node = nodes.get(node_name)
        if node is None or not _node_meta_matches(node, node_meta):
            continue
        checks = st.node_checks(node_name) + st.service_checks(node_name, sid)
        checks.sort(key=lambda c: c["CheckID"])
        if passing and any(c["Status"] != "passing" for c in checks):
            continue
        out.append({"Node": node_json(node), "Service": node_service_json(svc), "Checks": [check_json(c) for c in checks]})
    return out


def catalog_service_entries(
    st: State, name: str, tags: tuple[str, ...] = (), node_meta: tuple[tuple[str, str], ...] = (),
    connect: bool = False,
) -> list[dict[str, Any]]:
    out = []
    for node_name, sid in (sorted(st.connect_by_dest.get(name, ())) if connect else st.instances(name)):
        svc = st.services.rows[(node_name, sid)]
        node = st.nodes.rows.get(node_name)
        if node is None or not _has_tags(svc, tags) or not _node_meta_matches(node, node_meta):
            continue
        out.append(catalog_service_json(node, svc))
    return out
