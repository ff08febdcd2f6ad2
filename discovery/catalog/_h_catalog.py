"""``/v1/catalog/*`` and ``/v1/health/*`` handlers (agent/catalog_endpoint.go, health_endpoint.go).

Blocking indexes are targeted (agent/consul/state/catalog.go ``maxIndexForService``):
a service's endpoints use ``service.<name>`` (``service_extinction`` when it has no
instances), a node's use ``node.<name>``, the services list ``service_names``, the node
list ``nodes`` and health/state ``checks``.
"""

from __future__ import annotations

from typing import Any, Callable

from ._catalog import catalog_deregister, catalog_register
from ._decode import DecodeError, decode_struct, parse_bool
from ._errors import BadRequest, CatalogError
from ._filter import apply_filter
from ._http import Answer, Req, Router, json_response
from ._model import State, node_index_name, svc_index_name
from ._render import (
    catalog_service_entries, catalog_service_json, check_json, health_entries, node_json, node_service_json,
)
from ._schemas import CATALOG_DEREGISTER, CATALOG_REGISTER

__all__ = ["register", "service_index"]

_STATES = ("any", "passing", "warning", "critical")


def service_index(st: State, name: str) -> int:
    """The index a service's answers carry (Consul's maxIndexForService)."""
    if name in st.services_by_name:
        return max(1, st.index_of(svc_index_name(name), 1))
    return max(1, st.index_of("service_extinction", 0) or st.index_of("services", 1))


def node_index(st: State, node: str) -> int:
    if node in st.nodes:
        return max(1, st.index_of(node_index_name(node), 1))
    return max(1, st.index_of("nodes", 1))


def _tags(req: Req) -> tuple[str, ...]:
    return tuple(req.query.getall("tag", ()))


def _node_meta(req: Req) -> tuple[tuple[str, str], ...]:
    out = []
    for item in req.query.getall("node-meta", ()):
        key, sep, value = item.partition(":")
        if not sep:
            raise BadRequest(f"Invalid node-meta filter {item!r}: expected key:value")
        out.append((key, value))
    return tuple(sorted(out))


def _peer(req: Req) -> str:
    """``?peer=``: there are no cluster peerings here, so every peer is unknown and its
    imported services are none (Consul answers an empty list, index headers included)."""
    return req.query.get("peer", "")


def _passing(req: Req) -> bool:
    if "passing" not in req.query:
        return False
    value = req.query["passing"]
    if value == "":
        return True
    try:
        return parse_bool(value)
    except DecodeError:
        raise BadRequest("Invalid value for ?passing") from None


def _filtered(req: Req) -> Callable[[int, Any], Any]:
    """The reply of a list endpoint with ``?filter=`` applied (a bad filter is a 400 at
    once, before blocking)."""
    text = req.query.get("filter")
    pretty = req.pretty
    if text is not None:
        apply_filter([], text)
    return lambda index, data: json_response(apply_filter(data, text), index=index, pretty=pretty)


async def _blocking_list(req: Req, topic: str, index_of: Callable[[], int], items: Callable[[], list[Any]]) -> Answer:
    if _peer(req):
        return req.block(lambda: (index_of(), []), _filtered(req), topics=(topic,))
    return req.block(lambda: (index_of(), items()), _filtered(req), topics=(topic,))


# -- catalog ---------------------------------------------------------------------------
async def catalog_register_h(req: Req) -> Answer:
    try:
        d = decode_struct(await req.json_body(), CATALOG_REGISTER)
    except DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None
    opts = req.server.opts
    if d.get("Datacenter") and d["Datacenter"] != opts.datacenter:
        raise CatalogError("No path to datacenter")
    st = req.server.state
    await req.server.store.write(lambda tx: catalog_register(st, tx, d, opts.node, opts.datacenter))
    return req.json(True)


async def catalog_deregister_h(req: Req) -> Answer:
    try:
        d = decode_struct(await req.json_body(), CATALOG_DEREGISTER)
    except DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from None
    opts = req.server.opts
    if d.get("Datacenter") and d["Datacenter"] != opts.datacenter:
        raise CatalogError("No path to datacenter")
    st = req.server.state
    await req.server.store.write(lambda tx: catalog_deregister(st, tx, d, opts.node))
    return req.json(True)


async def catalog_datacenters(req: Req) -> Answer:
    return req.json([req.server.opts.datacenter], req.server.store.index)


async def catalog_nodes(req: Req) -> Answer:
    st = req.server.state
    meta = _node_meta(req)

    def items() -> list[Any]:
        rows = (st.nodes.rows[n] for n in sorted(st.nodes.rows))
        return [node_json(r) for r in rows if all((r.get("Meta") or {}).get(k) == v for k, v in meta)]

    return await _blocking_list(req, "nodes", lambda: max(1, st.index_of("nodes", 1)), items)


async def catalog_services(req: Req) -> Answer:
    """Names -> tags. With ``?filter=`` (or ``node-meta``) the instances are filtered
    first (the filter sees ServiceNode fields, as for /v1/catalog/service) and the tags
    are gathered from the matching instances only (catalog_endpoint.go ListServices,
    servicesTagsByName)."""
    st = req.server.state
    meta = _node_meta(req)
    text = req.query.get("filter")
    peer = _peer(req)
    if text is not None:
        apply_filter([], text)  # a bad filter is a 400 before blocking
    if peer:
        return req.block(lambda: (max(1, st.index_of("service_names", 1)), {}), topics=("service_names",))
    if not meta and text is None:
        return req.block(lambda: (max(1, st.index_of("service_names", 1)), st.service_names()),
                         topics=("service_names",))

    def evaluate() -> tuple[int, Any]:
        index = max(1, st.index_of("services", 1), st.index_of("nodes", 1))
        entries = [catalog_service_json(st.nodes.rows[node], svc)
                   for (node, _), svc in sorted(st.services.rows.items()) if node in st.nodes.rows]
        entries = [e for e in entries if all(e["NodeMeta"].get(k) == v for k, v in meta)]
        names: dict[str, set[str]] = {}
        for e in apply_filter(entries, text):
            names.setdefault(e["ServiceName"], set()).update(e["ServiceTags"])
        return index, {n: sorted(t) for n, t in sorted(names.items())}

    return req.block(evaluate, topics=("services", "nodes"))


async def catalog_service(req: Req) -> Answer:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st = req.server.state
    tags, meta, peer = _tags(req), _node_meta(req), _peer(req)
    respond = _filtered(req)
    if peer:
        return req.block(lambda: (service_index(st, name), []), respond, topics=(svc_index_name(name),))
    return req.block(lambda: (service_index(st, name), catalog_service_entries(st, name, tags, meta)), respond,
                     topics=(svc_index_name(name),))


async def catalog_node(req: Req) -> Answer:
    node = req.tail
    if not node:
        raise BadRequest("Missing node name")
    st = req.server.state

    def evaluate() -> tuple[int, Any]:
        row = st.nodes.get(node)
        if row is None:
            return node_index(st, node), None
        services = {}
        for sid in sorted(st.services_by_node.get(node, ())):
            services[sid] = node_service_json(st.services.rows[(node, sid)])
        return node_index(st, node), {"Node": node_json(row), "Services": services}

    return req.block(evaluate, topics=(node_index_name(node), "nodes"))


async def catalog_node_services(req: Req) -> Answer:
    """The list form of catalog/node (CatalogNodeServiceList): ``{"Node": ..., "Services":
    [...]}``; for an unknown node both are null, as the RPC leaves them."""
    node = req.tail
    if not node:
        raise BadRequest("Missing node name")
    st = req.server.state

    def evaluate() -> tuple[int, Any]:
        row = st.nodes.get(node)
        if row is None or _peer(req):
            return node_index(st, node), {"Node": None, "Services": None}
        services = [node_service_json(st.services.rows[(node, sid)]) for sid in sorted(st.services_by_node.get(node, ()))]
        return node_index(st, node), {"Node": node_json(row), "Services": services}

    return req.block(evaluate, topics=(node_index_name(node), "nodes"))


# -- health ----------------------------------------------------------------------------
async def health_service(req: Req) -> Answer:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st = req.server.state
    tags, meta, passing = _tags(req), _node_meta(req), _passing(req)
    peer = _peer(req)
    respond = _filtered(req)

    def evaluate() -> tuple[int, Any]:
        index = service_index(st, name)
        if peer:
            return index, []  # no peerings here: nothing is imported from a peer
        return index, health_entries(st, name, tags, passing, meta)

    return req.block(evaluate, respond, topics=(svc_index_name(name),))


def connect_index(st: State, name: str) -> tuple[int, tuple[str, ...]]:
    """The index of ``name``'s Connect endpoints and the topics that move it: the
    destination's own, every proxy's, and ``services`` (a proxy registered or removed)."""
    names = {st.services.rows[k]["Service"] for k in st.connect_by_dest.get(name, ())}
    index = max([service_index(st, name)] + [service_index(st, n) for n in names] + [st.index_of("services", 1)])
    return index, tuple(svc_index_name(n) for n in sorted(names | {name})) + ("services",)


async def health_connect(req: Req) -> Answer:
    """Connect-capable instances of a service: its sidecar proxies (and Connect-native
    instances). No mesh runs behind them here; these are the registrations."""
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st = req.server.state
    tags, meta, passing, peer = _tags(req), _node_meta(req), _passing(req), _peer(req)
    respond = _filtered(req)
    if req.request.path.startswith("/v1/health/ingress/") or peer:  # no ingress gateways, no peers
        return req.block(lambda: (service_index(st, name), []), respond, topics=(svc_index_name(name),))
    _, topics = connect_index(st, name)
    return req.block(lambda: (connect_index(st, name)[0], health_entries(st, name, tags, passing, meta, connect=True)),
                     respond, topics=topics)


async def catalog_connect(req: Req) -> Answer:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st = req.server.state
    tags, meta, peer = _tags(req), _node_meta(req), _peer(req)
    respond = _filtered(req)
    _, topics = connect_index(st, name)
    return req.block(lambda: (connect_index(st, name)[0],
                              [] if peer else catalog_service_entries(st, name, tags, meta, connect=True)),
                     respond, topics=topics)


async def health_checks(req: Req) -> Answer:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st = req.server.state

    def items() -> list[Any]:
        out = []
        for node, sid in st.instances(name):
            out.extend(check_json(c) for c in st.service_checks(node, sid))
        return out

    return await _blocking_list(req, svc_index_name(name), lambda: service_index(st, name), items)


async def health_state(req: Req) -> Answer:
    state = req.tail
    if state not in _STATES:
        raise BadRequest("Invalid check state")
    st = req.server.state

    def items() -> list[Any]:
        rows = (st.checks.rows[k] for k in sorted(st.checks.rows))
        return [check_json(r) for r in rows if state == "any" or r["Status"] == state]

    return await _blocking_list(req, "checks", lambda: max(1, st.index_of("checks", 1)), items)


async def health_node(req: Req) -> Answer:
    node = req.tail
    if not node:
        raise BadRequest("Missing node name")
    st = req.server.state
    return await _blocking_list(req, node_index_name(node), lambda: node_index(st, node),
                                lambda: [check_json(c) for c in st.all_node_checks(node)])


async def gateway_services(req: Req) -> Answer:
    """No gateways are configured here (no config entries): an empty list, with the index."""
    name = req.tail
    if not name:
        raise BadRequest("Missing gateway name")
    st = req.server.state
    return req.block(lambda: (service_index(st, name), []), topics=(svc_index_name(name),))


def register(router: Router) -> None:
    add = router.add
    add("/v1/catalog/gateway-services/", {"GET": gateway_services})
    add("/v1/catalog/connect/", {"GET": catalog_connect})
    add("/v1/catalog/node-services/", {"GET": catalog_node_services})
    add("/v1/catalog/register", {"PUT": catalog_register_h})
    add("/v1/catalog/deregister", {"PUT": catalog_deregister_h})
    add("/v1/catalog/datacenters", {"GET": catalog_datacenters}, check_dc=False)
    add("/v1/catalog/nodes", {"GET": catalog_nodes})
    add("/v1/catalog/services", {"GET": catalog_services})
    add("/v1/catalog/service/", {"GET": catalog_service})
    add("/v1/catalog/node/", {"GET": catalog_node})
    add("/v1/health/service/", {"GET": health_service})
    add("/v1/health/connect/", {"GET": health_connect})
    add("/v1/health/ingress/", {"GET": health_connect})
    add("/v1/health/checks/", {"GET": health_checks})
    add("/v1/health/state/", {"GET": health_state})
    add("/v1/health/node/", {"GET": health_node})
