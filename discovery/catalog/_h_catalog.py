"""``/v1/catalog/*`` and ``/v1/health/*`` handlers (agent/catalog_endpoint.go, health_endpoint.go).

Blocking indexes are targeted (agent/consul/state/catalog.go ``maxIndexForService``):
a service's endpoints use ``service.<name>`` (``service_extinction`` when it has no
instances), a node's use ``node.<name>``, the services list ``service_names``, the node
list ``nodes`` and health/state ``checks``.
"""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from ._catalog import catalog_deregister, catalog_register
from ._decode import DecodeError, decode_struct, parse_bool
from ._errors import BadRequest, CatalogError
from ._filter import apply_filter
from ._http import Req, Router, dumps, json_response
from ._model import State, node_index_name, svc_index_name
from ._render import (
    catalog_service_entries, check_json, health_entries, node_json, node_service_json,
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


async def _blocking_list(req: Req, topic: str, index_of: Callable[[], int], items: Callable[[], list[Any]]) -> web.StreamResponse:
    if req.query.get("filter") is not None:
        apply_filter([], req.query["filter"])  # a bad filter is a 400 before blocking
    index, data = await req.block(lambda: (index_of(), items()), topics=(topic,))
    return req.json(apply_filter(data, req.query.get("filter")), index)


# -- catalog ---------------------------------------------------------------------------
async def catalog_register_h(req: Req) -> web.StreamResponse:
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


async def catalog_deregister_h(req: Req) -> web.StreamResponse:
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


async def catalog_datacenters(req: Req) -> web.StreamResponse:
    return req.json([req.server.opts.datacenter], req.server.store.index)


async def catalog_nodes(req: Req) -> web.StreamResponse:
    st = req.server.state
    meta = _node_meta(req)

    def items() -> list[Any]:
        rows = (st.nodes.rows[n] for n in sorted(st.nodes.rows))
        return [node_json(r) for r in rows if all((r.get("Meta") or {}).get(k) == v for k, v in meta)]

    return await _blocking_list(req, "nodes", lambda: max(1, st.index_of("nodes", 1)), items)


async def catalog_services(req: Req) -> web.StreamResponse:
    st = req.server.state
    meta = _node_meta(req)

    def evaluate() -> tuple[int, Any]:
        index = max(1, st.index_of("service_names", 1))
        if not meta:
            return index, st.service_names()
        names: dict[str, set[str]] = {}
        for (node, _), svc in st.services.rows.items():
            node_row = st.nodes.rows.get(node) or {}
            if all((node_row.get("Meta") or {}).get(k) == v for k, v in meta):
                names.setdefault(svc["Service"], set()).update(svc.get("Tags") or ())
        return index, {n: sorted(t) for n, t in sorted(names.items())}

    index, data = await req.block(evaluate, topics=("service_names",) if not meta else ("services",))
    return req.json(data, index)


async def catalog_service(req: Req) -> web.StreamResponse:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st, cache = req.server.state, req.server.render_cache
    tags, meta = _tags(req), _node_meta(req)
    if "filter" in req.query:
        apply_filter([], req.query["filter"])

    def evaluate() -> tuple[int, Any]:
        index = service_index(st, name)
        items = cache.get(("cs", name, tags, meta), index, lambda: catalog_service_entries(st, name, tags, meta))
        return index, items

    index, items = await req.block(evaluate, topics=(svc_index_name(name),))
    return req.json(apply_filter(items, req.query.get("filter")), index)


async def catalog_node(req: Req) -> web.StreamResponse:
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

    index, data = await req.block(evaluate, topics=(node_index_name(node), "nodes"))
    return req.json(data, index)


# -- health ----------------------------------------------------------------------------
async def health_service(req: Req) -> web.StreamResponse:
    name = req.tail
    if not name:
        raise BadRequest("Missing service name")
    st, cache = req.server.state, req.server.render_cache
    tags, meta, passing = _tags(req), _node_meta(req), _passing(req)
    peer = req.query.get("peer", "")
    filtered = "filter" in req.query
    if filtered:
        apply_filter([], req.query["filter"])

    def evaluate() -> tuple[int, Any]:
        index = service_index(st, name)
        if peer:
            return index, b"[]"  # no peerings here: nothing is imported from a peer
        key = ("hs", name, tags, meta, passing)
        if filtered or req.pretty:
            return index, cache.get(key, index, lambda: health_entries(st, name, tags, passing, meta))
        return index, cache.get(key + ("bytes",), index, lambda: dumps(health_entries(st, name, tags, passing, meta)))

    index, data = await req.block(evaluate, topics=(svc_index_name(name),))
    if isinstance(data, bytes):
        return json_response(None, index=index, body=data)
    return req.json(apply_filter(data, req.query.get("filter")), index)


async def health_connect(req: Req) -> web.StreamResponse:
    """No service mesh here: no connect-capable or ingress instances, ever."""
    st = req.server.state
    name = req.tail
    index, _ = await req.block(lambda: (service_index(st, name), None), topics=(svc_index_name(name),))
    return req.json([], index)


async def health_checks(req: Req) -> web.StreamResponse:
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


async def health_state(req: Req) -> web.StreamResponse:
    state = req.tail
    if state not in _STATES:
        raise BadRequest("Invalid check state")
    st = req.server.state

    def items() -> list[Any]:
        rows = (st.checks.rows[k] for k in sorted(st.checks.rows))
        return [check_json(r) for r in rows if state == "any" or r["Status"] == state]

    return await _blocking_list(req, "checks", lambda: max(1, st.index_of("checks", 1)), items)


async def health_node(req: Req) -> web.StreamResponse:
    node = req.tail
    if not node:
        raise BadRequest("Missing node name")
    st = req.server.state
    return await _blocking_list(req, node_index_name(node), lambda: node_index(st, node),
                                lambda: [check_json(c) for c in st.all_node_checks(node)])


def register(router: Router) -> None:
    add = router.add
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
