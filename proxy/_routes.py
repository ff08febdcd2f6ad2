"""The proxy's routing table: hosts and path prefixes to clusters of endpoints.

Vocabulary
----------
Endpoint, Cluster
    Defined in :mod:`proxy._balance` (re-exported here): one instance port with its
    live stats, and the endpoints of one service port with their balancer.
ClusterSettings
    A service's ``routes`` settings (``config.Routes``) as the engine reads them; the
    defaults are config's.
Route
    (host, path prefix) -> cluster, with strip_prefix.
RouteTable
    Everything the engine routes by: entry hosts, VIP listeners, clusters. Built whole
    from a catalog ``View`` by :func:`build_table` and never written after; the engine
    swaps it whole (fabio ``SetTable``).

Flow::

    View --build_table(view, previous=old)--> RouteTable
    engine: table.match(host, path) -> Route -> cluster.pick() -> begin/end

Routing rules
-------------
- Hosts: ``<service>.service.<domain>`` and every ``routes.hosts`` entry, compared
  exactly and case-insensitively; ``*.example.test`` matches any name ending in
  ``.example.test`` (the longest wildcard wins). An unknown host matches nothing (404).
- Paths: the longest ``routes.paths[].prefix`` that the path starts with (a plain byte
  prefix, as Envoy and fabio: ``/api`` also matches ``/apix``). Default: ``/``.
- Entry routes go to the service's first ``http`` port; a service without spec (not
  applied with meshlet) gets ``/`` on its catalog ``Port``; a spec without an http
  port gets no host route.
- Conflicts (two services claim one host and prefix): a service's own
  ``<service>.service.<domain>`` name always wins, then the first service by name.
  Every conflict is logged once (when it appears) and listed in ``to_json()``.
- VIP listeners: one per (vip, vip_port) of every port of a service with a VIP;
  a clash goes to the first service by name, logged.

Specs arrive typed and validated (``discovery.view.ServiceView.spec``: the Mirror drops a
document that does not validate and keeps the last good one), so nothing here re-checks
or re-defaults a field.

One request, as the engine drives it::

    route = table.match(host, path)                  # None -> 404
    c = route.cluster
    if not c.try_acquire_pending(): ...              # 503, breaker open
    try:
        tried = set()
        ep = c.pick(key, tried)                      # None -> 503, no ready instance
        c.begin(ep); ...; c.end(ep, status=..., failure=..., latency=...)
        # a retry: if c.retry_allowed(): c.retry_begin(); tried.add(ep.id); pick again;
        #          ... c.retry_end() when that retry's attempt ends
    finally:
        c.release_pending()

``key`` for ring_hash follows ``c.settings.hash_on``: the header's value, the cookie's
value (``_balance.cookie_value``) or the client IP as bytes; None when absent. A TCP
connection is one attempt: ``end(status=None, failure=None)`` on a normal close
teaches the outlier detector nothing; ``failure="connect"`` does.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import config

from ._balance import Cluster, Endpoint, _Shared

if TYPE_CHECKING:  # pragma: no cover
    from discovery.view import View

    from ._metrics import Metrics

__all__ = [
    "Endpoint",
    "TimeoutSettings",
    "ClusterSettings",
    "RetrySettings",
    "OutlierSettings",
    "Cluster",
    "Route",
    "RouteTable",
    "build_table",
]

log = logging.getLogger("meshlet.proxy.routes")

Clock = Callable[[], float]


# Every default is config's (config.Routes): a service registered by another tool, with no
# spec, is routed with ``config.Routes()``.
_ROUTES = config.Routes()
TimeoutSettings = config.Timeouts
RetrySettings = config.Retries
OutlierSettings = config.Outlier


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """A service's ``routes`` as the engine reads them (``from_routes``)."""
    policy: str = _ROUTES.policy
    # None | ("header", lower-case name) | ("cookie", name) | ("source_ip", None)
    hash_on: tuple[str, str | None] | None = None
    retries: config.Retries = _ROUTES.retries
    timeouts: config.Timeouts = _ROUTES.timeouts
    outlier: config.Outlier = _ROUTES.outlier
    max_pending: int = _ROUTES.max_pending  # Envoy's max_pending_requests; 0 = no limit

    @classmethod
    def from_routes(cls, routes: config.Routes) -> ClusterSettings:
        return cls(policy=routes.policy, hash_on=_hash_on(routes.hash_on), retries=routes.retries,
                   timeouts=routes.timeouts, outlier=routes.outlier, max_pending=routes.max_pending)


DEFAULT_SETTINGS = ClusterSettings()


class Route:
    __slots__ = ("cluster", "prefix", "strip_prefix", "host")

    def __init__(self, cluster: Cluster, prefix: bytes, strip_prefix: bool, host: bytes = b"") -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.strip_prefix = strip_prefix
        self.host = host

    def rewrite(self, path: bytes) -> bytes:
        """The request target to send upstream: the prefix removed if strip_prefix,
        always starting with '/' (``/api?q=1`` with prefix ``/api`` gives ``/?q=1``)."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix):]
        if rest[:1] != b"/":
            rest = b"/" + rest
        return rest

    def __repr__(self) -> str:
        return f"<Route {self.host.decode()}{self.prefix.decode()} -> {self.cluster.name}:{self.cluster.port_name}>"


_Prefixes = tuple[tuple[bytes, Route], ...]  # longest prefix first


class RouteTable:
    """Immutable once built. ``match`` and ``vip_listeners`` are the engine's lookups."""

    def __init__(self, *, hosts: dict[bytes, _Prefixes], wildcards: dict[bytes, _Prefixes],
                 vip_listeners: Mapping[tuple[str, int], Cluster],
                 clusters: Mapping[tuple[str, str | None], Cluster], conflicts: tuple[str, ...],
                 index: int, domain: str, state: dict[str, Any]) -> None:
        self._hosts = hosts
        self._wildcards = wildcards
        self.vip_listeners: Mapping[tuple[str, int], Cluster] = MappingProxyType(dict(vip_listeners))
        self.clusters: Mapping[tuple[str, str | None], Cluster] = MappingProxyType(dict(clusters))
        self.conflicts = conflicts
        self.index = index
        self.domain = domain
        self._state = state  # what the next build_table reuses: shared counters, parsed specs, clock

    def match(self, host: bytes, path: bytes) -> Route | None:
        """The route for a request, or None (404). ``host``: lower-case, without port."""
        routes = self._hosts.get(host)
        if routes is None:
            routes = self._slow_host(host)
            if routes is None:
                return None
        for prefix, route in routes:
            if path.startswith(prefix):
                return route
        return None

    def _slow_host(self, host: bytes) -> _Prefixes | None:
        if host.endswith(b"."):
            host = host[:-1]
        host = host.lower()
        routes = self._hosts.get(host)
        if routes is not None:
            return routes
        if self._wildcards:
            i = host.find(b".")
            while i > 0:  # at least one character before the wildcard's suffix
                routes = self._wildcards.get(host[i:])
                if routes is not None:
                    return routes
                i = host.find(b".", i + 1)
        return None

    def cluster(self, service: str, port_name: str | None = None) -> Cluster | None:
        """The cluster of a service's port (its first port when ``port_name`` is None)."""
        c = self.clusters.get((service, port_name))
        if c is not None or port_name is not None:
            return c
        for (svc, _), c in self.clusters.items():
            if svc == service:
                return c
        return None

    def ejected_by_service(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (svc, _), c in self.clusters.items():
            out[svc] = out.get(svc, 0) + c.ejected_count()
        return out

    def to_json(self) -> dict[str, Any]:
        hosts: dict[str, list[dict[str, Any]]] = {}
        def add(name: str, routes: _Prefixes) -> None:
            hosts[name] = [{"prefix": p.decode(), "strip_prefix": r.strip_prefix, "service": r.cluster.name,
                            "port_name": r.cluster.port_name} for p, r in routes]
        for h, routes in sorted(self._hosts.items()):
            add(h.decode(), routes)
        for suffix, routes in sorted(self._wildcards.items()):
            add("*" + suffix.decode(), routes)
        services: dict[str, Any] = {}
        for (svc, _), c in sorted(self.clusters.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            info = self._state["specs"].get(svc)
            entry = services.setdefault(svc, {"vip": info.vip if info else None,
                                              "revision": info.revision if info else None, "clusters": []})
            entry["clusters"].append(c.to_json())
        return {
            "index": self.index, "domain": self.domain, "hosts": hosts, "services": services,
            "vip_listeners": [{"listen": f"{vip}:{port}", "service": c.name, "port_name": c.port_name,
                               "protocol": c.protocol} for (vip, port), c in sorted(self.vip_listeners.items())],
            "conflicts": list(self.conflicts),
        }


# -- reading a spec ---------------------------------------------------------------------

def _hash_on(h: config.HashOn | None) -> tuple[str, str | None] | None:
    """config validated exactly one of header / cookie / source_ip."""
    if h is None:
        return None
    if h.header:
        return ("header", h.header.lower())
    if h.cookie:
        return ("cookie", h.cookie)
    return ("source_ip", None)


@dataclass(frozen=True, slots=True)
class _PortSpec:
    name: str | None
    protocol: str
    vip_port: int | None


@dataclass(frozen=True, slots=True)
class _ServiceInfo:
    spec: config.ServiceSpec | None  # what these were read from (compared to skip re-reading)
    vip: str | None
    revision: str | None
    settings: ClusterSettings
    ports: tuple[_PortSpec, ...]
    hosts: tuple[bytes, ...]
    paths: tuple[tuple[bytes, bool], ...]


def _service_info(spec: config.ServiceSpec | None, vip: str | None, revision: str | None) -> _ServiceInfo:
    if spec is None:  # registered by another tool: its catalog Port, plain HTTP, defaults
        return _ServiceInfo(None, vip, revision, DEFAULT_SETTINGS, (_PortSpec(None, "http", None),), (),
                            ((b"/", False),))
    routes = spec.routes
    return _ServiceInfo(
        spec, vip, revision, ClusterSettings.from_routes(routes),
        tuple(_PortSpec(p.name, p.protocol, p.vip_port) for p in spec.ports),
        tuple(h.encode() for h in routes.hosts),
        tuple((p.prefix.encode(), p.strip_prefix) for p in routes.paths))


# -- build ------------------------------------------------------------------------------

def build_table(view: View, *, domain: str = "meshlet", previous: RouteTable | None = None,
                metrics: Metrics | None = None, clock: Clock | None = None,
                rng: random.Random | None = None) -> RouteTable:
    """A new table from a catalog view. ``previous``: the table being replaced, whose
    endpoint stats, shared counters, parsed specs and clock/RNG/metrics carry over
    (unchanged clusters are reused as they are)."""
    prev_state = previous._state if previous is not None else {}
    clock = clock or prev_state.get("clock") or time.monotonic
    rng = rng or prev_state.get("rng") or random.Random()
    metrics = metrics if metrics is not None else prev_state.get("metrics")
    prev_specs: dict[str, _ServiceInfo] = prev_state.get("specs", {})
    prev_shared: dict[tuple[str, str | None], _Shared] = prev_state.get("shared", {})
    prev_clusters = previous.clusters if previous is not None else {}
    now = clock()
    domain_b = domain.strip(".").lower()

    specs: dict[str, _ServiceInfo] = {}
    shared: dict[tuple[str, str | None], _Shared] = {}
    clusters: dict[tuple[str, str | None], Cluster] = {}
    claims: list[tuple[int, str, bytes, bytes, bool, Cluster]] = []
    vip_claims: list[tuple[str, str, int, Cluster]] = []

    for name in sorted(view.services):
        sv = view.services[name]
        info = prev_specs.get(name)
        if (info is None or not (info.spec is sv.spec or info.spec == sv.spec) or info.vip != sv.vip
                or info.revision != sv.revision):
            info = _service_info(sv.spec, sv.vip, sv.revision)
        specs[name] = info
        ready = sorted(sv.ready(), key=lambda i: i.id)
        http_cluster = None
        for ps in info.ports:
            key = (name, ps.name)
            if key in clusters:
                log.warning("service %s: port %r listed twice; the first is used", name, ps.name)
                continue
            sh = prev_shared.get(key) or _Shared()
            shared[key] = sh
            eps = _endpoints(ready, ps.name, sh, now)
            c = prev_clusters.get(key)
            sig = (ps.protocol, info.settings, tuple((e.id, e.address, e.port, e.weight) for e in eps))
            if c is None or c.signature != sig or c._shared is not sh or c._metrics is not metrics:
                c = Cluster(name, ps.name, ps.protocol, info.settings, eps, shared=sh, clock=clock, rng=rng,
                            metrics=metrics)
            clusters[key] = c
            if http_cluster is None and ps.protocol == "http":
                http_cluster = c
            if sv.vip and ps.vip_port:
                vip_claims.append((name, sv.vip, ps.vip_port, c))
        if http_cluster is not None:
            own = f"{name}.service.{domain_b}".lower().encode()
            for prefix, strip in info.paths:
                claims.append((0, name, own, prefix, strip, http_cluster))
                for h in info.hosts:
                    claims.append((1, name, h, prefix, strip, http_cluster))

    conflicts: list[str] = []
    table_hosts: dict[bytes, dict[bytes, Route]] = {}
    # Own names first, then by service name; a stable sort keeps each spec's order.
    for rank, svc, host, prefix, strip, c in sorted(claims, key=lambda t: (t[0], t[1])):
        routes = table_hosts.setdefault(host, {})
        have = routes.get(prefix)
        if have is not None:
            if have.cluster.name != svc:
                conflicts.append(f"host {host.decode()} prefix {prefix.decode()}: claimed by "
                                 f"{have.cluster.name} and {svc}; {have.cluster.name} wins")
            continue
        routes[prefix] = Route(c, prefix, strip, host)
    vips: dict[tuple[str, int], Cluster] = {}
    for svc, vip, port, c in vip_claims:
        have = vips.get((vip, port))
        if have is not None:
            conflicts.append(f"listener {vip}:{port}: claimed by {have.name} and {svc}; {have.name} wins")
            continue
        vips[(vip, port)] = c
    old = set(previous.conflicts) if previous is not None else set()
    for msg in conflicts:
        if msg not in old:
            log.warning("route conflict: %s", msg)

    exact: dict[bytes, _Prefixes] = {}
    wild: dict[bytes, _Prefixes] = {}
    for host, routes in table_hosts.items():
        ordered = tuple(sorted(routes.items(), key=lambda kv: len(kv[0]), reverse=True))
        if host.startswith(b"*."):
            wild[host[1:]] = ordered
        else:
            exact[host] = ordered
    state = {"clock": clock, "rng": rng, "metrics": metrics, "specs": specs, "shared": shared}
    return RouteTable(hosts=exact, wildcards=wild, vip_listeners=vips, clusters=clusters,
                      conflicts=tuple(conflicts), index=view.index, domain=domain_b, state=state)


def _endpoints(ready: list, port_name: str | None, sh: _Shared, now: float) -> tuple[Endpoint, ...]:
    out = []
    by_id: dict[str, Endpoint] = {}
    for inst in ready:
        port = inst.port_for(port_name)
        if not inst.address or not isinstance(port, int) or not 0 < port < 65536:
            continue
        ep_id = f"{inst.id}:{port}"
        if ep_id in by_id:
            continue
        weight = inst.weight if isinstance(inst.weight, int) and inst.weight > 0 else 0
        ep = sh.endpoints.get(ep_id)
        if ep is None or ep.address != inst.address:
            ep = Endpoint(ep_id, inst.address, port, weight, instance_id=inst.id, node=inst.node, now=now)
        else:
            ep.weight = weight  # canary weights change in place; the stats stay
        by_id[ep_id] = ep
        out.append(ep)
    sh.endpoints = by_id
    return tuple(out)
