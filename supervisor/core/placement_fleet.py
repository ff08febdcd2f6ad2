"""The working state of one placement decision: what each node has left and holds. Pure;
used by ``placement.py`` (which defines NodeInfo, Allocation and the filters).

Nodes are indexed by position. ``add``/``remove`` keep per node the requests placed, the
replicas per service, and per (service, label) the replicas per label value (built on
first use, for ``spread_over``). ``key`` is the hot path: the rank of one node for one
replica as a plain tuple (``placement_score.rank_key``); ``score`` is the same as a
``Score`` for ``explain``.

Shapes: nodes with the same room, runtime and labels are interchangeable for packing
(their name too, when a constraint names nodes), so an empty node's worth is computed once
per shape and run of identical requests, and the packing search holds shapes back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import config

from .placement_score import (BINPACK, SPREAD, Score, binpack_fit, free_share, rank_key,
                              spread_fit)

__all__ = ["Fleet", "requests_of", "EPSILON"]

EPSILON = 1e-9   # cpu amounts are floats: 0.1 + 0.2 must fit in 0.3
# Worth looks ahead at this many pending runs (one service's replicas each), largest first:
# enough to fill a node with the replicas that come next, and a bound on the cost of one
# look (the 1,000-service bench would otherwise look at 1,000 runs per empty shape).
_LOOKAHEAD_RUNS = 64
_UNKNOWN_WORTH = float("inf")   # optimistic until computed: a lazy heap entry, never final


def requests_of(spec: config.ServiceSpec) -> tuple[float, int]:
    req = spec.resources.requests
    return req.cpu or 0.0, req.memory or 0


class Fleet:
    def __init__(self, nodes: Sequence[Any], existing: Iterable[Any],
                 static: Callable[[config.ServiceSpec, Any], str | None],
                 held: frozenset[tuple] = frozenset(), names_matter: bool = False,
                 labels_matter: bool = True) -> None:
        """``static(spec, node)``: why ``node`` can never run ``spec`` (runtime,
        constraints), or None. ``held``: shapes held back from opening. ``names_matter``:
        some constraint names a node (its name is then part of its shape).
        ``labels_matter``: some request has constraints (labels then tell what a node
        would hold, so its worth is per shape with labels, else per room and runtime)."""
        self.nodes = list(nodes)
        self.held = held
        self._why_static = static
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.room_cpu = [n.room_cpu for n in self.nodes]
        self.room_mem = [n.room_memory for n in self.nodes]
        self.used_cpu = [0.0] * len(self.nodes)
        self.used_mem = [0] * len(self.nodes)
        self.held_by = [0] * len(self.nodes)        # allocations on the node: in use when > 0
        self.count: dict[str, dict[int, int]] = {}                       # service -> node -> replicas
        self.groups: dict[tuple[str, str], dict[str | None, int]] = {}   # (service, label) -> value -> n
        self.shape = [(self.room_cpu[i], self.room_mem[i], n.runtime, tuple(sorted(n.labels.items())),
                       (n.name, n.address) if names_matter else None) for i, n in enumerate(self.nodes)]
        self.worth_shape = self.shape if labels_matter else [s[:3] for s in self.shape]
        self.total_cpu = sum(r for r in self.room_cpu if r is not None)
        self.total_mem = sum(r for r in self.room_mem if r is not None)
        self._static: dict[int, tuple[list[int], dict[int, str], frozenset[int]]] = {}
        self._static_by_kind: dict[tuple, tuple[list[int], dict[int, str], frozenset[int]]] = {}
        self.pending: list[list[Any]] = []   # [spec, count] still to place, in decision order
        self.run = 0                         # which run of requests is being placed
        self._worth: dict[tuple[int, tuple], float] = {}
        for a in existing:
            i = self.index.get(a.node)
            if i is not None:
                self.add(i, a.service, a.cpu, a.memory)

    # ------------------------------------------------------------------ state

    def add(self, i: int, service: str, cpu: float, mem: int) -> None:
        self.used_cpu[i] += cpu
        self.used_mem[i] += mem
        self.held_by[i] += 1
        per_node = self.count.setdefault(service, {})
        per_node[i] = per_node.get(i, 0) + 1
        for (svc, label), by_value in self.groups.items():
            if svc == service:
                value = self.nodes[i].labels.get(label)
                by_value[value] = by_value.get(value, 0) + 1

    def remove(self, i: int, service: str, cpu: float, mem: int) -> None:
        """Undo one ``add`` (label groups are kept too)."""
        self.used_cpu[i] -= cpu
        self.used_mem[i] -= mem
        self.held_by[i] -= 1
        per_node = self.count[service]
        per_node[i] -= 1
        if not per_node[i]:
            del per_node[i]
        for (svc, label), by_value in self.groups.items():
            if svc == service:
                by_value[self.nodes[i].labels.get(label)] -= 1

    def busy(self, i: int) -> bool:
        return self.held_by[i] > 0

    def group_counts(self, service: str, label: str) -> dict[str | None, int]:
        by_value = self.groups.get((service, label))
        if by_value is None:
            by_value = {}
            for i, n in self.count.get(service, {}).items():
                value = self.nodes[i].labels.get(label)
                by_value[value] = by_value.get(value, 0) + n
            self.groups[(service, label)] = by_value
        return by_value

    def cost(self) -> float:
        """The capacity of the nodes in use, cpu and memory each as a share of the fleet's."""
        return sum(self._size(i) for i in range(len(self.nodes)) if self.held_by[i] > 0)

    def _size(self, i: int) -> float:
        room_cpu, room_mem = self.room_cpu[i], self.room_mem[i]
        return ((room_cpu / self.total_cpu if room_cpu is not None and self.total_cpu else 0.0)
                + (room_mem / self.total_mem if room_mem is not None and self.total_mem else 0.0))

    # ------------------------------------------------------------------ filters

    def static(self, spec: config.ServiceSpec) -> tuple[list[int], dict[int, str], frozenset[int]]:
        """The nodes that suit ``spec`` whatever they hold, why each other one does not,
        and the first as a set (cached per spec object for the decision)."""
        got = self._static.get(id(spec))
        if got is None:
            # what the filters read: services alike in these are filtered alike
            kind = (bool(spec.image), bool(spec.command), spec.placement.constraints)
            got = self._static_by_kind.get(kind)
            if got is None:
                ok, no = [], {}
                for i, node in enumerate(self.nodes):
                    reason = self._why_static(spec, node)
                    if reason is None:
                        ok.append(i)
                    else:
                        no[i] = reason
                got = self._static_by_kind[kind] = (ok, no, frozenset(ok))
            self._static[id(spec)] = got
        return got

    def fits(self, i: int, cpu: float, mem: int) -> bool:
        room_cpu, room_mem = self.room_cpu[i], self.room_mem[i]
        return ((room_cpu is None or self.used_cpu[i] + cpu <= room_cpu + EPSILON)
                and (room_mem is None or self.used_mem[i] + mem <= room_mem))

    def lacks(self, i: int, cpu: float, mem: int) -> str | None:
        """Why the requests do not fit on node ``i`` now (None: they fit)."""
        room_cpu, room_mem = self.room_cpu[i], self.room_mem[i]
        if room_cpu is not None and self.used_cpu[i] + cpu > room_cpu + EPSILON:
            return f"cpu: {room_cpu - self.used_cpu[i]:g} of {room_cpu:g} free, needs {cpu:g}"
        if room_mem is not None and self.used_mem[i] + mem > room_mem:
            return f"memory: {room_mem - self.used_mem[i]} of {room_mem} bytes free, needs {mem}"
        return None

    # ------------------------------------------------------------------ rank

    def key(self, i: int, spec: config.ServiceSpec, cpu: float, mem: int, failed_on: int | None,
            lazy: bool = False) -> tuple:
        """Node ``i``'s rank for a replica of ``spec`` (lower is better). ``lazy``: an empty
        node's worth is left optimistic (a heap entry to be re-keyed when it comes up)."""
        return rank_key(*self._parts(i, spec, cpu, mem, failed_on, lazy))

    def score(self, i: int, spec: config.ServiceSpec, cpu: float, mem: int, failed_on: int | None) -> Score:
        return Score(*self._parts(i, spec, cpu, mem, failed_on, False))

    def _parts(self, i: int, spec: config.ServiceSpec, cpu: float, mem: int, failed_on: int | None,
               lazy: bool) -> tuple:
        """(strategy, spread_over, failed_here, replicas, opened, held, fit, worth, node)."""
        placement = spec.placement
        free_cpu = free_share(self.used_cpu[i], cpu, self.room_cpu[i])
        free_mem = free_share(self.used_mem[i], mem, self.room_mem[i])
        if placement.spread_over:
            labels = self.nodes[i].labels
            spread_over = tuple(self.group_counts(spec.name, label).get(labels.get(label), 0)
                                for label in placement.spread_over)
        else:
            spread_over = ()
        name = self.nodes[i].name
        if placement.strategy == SPREAD:
            replicas = self.count.get(spec.name, {}).get(i, 0)
            return (SPREAD, spread_over, i == failed_on, replicas, False, False,
                    spread_fit(free_cpu, free_mem), 0.0, name)
        opened = self.held_by[i] == 0
        worth = 0.0
        if opened:
            worth = _UNKNOWN_WORTH if lazy else self.worth(i)
        return (BINPACK, spread_over, i == failed_on, 0, opened, opened and self.shape[i] in self.held,
                binpack_fit(free_cpu, free_mem), worth, name)

    def worth(self, i: int) -> float:
        """What empty node ``i`` would hold of the replicas still to place (their runs
        largest first, each as many as fit, up to ``_LOOKAHEAD_RUNS`` runs), per unit of
        its capacity; both as shares of the fleet's cpu and memory. Choosing the empty
        node worth most is the bin-oriented greedy for bins of several sizes: a 16-core
        node that cpu-heavy replicas fill beats a 4-core node with 32 GiB that they fill
        on cpu and leave empty on memory. Cached per shape and run."""
        cache_key = (self.run, self.worth_shape[i])
        got = self._worth.get(cache_key)
        if got is not None:
            return got
        room_cpu, room_mem = self.room_cpu[i], self.room_mem[i]
        per_cpu = 1.0 / self.total_cpu if room_cpu is not None and self.total_cpu else 0.0
        per_mem = 1.0 / self.total_mem if room_mem is not None and self.total_mem else 0.0
        left_cpu, left_mem = room_cpu, room_mem    # None: unbounded
        value = 0.0
        for spec, count in self.pending[:_LOOKAHEAD_RUNS]:
            if count <= 0 or i not in self.static(spec)[2]:
                continue
            cpu, mem = requests_of(spec)
            n = count
            if cpu > 0 and left_cpu is not None:
                n = min(n, int((left_cpu + EPSILON) / cpu))
            if mem > 0 and left_mem is not None:
                n = min(n, left_mem // mem)
            if n > 0:
                if left_cpu is not None:
                    left_cpu -= n * cpu
                if left_mem is not None:
                    left_mem -= n * mem
                value += n * (cpu * per_cpu + mem * per_mem)
        size = self._size(i)
        got = value / size if size > 0 else float("inf")
        self._worth[cache_key] = got
        return got
