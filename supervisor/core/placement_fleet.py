"""The working state of one placement decision: what each node has left and holds. Pure;
used by ``placement.py`` (which defines NodeInfo, Allocation and the filters).

Nodes are indexed by position. ``add``/``remove`` keep per node the requests placed, the
replicas per service, and per (service, label) the replicas per label value (built on
first use, for ``spread_over``); the nodes in use (``in_use``), and, when some request
spreads, the nodes in use per room sorted by free share (``by_free_share``). Empty nodes
per filter kind and shape are sorted by name once (``first_empty``). ``key`` is the hot
path: the rank of one node for one replica as a plain tuple (``placement_score.rank_key``);
``score`` is the same as a ``Score`` for ``explain``. ``plan`` records the runs still to
place, with what ``worth`` needs of them precomputed.

Shapes: nodes with the same room, runtime and labels are interchangeable for packing
(their name too, when a constraint names nodes), so an empty node's worth is computed once
per shape and run of identical requests, and the packing search holds shapes back.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import config

from .placement_score import (BINPACK, SPREAD, Score, binpack_fit, free_share, rank_key,
                              spread_fit)

__all__ = ["Fleet", "requests_of", "EPSILON", "UNKNOWN_WORTH"]

EPSILON = 1e-9   # cpu amounts are floats: 0.1 + 0.2 must fit in 0.3
# Worth looks ahead at this many pending runs (one service's replicas each), largest first:
# enough to fill a node with the replicas that come next, and a bound on the cost of one
# look (the 1,000-service bench would otherwise look at 1,000 runs per empty shape).
_LOOKAHEAD_RUNS = 64
UNKNOWN_WORTH = float("inf")   # optimistic until computed: a lazy heap entry, never final


def requests_of(spec: config.ServiceSpec) -> tuple[float, int]:
    req = spec.resources.requests
    return req.cpu or 0.0, req.memory or 0


class Fleet:
    def __init__(self, nodes: Sequence[Any], existing: Iterable[Any],
                 static: Callable[[config.ServiceSpec, Any], str | None],
                 held: frozenset[tuple] = frozenset(), names_matter: bool = False,
                 labels_matter: bool = True, by_free: bool = False) -> None:
        """``static(spec, node)``: why ``node`` can never run ``spec`` (runtime,
        constraints), or None. ``held``: shapes held back from opening. ``names_matter``:
        some constraint names a node (its name is then part of its shape).
        ``labels_matter``: some request has constraints (labels then tell what a node
        would hold, so its worth is per shape with labels, else per room and runtime).
        ``by_free``: keep the nodes in use sorted by free share (``by_free_share``; some
        request spreads)."""
        self.nodes = list(nodes)
        self.held = held
        self._why_static = static
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.room_cpu = [n.room_cpu for n in self.nodes]
        self.room_mem = [n.room_memory for n in self.nodes]
        self.used_cpu = [0.0] * len(self.nodes)
        self.used_mem = [0] * len(self.nodes)
        self.held_by = [0] * len(self.nodes)        # allocations on the node: in use when > 0
        self.in_use: dict[int, None] = {}           # the nodes with held_by > 0 (an ordered set)
        self.count: dict[str, dict[int, int]] = {}                       # service -> node -> replicas
        self.groups: dict[str, dict[str, dict[str | None, int]]] = {}    # service -> label -> value -> n
        self.shape = [(self.room_cpu[i], self.room_mem[i], n.runtime, tuple(sorted(n.labels.items())),
                       (n.name, n.address) if names_matter else None) for i, n in enumerate(self.nodes)]
        self.worth_shape = self.shape if labels_matter else [s[:3] for s in self.shape]
        self.total_cpu = sum(r for r in self.room_cpu if r is not None)
        self.total_mem = sum(r for r in self.room_mem if r is not None)
        self._static: dict[int, tuple[list[int], dict[int, str], frozenset[int]]] = {}
        self._static_by_kind: dict[tuple, tuple[list[int], dict[int, str], frozenset[int]]] = {}
        self._empty_by_kind: dict[tuple, dict[tuple, list[int]]] = {}
        # The runs of requests, in decision order: (spec, cpu, mem, nodes that suit it), how
        # many of each are still to place, and the smallest cpu and memory from each on.
        self.runs: list[tuple[config.ServiceSpec, float, int, frozenset[int]]] = []
        self.left: list[int] = []
        self._min_from: list[tuple[float, int]] = []
        self.run = 0                         # which run of requests is being placed
        self._worth: dict[tuple[int, tuple], float] = {}
        # by_free: per room (cpu, memory), the nodes in use by state (cpu and memory used),
        # each state's nodes as (name, index) ascending, and the states as (-free share,
        # cpu used, memory used) ascending: most free first (``by_free_share``)
        self._by_free: dict[tuple, list[tuple[float, float, int]]] | None = {} if by_free else None
        self._alike: dict[tuple, dict[tuple[float, int], list[tuple[str, int]]]] = {}
        self._state_of: list[tuple[float, int] | None] = [None] * len(self.nodes)
        # nodes in use that may still take a replica of the runs left (``roomy``)
        self._roomy: dict[int, None] = {}
        for a in existing:
            i = self.index.get(a.node)
            if i is not None:
                self.add(i, a.service, a.cpu, a.memory)

    # ------------------------------------------------------------------ state

    def add(self, i: int, service: str, cpu: float, mem: int) -> None:
        self.used_cpu[i] += cpu
        self.used_mem[i] += mem
        self.held_by[i] += 1
        if self.held_by[i] == 1:
            self.in_use[i] = None
            self._roomy[i] = None
        per_node = self.count.setdefault(service, {})
        per_node[i] = per_node.get(i, 0) + 1
        for label, by_value in self.groups.get(service, {}).items():
            value = self.nodes[i].labels.get(label)
            by_value[value] = by_value.get(value, 0) + 1
        if self._by_free is not None:
            self._refile(i)

    def remove(self, i: int, service: str, cpu: float, mem: int) -> None:
        """Undo one ``add`` (label groups are kept too)."""
        self.used_cpu[i] -= cpu
        self.used_mem[i] -= mem
        self.held_by[i] -= 1
        if self.held_by[i] == 0:
            del self.in_use[i]
            self._roomy.pop(i, None)
            self._empty_by_kind.clear()   # a node is empty again: the lists of empty nodes are stale
        else:
            self._roomy[i] = None         # it has room again
        per_node = self.count[service]
        per_node[i] -= 1
        if not per_node[i]:
            del per_node[i]
        for label, by_value in self.groups.get(service, {}).items():
            by_value[self.nodes[i].labels.get(label)] -= 1
        if self._by_free is not None:
            self._refile(i)

    def _refile(self, i: int) -> None:
        """Node ``i``'s entry in ``_by_free`` after its use changed (none while empty)."""
        assert self._by_free is not None
        room = self.shape[i][:2]
        states = self._by_free.setdefault(room, [])
        alike = self._alike.setdefault(room, {})
        entry = (self.nodes[i].name, i)
        old = self._state_of[i]
        if old is not None:
            line = alike[old]
            del line[bisect_left(line, entry)]
            if not line:
                del alike[old]
                del states[bisect_left(states, (self._neg_free(i, *old), *old))]
        new = None
        if self.held_by[i] > 0:
            new = (self.used_cpu[i], self.used_mem[i])
            line = alike.get(new)
            if line is None:
                line = alike[new] = []
                insort(states, (self._neg_free(i, *new), *new))
            insort(line, entry)
        self._state_of[i] = new

    def _neg_free(self, i: int, used_cpu: float, used_mem: int) -> float:
        return -(free_share(used_cpu, 0.0, self.room_cpu[i]) + free_share(used_mem, 0, self.room_mem[i]))

    def roomy(self, cpu: float, mem: int) -> list[int]:
        """The nodes in use, but those that cannot take ``cpu`` and ``mem`` (the least any
        run left asks: they can take no replica of this decision any more, and are let
        go until ``remove`` makes room on them)."""
        full = [i for i in self._roomy if not self.fits(i, cpu, mem)]
        for i in full:
            del self._roomy[i]
        return list(self._roomy)

    def busy(self, i: int) -> bool:
        return self.held_by[i] > 0

    def group_counts(self, service: str, label: str) -> dict[str | None, int]:
        by_label = self.groups.setdefault(service, {})
        by_value = by_label.get(label)
        if by_value is None:
            by_value = {}
            for i, n in self.count.get(service, {}).items():
                value = self.nodes[i].labels.get(label)
                by_value[value] = by_value.get(value, 0) + n
            by_label[label] = by_value
        return by_value

    def least_left(self) -> tuple[float, int]:
        """The least cpu and the least memory a run from the current one on asks."""
        return self._min_from[self.run] if self._min_from else (0.0, 0)

    def plan(self, runs: Sequence[tuple[config.ServiceSpec, int]]) -> None:
        """The runs still to place (spec, how many), in decision order, for ``worth``."""
        self.runs = []
        for spec, _ in runs:
            cpu, mem = requests_of(spec)
            self.runs.append((spec, cpu, mem, self.static(spec)[2]))
        self.left = [n for _, n in runs]
        self._min_from = [(float("inf"), 1 << 62)] * (len(runs) + 1)
        for r in range(len(runs) - 1, -1, -1):
            low_cpu, low_mem = self._min_from[r + 1]
            self._min_from[r] = (min(low_cpu, self.runs[r][1]), min(low_mem, self.runs[r][2]))
        self.run = 0

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

    def first_empty(self, spec: config.ServiceSpec, shape: tuple, skip: int | None) -> int | None:
        """The empty node of ``shape`` that suits ``spec`` first by name, but ``skip``."""
        kind = (bool(spec.image), bool(spec.command), spec.placement.constraints)
        by_shape = self._empty_by_kind.get(kind)
        if by_shape is None:
            by_shape = self._empty_by_kind[kind] = {}
            for i in self.static(spec)[0]:
                if not self.held_by[i]:
                    by_shape.setdefault(self.shape[i], []).append(i)
            for group in by_shape.values():
                group.sort(key=lambda i: self.nodes[i].name, reverse=True)
        group = by_shape.get(shape)
        if not group:
            return None
        held_by = self.held_by
        while group and held_by[group[-1]]:   # taken since: nodes are emptied only by remove()
            group.pop()
        for k in range(len(group) - 1, -1, -1):
            i = group[k]
            if i != skip and not held_by[i]:
                return i
        return None

    def empty_shapes(self, spec: config.ServiceSpec) -> list[tuple]:
        """The shapes with an empty node that suits ``spec``."""
        kind = (bool(spec.image), bool(spec.command), spec.placement.constraints)
        if kind not in self._empty_by_kind:
            self.first_empty(spec, (), None)
        return [shape for shape, group in self._empty_by_kind[kind].items() if group]

    def by_free_share(self, suits: frozenset[int], cpu: float, mem: int, k: int,
                      skip: Callable[[int], bool], labels: tuple[str, ...] = ()) -> list[list[int]]:
        """The nodes in use that suit and fit a run of ``k`` spread requests and could be
        chosen for one, in lists of nodes alike (same room, use and ``labels`` values:
        they rank alike but for their names), each by name: per room and value of the
        ``labels`` (spread_over), the ``k`` most free (cpu share + memory share free) but
        ``skip``, and the next as long as they are as free within rounding.

        Why that is enough: in one room, spread's fit is the free share less the same
        amount for every node, so a node whose free share is lower by more than rounding
        has the lower fit, whatever the request. Only a chosen node's key changes in a run
        (and its label group's, the same for all its peers), so a node behind ``k`` better
        peers of its room and labels (or ``k`` alike, named before it) is never chosen in
        ``k`` picks."""
        assert self._by_free is not None
        out: dict[tuple, list[int]] = {}
        nodes = self.nodes
        for (rc, rm), states in self._by_free.items():
            # rounding of the shares (~1e-15) and a cpu share clipped at 0 within EPSILON
            tolerance = 1e-9 + (2 * EPSILON / rc if rc is not None and rc > 0 else 0.0)
            alike = self._alike[(rc, rm)]
            taken: dict[tuple, int] = {}
            bound: dict[tuple, float] = {}
            for neg_free, used_cpu, used_mem in states:
                if not labels and () in bound and neg_free > bound[()]:
                    break
                if (rc is not None and used_cpu + cpu > rc + EPSILON) or (rm is not None and used_mem + mem > rm):
                    continue   # the state does not fit
                for _, i in alike[(used_cpu, used_mem)]:
                    value = tuple(nodes[i].labels.get(label) for label in labels) if labels else ()
                    limit = bound.get(value)
                    if limit is not None and neg_free > limit:
                        continue
                    if i not in suits or skip(i):
                        continue
                    line = out.setdefault((rc, rm, used_cpu, used_mem, value), [])
                    if len(line) == k:
                        if not labels:
                            break   # the rest of the state: behind k alike
                        continue
                    line.append(i)
                    n = taken[value] = taken.get(value, 0) + 1
                    if n == k:
                        bound[value] = neg_free + tolerance
        return list(out.values())

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
            lazy: bool = False, spread_over: bool = True) -> tuple:
        """Node ``i``'s rank for a replica of ``spec`` (lower is better). ``lazy``: an empty
        node's worth is left optimistic (a heap entry to be re-keyed when it comes up).
        ``spread_over``: False leaves the spread_over part out (``()``): the caller ranks
        the label groups itself."""
        return rank_key(*self._parts(i, spec, cpu, mem, failed_on, lazy, spread_over))

    def score(self, i: int, spec: config.ServiceSpec, cpu: float, mem: int, failed_on: int | None) -> Score:
        return Score(*self._parts(i, spec, cpu, mem, failed_on, False))

    def _parts(self, i: int, spec: config.ServiceSpec, cpu: float, mem: int, failed_on: int | None,
               lazy: bool, with_spread_over: bool = True) -> tuple:
        """(strategy, spread_over, failed_here, replicas, opened, held, fit, worth, node)."""
        placement = spec.placement
        free_cpu = free_share(self.used_cpu[i], cpu, self.room_cpu[i])
        free_mem = free_share(self.used_mem[i], mem, self.room_mem[i])
        if placement.spread_over and with_spread_over:
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
            worth = UNKNOWN_WORTH if lazy else self.worth(i)
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
        runs, left, min_from = self.runs, self.left, self._min_from
        for r in range(self.run, min(self.run + _LOOKAHEAD_RUNS, len(runs))):
            count = left[r]
            _, cpu, mem, suits = runs[r]
            if count <= 0 or i not in suits:
                continue
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
                # full for every run after this one: nothing more to add
                low_cpu, low_mem = min_from[r + 1]
                if ((left_cpu is not None and low_cpu > 0 and (left_cpu + EPSILON) / low_cpu < 1.0)
                        or (left_mem is not None and left_mem < low_mem)):
                    break
        size = self._size(i)
        got = value / size if size > 0 else float("inf")
        self._worth[cache_key] = got
        return got
