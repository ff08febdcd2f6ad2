"""Placement: which node runs each new replica. Pure.

``place(requests, nodes, existing) -> Placement``

Filter, then rank. A node can hold a replica when its runtime can run the service (an
``image`` needs a docker node, a ``command`` a process node), it satisfies every
``placement.constraints`` entry, and the replica's *requests* fit in its room: capacity
minus the node's ``reserved`` share minus the requests already placed there (a resource
without a declared capacity is unbounded). Limits never enter placement; the runtime
enforces them. Among the nodes that can hold it the lowest ``placement_score`` key wins:
spread_over groups, then not the node where the slot's replica just failed
(``Request.failed_on``), then the strategy (spread: fewest replicas of the service, then
Kubernetes LeastAllocated; binpack: a node in use before an empty one, then Nomad's
BestFit, and among empty nodes the one worth most, ``Fleet.worth``), then the name.
``placement_score`` says why those formulas.

Several requests at once (a scale-up, a whole config in ``meshlet plan``):

1. Largest first (first-fit-decreasing; a request's size is its cpu and memory as shares
   of the mean node room, summed); ties keep the given order, so one service's replicas
   go in slot order. Each choice counts for the next. ``placed`` is in this order.
2. binpack only, when every request was placed: the nodes the pass opened are emptied,
   least used first, when all their replicas fit in the room of other nodes in use
   (``_evacuate``; with a request pending, emptying a node would make room it was refused).
3. binpack only, the packing search: the pass is run again with one more node *shape*
   (room, runtime, labels) held back, i.e. opened only after every other empty node, and
   kept when it fails no more requests and uses less capacity; until no shape helps or
   ``_PASS_WORK // len(requests)`` passes (at most ``_MAX_PASSES``) were run. Greedy
   choices fall into traps a second look avoids: a small node the first replica fills
   exactly, whose siblings then strand memory on nodes shaped for cpu.
   On 100 random clusters this lands within 2.4% of OR-tools CP-SAT's optimum on average
   (bench/placement/run.py; bench/RESULTS.md).

A request nothing can hold goes to ``failed`` with the reason for every node (grouped by
reason on a large fleet). Deterministic: no randomness, ties broken by node name.

Speed: a run of identical requests (one service's replicas) is placed as ranking every
node for each replica would, without doing so. Placing a replica changes only the chosen
node's key and makes other nodes' keys no better (their spread_over group fills; an empty
node's worth is fixed for the run), so:

- The candidates are gathered once per run from what the fleet keeps up to date, not by
  looking at every node: the nodes in use that can still take the least any run left
  asks (``Fleet.roomy``; a full node is let go for the rest of the pass) and the first
  empty node by name of each line of empty nodes alike in what their key reads (worth
  shape, held back or not, spread_over group; ``Fleet.first_empty`` per shape); the
  next comes in when it is taken. For spread only the nodes in use that can be chosen in
  ``k`` picks are looked at: per room, by state (cpu and memory used) most free first, the ``k`` most free and
  those as free within rounding, nodes in one state waiting in line like empty nodes
  (``Fleet.by_free_share`` says why that is exact).
- Two heaps with lazy re-keying: per spread_over group (nodes alike in the spread_over
  labels) a heap of its nodes keyed without the spread_over part, and a heap of the
  groups keyed by (spread_over part, best node's key). A group at the top whose part is
  still current shows its best node; a node entry whose key is still current is the
  best, a stale one goes back with its new key. A replica placed in a zone makes one
  group entry stale, not every node of the zone (100 x 100 spread replicas in 10 zones:
  ~975,000 node keys computed with one heap of every node, ~32,000 now).
- Only an entry with an optimistic worth can be stale at the node level: a node's key
  (but its spread_over part) changes only when it is chosen, and its entry is then
  replaced. Other entries at the top are taken as they are.
- An empty node enters the heap with an optimistic worth; its shape's worth is computed
  when it first comes up in the run, with what is still to place then (mostly: once the
  nodes in use can take no more), and kept for the run. Without spread_over that is the
  moment a single heap of every node would compute it. With spread_over, only a group
  whose part is current is looked into, so a stale entry of another zone no longer
  fixes a worth early; binpack with spread_over may place differently from before (6 of
  3,000 random small fleets, all with the same capacity used; 10,000 replicas in 10
  zones: 651 nodes used instead of 662).

10,000 replicas on 1,000 nodes: bench/RESULTS.md.

``explain(request, nodes, existing)``: for one replica placed alone, every node with why
it was filtered out or its score, best first: what ``place`` would decide, shown.

``place_beside(request, beside, nodes, existing)``: a replica that replaces another in its
slot (a rollout's new revision) goes on the node its predecessor runs on when that node
can take it; otherwise it is placed as a new one.

Pinned requests (``Request.pinned_to``: the node its volumes live on, ``core.volumes``)
go on that node or nowhere: every other node is filtered out with ``pinned_by`` as the
reason, and a pinned node that is gone leaves the replica pending (never started elsewhere
on an empty volume). A node whose runtime cannot mount the service's volumes (a process
node and a volume driver) is filtered like a runtime mismatch (``can_run``).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import config

from .placement_fleet import EPSILON, UNKNOWN_WORTH, Fleet, requests_of
from .placement_score import BINPACK, Score, binpack_fit, free_share
from .volumes import runtime_reason

__all__ = ["NodeInfo", "node_info", "Allocation", "Request", "Placement", "NodeVerdict", "Explanation",
           "place", "place_beside", "explain", "matches_constraint", "can_run"]

# A failure reason lists every node up to this many; past it, nodes are counted per reason
# (Kubernetes' "0/1000 nodes are available: 600 Insufficient cpu, ...").
_LIST_NODES_UP_TO = 10
# The packing search runs at most this many greedy passes, and fewer for large calls:
# _PASS_WORK // len(requests) (a call of 50 replicas gets all 64; one of 10,000 gets one).
_MAX_PASSES = 64
_PASS_WORK = 20_000
# Emptying nodes after a pass looks at most this many (node, replica) pairs.
_EVACUATE_WORK = 2_000_000
_NO_WORTH = -UNKNOWN_WORTH   # as an empty node's optimistic worth stands in a key


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
    # why the node takes no new replica now ("cordoned", "draining", "unreachable since
    # 12:00:01"); None: it does. Its replicas are not touched for it (see ``lost``).
    unavailable: str | None = None
    lost: bool = False                # unreachable past the grace period: its replicas are gone
    draining: bool = False            # its replicas move elsewhere, one surge at a time

    @property
    def room_cpu(self) -> float | None:
        """What replicas may request in all: capacity minus the reserve (None: unbounded)."""
        return None if self.cpu is None else self.cpu - self.reserved_cpu

    @property
    def room_memory(self) -> int | None:
        return None if self.memory is None else self.memory - self.reserved_memory


def node_info(spec: config.NodeSpec, *, cpu: float | None = None, memory: int | None = None,
              unavailable: str | None = None, lost: bool = False, draining: bool = False) -> NodeInfo:
    """What placement knows of a configured node: its declared capacity, else ``cpu`` and
    ``memory`` as its engine reports them (None: unbounded), its reserve, and its state."""
    return NodeInfo(spec.name, spec.runtime or "process", spec.address,
                    spec.capacity.cpu if spec.capacity.cpu is not None else cpu,
                    spec.capacity.memory if spec.capacity.memory is not None else memory,
                    dict(spec.labels), spec.reserved.cpu or 0.0, spec.reserved.memory or 0,
                    unavailable, lost, draining)


@dataclass(frozen=True, slots=True)
class Allocation:
    """What already runs on a node: one replica of ``service`` and the requests it holds."""

    node: str
    service: str
    cpu: float = 0.0
    memory: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    """One replica to place: the service's spec, its slot, and the node where the slot's
    replica just failed (ranked below every equally good node), if any."""

    spec: config.ServiceSpec
    slot: int
    failed_on: str | None = None
    pinned_to: str | None = None      # the only node it may go on ("": none can hold it)
    pinned_by: str = ""               # why (its volume lives there)


@dataclass(frozen=True, slots=True)
class Placement:
    placed: tuple[tuple[Request, str], ...] = ()     # (request, node name), in decision order
    failed: tuple[tuple[Request, str], ...] = ()     # (request, reason)


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """One node for one replica: why it cannot hold it, or its score."""

    node: str
    reason: str | None = None
    score: Score | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    """``verdicts``: the nodes that can hold the replica, best first, then the others in
    the fleet's order. ``chosen``: where ``place`` puts it (None: pending)."""

    request: Request
    verdicts: tuple[NodeVerdict, ...]

    @property
    def chosen(self) -> str | None:
        first = self.verdicts[0] if self.verdicts else None
        return first.node if first is not None and first.score is not None else None

    def lines(self) -> list[str]:
        """Readable: one line per node."""
        out = []
        for v in self.verdicts:
            mark = "*" if v.node == self.chosen else " "
            out.append(f"{mark} {v.node}: " + (v.score.describe() if v.score is not None
                                                else f"filtered out: {v.reason}"))
        return out


def can_run(spec: config.ServiceSpec, node: NodeInfo) -> str | None:
    """None if ``node``'s runtime can run ``spec``, else why not."""
    if node.runtime == "docker" and not spec.image:
        return "docker node, service has no image"
    if node.runtime == "process" and not spec.command:
        return "process node, service has no command"
    return runtime_reason(spec, node.runtime)


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


def _why_static(spec: config.ServiceSpec, node: NodeInfo) -> str | None:
    """Why ``node`` can never run ``spec``, whatever it holds: it takes no new replica
    (cordoned, draining, down), its runtime, a constraint."""
    if node.unavailable is not None:
        return node.unavailable
    reason = can_run(spec, node)
    if reason is None:
        bad = next((c for c in spec.placement.constraints if not matches_constraint(node, c)), None)
        if bad is not None:
            reason = f"constraint {bad!r}"
    return reason


def _fleet(nodes: Sequence[NodeInfo], existing: Iterable[Allocation], requests: Sequence[Request],
           held: frozenset[tuple] = frozenset()) -> Fleet:
    specs = {id(r.spec): r.spec for r in requests}.values()
    names_matter = any(c.startswith(("node.name", "node.address"))
                       for spec in specs for c in spec.placement.constraints)
    labels_matter = any(spec.placement.constraints for spec in specs)
    by_free = any(spec.placement.strategy != BINPACK for spec in specs)
    return Fleet(nodes, existing, _why_static, held, names_matter, labels_matter, by_free)


def _verdicts(fleet: Fleet, spec: config.ServiceSpec, failed_on: int | None) -> list[NodeVerdict]:
    """Every node for one replica of ``spec``: the ones that can hold it best first, then
    the others in fleet order with their reasons."""
    cpu, mem = requests_of(spec)
    no = fleet.static(spec)[1]
    scored, rejected = [], []
    for i, node in enumerate(fleet.nodes):
        reason = no.get(i) or fleet.lacks(i, cpu, mem)
        if reason is None:
            scored.append(NodeVerdict(node.name, score=fleet.score(i, spec, cpu, mem, failed_on)))
        else:
            rejected.append(NodeVerdict(node.name, reason=reason))
    scored.sort(key=lambda v: v.score.key)   # type: ignore[union-attr]
    return scored + rejected


def _why_none(fleet: Fleet, spec: config.ServiceSpec) -> str:
    """The reason nothing can hold a replica of ``spec`` now."""
    if not fleet.nodes:
        return "no node fits (no nodes)"
    rejected = [v for v in _verdicts(fleet, spec, None) if v.reason is not None]
    if len(rejected) <= _LIST_NODES_UP_TO:
        return "no node fits (" + "; ".join(f"{v.node}: {v.reason}" for v in rejected) + ")"
    kinds: dict[str, int] = {}
    for v in rejected:
        reason = v.reason or ""
        kind = reason.split(":")[0] if reason.startswith(("cpu:", "memory:")) else reason
        kinds[kind] = kinds.get(kind, 0) + 1
    counted = ", ".join(f"{n} lack {k}" if k in ("cpu", "memory") else f"{n}: {k}"
                        for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"no node fits (0 of {len(fleet.nodes)} nodes: {counted})"


def _largest_first(requests: Sequence[Request], fleet: Fleet) -> list[int]:
    """Indices of ``requests``, largest requests first; equal sizes keep their order. A
    request's size: its cpu and memory as shares of the mean room of the bounded nodes."""
    cpus = [r for r in fleet.room_cpu if r is not None and r > 0]
    mems = [r for r in fleet.room_mem if r is not None and r > 0]
    mean_cpu = sum(cpus) / len(cpus) if cpus else None
    mean_mem = sum(mems) / len(mems) if mems else None

    def size(k: int) -> float:
        cpu, mem = requests_of(requests[k].spec)
        return (cpu / mean_cpu if mean_cpu else 0.0) + (mem / mean_mem if mean_mem else 0.0)

    return sorted(range(len(requests)), key=lambda k: -size(k))


def _place_run(fleet: Fleet, run: Sequence[Request], placed: list[tuple[Request, str]],
               failed: list[tuple[Request, str]]) -> None:
    """Place ``run``, requests of one spec in a row, one after another, as ranking every
    node each time would (see the module docstring: the candidates, then two heaps with
    lazy re-keying). Empty nodes of one shape rank alike but for their names, so only the
    first of each shape waits in the heap; the next comes in when it is taken."""
    spec = run[0].spec
    cpu, mem = requests_of(spec)
    failed_on = fleet.index.get(run[0].failed_on) if run[0].failed_on is not None else None
    suits = fleet.static(spec)[2]
    labels_over = spec.placement.spread_over
    holders = fleet.count.get(spec.name, {})
    # the candidates: nodes in use (for spread only those that could be chosen, see
    # Fleet.by_free_share), and the first empty node of each shape. Nodes alike but for
    # their names wait in line (``after``): the next comes in when the one before is taken.
    after: dict[int, int] = {}
    if spec.placement.strategy == BINPACK:
        busy = [i for i in fleet.roomy(*fleet.least_left()) if i in suits and fleet.fits(i, cpu, mem)]
    else:
        busy = [i for i in holders if i in suits and fleet.fits(i, cpu, mem)]
        if (failed_on is not None and failed_on not in holders and fleet.busy(failed_on)
                and failed_on in suits and fleet.fits(failed_on, cpu, mem)):
            busy.append(failed_on)
        for line in fleet.by_free_share(suits, cpu, mem, len(run), lambda i: i in holders or i == failed_on,
                                        labels_over):
            busy.append(line[0])
            after.update(zip(line, line[1:]))
    empty = []
    if failed_on is not None and not fleet.busy(failed_on) and failed_on in suits and fleet.fits(failed_on, cpu, mem):
        empty.append(failed_on)
    # Empty nodes rank alike but for their names when alike in what their key reads: the
    # shape their worth is computed for, whether their shape is held back, and their
    # spread_over group (shapes differ in labels too: 5 rooms in 10 zones are 50 shapes,
    # 5 lines). Per line, the first node of each shape by name, the first of them in the heap.
    lines: dict[tuple, list[tuple[str, int]]] = {}
    for shape in fleet.empty_shapes(spec):
        i = fleet.first_empty(spec, shape, failed_on)
        if i is not None and fleet.fits(i, cpu, mem):
            lines.setdefault(_line_of(fleet, i, labels_over), []).append((fleet.nodes[i].name, i))
    for line in lines.values():
        heapq.heapify(line)
        empty.append(line[0][1])
    # one heap of nodes per spread_over group (nodes alike in the spread_over labels), keyed
    # without the spread_over part; one heap of groups keyed (spread_over part, best node)
    group_of: dict[tuple, int] = {}
    values: list[tuple] = []
    heaps: list[list[tuple[tuple, int]]] = []
    node_group: dict[int, int] = {}
    for i in busy + empty:
        labels = fleet.nodes[i].labels
        value = tuple(labels.get(label) for label in labels_over)
        g = group_of.get(value)
        if g is None:
            g = group_of[value] = len(values)
            values.append(value)
            heaps.append([])
        node_group[i] = g
        heaps[g].append((fleet.key(i, spec, cpu, mem, failed_on, lazy=True, spread_over=False), i))

    def over(g: int) -> tuple:
        if not labels_over:
            return ()
        return tuple(fleet.group_counts(spec.name, label).get(value, 0)
                     for label, value in zip(labels_over, values[g]))

    groups: list[tuple[tuple, tuple, int]] = []   # (spread_over part, heaps[g][0][0], g)
    for g, heap in enumerate(heaps):
        heapq.heapify(heap)
        groups.append((over(g), heap[0][0], g))
    heapq.heapify(groups)
    for n, req in enumerate(run):
        chosen = None
        while groups:
            # lazy at both levels, as one heap of every node would be: a group whose
            # spread_over part grew goes back with it, then a stale best node goes back
            # with its new key (an empty node's worth is computed here, when it first
            # comes up, with what is still to place then)
            part, _, g = groups[0]
            current_part = over(g)
            if current_part != part:
                heapq.heapreplace(groups, (current_part, groups[0][1], g))
                continue
            heap = heaps[g]
            key, i = heap[0]
            # Within a run a node's key (but its spread_over part) changes only when it is
            # chosen, and its entry is then replaced: only an optimistic worth is stale.
            if not _optimistic(key):
                chosen = i
                break
            current = fleet.key(i, spec, cpu, mem, failed_on, spread_over=False)
            if current == key:
                chosen = i
                break
            heapq.heapreplace(heap, (current, i))
            heapq.heapreplace(groups, (part, heap[0][0], g))
        if chosen is None:
            reason = _why_none(fleet, spec)
            failed.extend((r, reason) for r in run[n:])   # the rest are the same size: none fits
            fleet.left[fleet.run] = 0
            return
        was_empty = not fleet.busy(chosen)
        fleet.add(chosen, spec.name, cpu, mem)
        fleet.left[fleet.run] -= 1
        placed.append((req, fleet.nodes[chosen].name))
        heapq.heappop(heap)
        if fleet.fits(chosen, cpu, mem):
            heapq.heappush(heap, (fleet.key(chosen, spec, cpu, mem, failed_on, lazy=True, spread_over=False), chosen))
        nxt = after.pop(chosen, None)   # once: the next in line comes in when this one is first taken
        if was_empty and chosen != failed_on:
            line = lines[_line_of(fleet, chosen, labels_over)]
            i = fleet.first_empty(spec, fleet.shape[chosen], failed_on)
            if i is None:
                heapq.heappop(line)
            else:
                heapq.heapreplace(line, (fleet.nodes[i].name, i))
            nxt = line[0][1] if line else None
        if nxt is not None:
            heapq.heappush(heap, (fleet.key(nxt, spec, cpu, mem, failed_on, lazy=True, spread_over=False), nxt))
        if heap:
            heapq.heapreplace(groups, (over(g), heap[0][0], g))
        else:
            heapq.heappop(groups)


def _line_of(fleet: Fleet, i: int, labels_over: tuple[str, ...]) -> tuple:
    """What an empty node's key reads of it but its name (see ``_place_run``)."""
    labels = fleet.nodes[i].labels
    return (fleet.worth_shape[i], fleet.shape[i] in fleet.held, tuple(labels.get(label) for label in labels_over))


def _optimistic(key: tuple) -> bool:
    """A binpack key of an empty node whose worth is not computed yet (``rank_key``:
    ``-worth`` is the fifth part; spread keys have a name there)."""
    return key[4] == _NO_WORTH


def _place_pinned(requests: Sequence[Request], nodes: Sequence[NodeInfo],
                  existing: list[Allocation]) -> Placement:
    """Pinned requests on their node (or failed, saying why), then the others around them."""
    by_name = {n.name: n for n in nodes}
    placed: list[tuple[Request, str]] = []
    failed: list[tuple[Request, str]] = []
    for req in requests:
        if req.pinned_to is None:
            continue
        node = by_name.get(req.pinned_to)
        if node is None:
            gone = f", and node {req.pinned_to} is not in the fleet: waiting for it" if req.pinned_to else ""
            failed.append((req, f"{req.pinned_by}{gone}"))
            continue
        one = place([dataclasses.replace(req, pinned_to=None)], [node], existing)
        if one.placed:
            placed.append((req, node.name))
            cpu, mem = requests_of(req.spec)
            existing.append(Allocation(node.name, req.spec.name, cpu, mem))
        else:
            failed.append((req, f"{req.pinned_by}, which cannot hold it: {one.failed[0][1]}"))
    rest = place([r for r in requests if r.pinned_to is None], nodes, existing)
    return Placement(tuple(placed) + rest.placed, tuple(failed) + rest.failed)


def place(requests: Sequence[Request], nodes: Sequence[NodeInfo],
          existing: Iterable[Allocation]) -> Placement:
    existing = list(existing)
    if any(r.pinned_to is not None for r in requests):
        return _place_pinned(requests, nodes, existing)
    result, fleet = _greedy(requests, nodes, existing, frozenset())
    if len(requests) < 2 or not any(r.spec.placement.strategy == BINPACK for r in requests):
        return result
    # The packing search (see the module docstring): hold back one more shape of the
    # nodes the best pass opened, keep the pass if it uses less capacity.
    names = {a.node for a in existing}
    before = {i for i, n in enumerate(nodes) if n.name in names}
    best = (len(result.failed), fleet.cost())
    held: frozenset[tuple] = frozenset()
    passes, budget = 1, max(1, min(_MAX_PASSES, _PASS_WORK // len(requests)))
    improved = True
    while improved and passes < budget:
        improved = False
        opened = sorted({fleet.shape[i] for i in range(len(nodes)) if fleet.busy(i) and i not in before} - held,
                        key=repr)
        for shape in opened[:budget - passes]:
            passes += 1
            trial, trial_fleet = _greedy(requests, nodes, existing, held | {shape})
            score = (len(trial.failed), trial_fleet.cost())
            if score[0] < best[0] or (score[0] == best[0] and score[1] < best[1] - EPSILON):
                result, fleet, best, held, improved = trial, trial_fleet, score, held | {shape}, True
                break
    return result


def _greedy(requests: Sequence[Request], nodes: Sequence[NodeInfo], existing: Sequence[Allocation],
            held: frozenset[tuple]) -> tuple[Placement, Fleet]:
    """One pass: every request largest first, each on the best node for it then; then
    the nodes it opened are emptied where their replicas fit elsewhere."""
    fleet = _fleet(nodes, existing, requests, held)
    order = _largest_first(requests, fleet)
    placed: list[tuple[Request, str]] = []
    failed: list[tuple[Request, str]] = []
    runs = []
    start = 0
    while start < len(order):
        first = requests[order[start]]
        end = start + 1
        if first.failed_on is None:
            while (end < len(order) and requests[order[end]].spec is first.spec
                   and requests[order[end]].failed_on is None):
                end += 1
        runs.append([requests[k] for k in order[start:end]])
        start = end
    fleet.plan([(run[0].spec, len(run)) for run in runs])
    for run in runs:
        _place_run(fleet, run, placed, failed)
        fleet.run += 1
    if not failed and any(r.spec.placement.strategy == BINPACK for r in requests):
        # (with a request pending, emptying a node would make room it was refused)
        _evacuate(fleet, placed, existing)
    return Placement(tuple(placed), tuple(failed)), fleet


def _movable(req: Request) -> bool:
    """A replica the packing may move after the fact: binpack, with no spread_over (moving
    it would change its groups) and no failed node to keep away from."""
    p = req.spec.placement
    return p.strategy == BINPACK and not p.spread_over and req.failed_on is None


def _evacuate(fleet: Fleet, placed: list[tuple[Request, str]], existing: Sequence[Allocation]) -> None:
    """Empty the nodes this pass opened, least used first, by moving all their replicas
    into the free room of other nodes in use (largest first, each to the node it fills
    best); a node is emptied only when every replica on it moves, and only nodes that
    hold nothing but movable replicas are tried. Bounded by ``_EVACUATE_WORK`` node looks."""
    before = {fleet.index[a.node] for a in existing if a.node in fleet.index}
    on: dict[int, list[int]] = {}
    for k, (_, node) in enumerate(placed):
        on.setdefault(fleet.index[node], []).append(k)

    def used_share(i: int) -> float:
        cpu = fleet.used_cpu[i] / fleet.room_cpu[i] if fleet.room_cpu[i] else 0.0
        mem = fleet.used_mem[i] / fleet.room_mem[i] if fleet.room_mem[i] else 0.0
        return cpu + mem

    # the least cpu and memory a movable replica asks: a node without that room takes none
    movable = [requests_of(req.spec) for req, _ in placed if _movable(req)]
    smallest = (min(c for c, _ in movable), min(m for _, m in movable)) if movable else (0.0, 0)
    roomy = list(fleet.in_use)   # the nodes in use with room for the smallest of them
    work = 0
    for i in sorted((i for i in on if i not in before), key=lambda i: (used_share(i), i)):
        ks = on.get(i, [])
        if not ks or not all(_movable(placed[k][0]) for k in ks):
            continue
        work += (len(fleet.in_use) - 1) * len(ks)   # the nodes in use but i, as looked at
        if work > _EVACUATE_WORK:
            break
        # (room comes back on a node only when a failed attempt is undone, within one i)
        roomy = [j for j in roomy if fleet.busy(j) and fleet.fits(j, *smallest)]
        in_use = [j for j in roomy if j != i]
        moves: list[tuple[int, int]] = []
        for k in sorted(ks, key=lambda k: (-sum(requests_of(placed[k][0].spec)), k)):
            spec = placed[k][0].spec
            cpu, mem = requests_of(spec)
            suits = fleet.static(spec)[2]
            targets = [j for j in in_use if j in suits and fleet.fits(j, cpu, mem)]
            if not targets:
                break
            j = max(targets, key=lambda j: (binpack_fit(free_share(fleet.used_cpu[j], cpu, fleet.room_cpu[j]),
                                                        free_share(fleet.used_mem[j], mem, fleet.room_mem[j])), -j))
            fleet.remove(i, spec.name, cpu, mem)
            fleet.add(j, spec.name, cpu, mem)
            moves.append((k, j))
        if len(moves) < len(ks):   # undo: the node stays in use
            for k, j in moves:
                spec = placed[k][0].spec
                cpu, mem = requests_of(spec)
                fleet.remove(j, spec.name, cpu, mem)
                fleet.add(i, spec.name, cpu, mem)
            continue
        for k, j in moves:
            placed[k] = (placed[k][0], fleet.nodes[j].name)
            on.setdefault(j, []).append(k)
        on[i] = []


def explain(request: Request, nodes: Sequence[NodeInfo], existing: Iterable[Allocation]) -> Explanation:
    """Every node for ``request`` placed alone: filtered out (and why) or scored, best first."""
    fleet = _fleet(nodes, existing, [request])
    fleet.plan([(request.spec, 1)])
    failed_on = fleet.index.get(request.failed_on) if request.failed_on is not None else None
    verdicts = _verdicts(fleet, request.spec, failed_on)
    if request.pinned_to is not None:
        pinned = [v for v in verdicts if v.node == request.pinned_to]
        verdicts = pinned + [NodeVerdict(v.node, reason=request.pinned_by) for v in verdicts
                             if v.node != request.pinned_to]
    return Explanation(request, tuple(verdicts))


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
