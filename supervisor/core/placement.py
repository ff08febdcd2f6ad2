"""Placement: which node runs each new replica. Pure.

``place(requests, nodes, existing) -> Placement``: for every replica to place, the feasible
nodes are those that can run the service (an ``image`` needs a docker node, a ``command``
a process node), satisfy its ``placement.constraints`` and have room for its cpu/memory
(capacity minus what is already allocated; a node without a capacity bound has unlimited
room for that resource). Among those:

- spread (the default): fewest replicas of this service, then least allocated
  (Kubernetes LeastAllocated: mean free share of cpu and memory), then the name;
- ``placement.strategy: binpack``: bin packing, most allocated first (MostAllocated).

Each choice is added to the allocation before the next replica is placed, so two replicas
placed in one call spread too. When nothing fits, the replica is reported in ``failed``
with a reason naming what excluded each node.

``place_beside(request, beside, nodes, existing)``: a replica that replaces another in its
slot (a rollout's new revision) goes on the node its predecessor runs on when that node
can take it; otherwise it is placed as a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import config

__all__ = ["NodeInfo", "node_info", "Allocation", "Request", "Placement", "place", "place_beside",
           "matches_constraint", "can_run"]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    runtime: str                      # docker | process
    address: str = "127.0.0.1"
    cpu: float | None = None          # capacity; None: not bounded
    memory: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    reserved_cpu: float = 0.0         # kept for the host: never offered to replicas
    reserved_memory: int = 0

    @property
    def room_cpu(self) -> float | None:
        """What replicas may request in all: capacity minus the reserve (None: unbounded)."""
        return None if self.cpu is None else self.cpu - self.reserved_cpu

    @property
    def room_memory(self) -> int | None:
        return None if self.memory is None else self.memory - self.reserved_memory


def node_info(spec: config.NodeSpec) -> NodeInfo:
    """What placement knows of a configured node (its declared capacity and reserve)."""
    return NodeInfo(spec.name, spec.runtime or "process", spec.address, spec.capacity.cpu,
                    spec.capacity.memory, dict(spec.labels), spec.reserved.cpu or 0.0,
                    spec.reserved.memory or 0)


@dataclass(frozen=True, slots=True)
class Allocation:
    """What already runs on a node: replicas per service and the resources they reserve."""

    node: str
    service: str
    cpu: float = 0.0
    memory: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    """One replica to place: the service's spec and its slot."""

    spec: config.ServiceSpec
    slot: int


@dataclass(frozen=True, slots=True)
class Placement:
    placed: tuple[tuple[Request, str], ...] = ()     # (request, node name)
    failed: tuple[tuple[Request, str], ...] = ()     # (request, reason)


def can_run(spec: config.ServiceSpec, node: NodeInfo) -> str | None:
    """None if ``node``'s runtime can run ``spec``, else why not."""
    if node.runtime == "docker" and not spec.image:
        return "docker node, service has no image"
    if node.runtime == "process" and not spec.command:
        return "process node, service has no command"
    return None


def matches_constraint(node: NodeInfo, constraint: str) -> bool:
    """``node.name == a``, ``node.labels.disk != ssd`` ... (config validated the form)."""
    op = "==" if "==" in constraint else "!="
    left, _, right = constraint.partition(op)
    key, value = left.strip(), right.strip().strip("\"'")
    if key.startswith("node.labels."):
        actual = node.labels.get(key[len("node.labels."):])
    else:
        actual = {"node.name": node.name, "node.runtime": node.runtime,
                  "node.address": node.address}.get(key)
    return (actual == value) if op == "==" else (actual != value)


def _share(used: float, cap: float | None) -> float:
    return 0.0 if not cap else min(used / cap, 1.0)


def place(requests: Sequence[Request], nodes: Sequence[NodeInfo],
          existing: Iterable[Allocation]) -> Placement:
    used_cpu = {n.name: 0.0 for n in nodes}
    used_mem = {n.name: 0 for n in nodes}
    count: dict[tuple[str, str], int] = {}
    for a in existing:
        if a.node in used_cpu:
            used_cpu[a.node] += a.cpu
            used_mem[a.node] += a.memory
            count[(a.node, a.service)] = count.get((a.node, a.service), 0) + 1
    placed: list[tuple[Request, str]] = []
    failed: list[tuple[Request, str]] = []
    for req in requests:
        spec = req.spec
        cpu = spec.resources.requests.cpu or 0.0
        mem = spec.resources.requests.memory or 0
        why: list[str] = []
        feasible: list[NodeInfo] = []
        for node in nodes:
            reason = can_run(spec, node)
            if reason is None:
                bad = [c for c in spec.placement.constraints if not matches_constraint(node, c)]
                if bad:
                    reason = f"constraint {bad[0]!r}"
            room_cpu, room_mem = node.room_cpu, node.room_memory
            if reason is None and room_cpu is not None and used_cpu[node.name] + cpu > room_cpu + 1e-9:
                reason = (f"cpu: {room_cpu - used_cpu[node.name]:g} of {room_cpu:g} free, "
                          f"needs {cpu:g}")
            if reason is None and room_mem is not None and used_mem[node.name] + mem > room_mem:
                reason = (f"memory: {room_mem - used_mem[node.name]} of {room_mem} "
                          f"bytes free, needs {mem}")
            if reason is None:
                feasible.append(node)
            else:
                why.append(f"{node.name}: {reason}")
        if not feasible:
            failed.append((req, "no node fits" + (" (" + "; ".join(why) + ")" if why
                                                  else " (no nodes)")))
            continue

        def allocated(n: NodeInfo) -> float:
            return (_share(used_cpu[n.name] + cpu, n.room_cpu) + _share(used_mem[n.name] + mem, n.room_memory)) / 2

        if spec.placement.strategy == "spread":
            best = min(feasible, key=lambda n: (count.get((n.name, spec.name), 0), allocated(n), n.name))
        else:
            best = min(feasible, key=lambda n: (-allocated(n), n.name))
        used_cpu[best.name] += cpu
        used_mem[best.name] += mem
        count[(best.name, spec.name)] = count.get((best.name, spec.name), 0) + 1
        placed.append((req, best.name))
    return Placement(tuple(placed), tuple(failed))


def place_beside(request: Request, beside: Sequence[str], nodes: Sequence[NodeInfo],
                 existing: Iterable[Allocation]) -> Placement:
    """``request`` on the first node of ``beside`` that can take it (runtime, constraints,
    room: a surge replica needs room of its own beside its predecessor), else wherever
    ``place`` puts it."""
    existing = list(existing)
    by_name = {n.name: n for n in nodes}
    for name in beside:
        node = by_name.get(name)
        if node is not None:
            result = place([request], [node], existing)
            if result.placed:
                return result
    return place([request], nodes, existing)
