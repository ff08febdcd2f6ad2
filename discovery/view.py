"""The catalog as the data plane sees it: plain, immutable snapshots.

Vocabulary
----------
Instance
    One catalog service instance (one running replica): Consul's ``Service`` entry of
    ``/v1/health/service/<name>`` plus the aggregated status of its checks.
ServiceView
    Everything the data plane knows of one service: the spec last applied with
    ``meshlet apply`` (from KV ``meshlet/services/<name>``, a typed ``config.ServiceSpec``;
    absent for services registered by other tools), its virtual IP, and its instances.
View
    The whole catalog at one moment: services by name and nodes by name. A new View is
    built for every change and swapped in whole; nobody mutates a published View.

Flow::

    catalog --blocking queries--> discovery.consul.Mirror --View--> DNS zone / proxy route table

Only this module and ``discovery.consul`` define these shapes; DNS, proxy and supervisor
import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import config

__all__ = ["Instance", "Node", "ServiceView", "View", "PASSING", "WARNING", "CRITICAL", "worst_status"]

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2}

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    # One shared read-only empty mapping: dataclasses refuse an unhashable default.
    return _EMPTY


def worst_status(statuses: list[str] | tuple[str, ...]) -> str:
    """Aggregate check statuses as Consul does: the worst one wins; no checks is passing."""
    worst = PASSING
    for s in statuses:
        if _RANK.get(s, 2) > _RANK[worst]:
            worst = s if s in _RANK else CRITICAL
    return worst


@dataclass(frozen=True, slots=True)
class Instance:
    """One catalog instance of a service.

    ``address`` is the service address, or the node's address when the service has none
    (Consul's rule). ``ports`` maps port names to ports: meshlet registers ``Meta`` keys
    ``port_<name>`` for every named port of a service; ``port`` is Consul's single ``Port``.
    ``weight`` comes from ``Meta["weight"]`` (default 1; 0 means "receives no new traffic").
    ``status`` is the worst status of all the instance's checks (service and node checks).
    """

    id: str
    service: str
    node: str
    address: str
    port: int
    status: str = PASSING
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=_empty)
    weight: int = 1
    ports: Mapping[str, int] = field(default_factory=_empty)

    @property
    def is_passing(self) -> bool:
        return self.status == PASSING

    def port_for(self, name: str | None) -> int:
        """The port serving the named service port; Consul's ``Port`` when unnamed or unknown."""
        if name is None:
            return self.port
        return self.ports.get(name, self.port)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    address: str
    meta: Mapping[str, str] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """One service: its applied spec (the KV service document, see config/README.md,
    parsed and validated once by the Mirror), its VIP, and its instances in catalog order.
    ``spec`` is None for a service registered by another tool (no document)."""

    name: str
    instances: tuple[Instance, ...] = ()
    spec: config.ServiceSpec | None = None
    vip: str | None = None
    revision: str | None = None

    def ready(self, include_warning: bool = False) -> tuple[Instance, ...]:
        """Instances that may receive traffic: passing (and warning if asked)."""
        if include_warning:
            return tuple(i for i in self.instances if i.status != CRITICAL)
        return tuple(i for i in self.instances if i.status == PASSING)


@dataclass(frozen=True, slots=True)
class View:
    """The whole catalog at one index. ``index`` grows with every change seen."""

    services: Mapping[str, ServiceView] = field(default_factory=_empty)
    nodes: Mapping[str, Node] = field(default_factory=_empty)
    index: int = 0
