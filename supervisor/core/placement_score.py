"""How placement ranks the nodes that can hold a replica. Pure; used by ``placement.py``.

A node that passed the filters (runtime, constraints, room for the requests) gets a
``Score``; the lowest ``Score.key`` wins. The key is lexicographic, most important first:

    spread_over   per ``placement.spread_over`` label, in order: replicas of the service
                  on the nodes sharing this node's value of the label (a node without the
                  label is a group of its own, as in Swarm's placement preferences). Soft:
                  it only orders nodes that can hold the replica.
    failed_here   1 on the node where this slot's replica just failed, else 0. Nomad's
                  ``NodeReschedulingPenaltyIterator`` gives that node -1; here it loses to
                  any other node of an equally good group, and beats none that is worse
                  on spread_over (moving zone to dodge one node would undo the zone spread).
    replicas      strategy spread only: replicas of the service on the node (Swarm's
                  "fewest tasks of this service"; Kubernetes' default hostname skew).
    opened        strategy binpack only: 0 if the node already runs something, 1 if it is
                  empty. Packing means not opening a node while a used one has room.
    held          binpack, empty nodes only: 1 if the packing search holds the node's shape
                  back (tried last), else 0 (``placement.place``).
    worth         binpack, empty nodes only, instead of fit: how much of the replicas still
                  to place the node would hold, per unit of its capacity (``Fleet.worth``).
    fit           0..1, higher better (the key holds ``-fit``), after adding the request:
                  binpack: Nomad's BestFit v3, ``(20 - (10**free_cpu + 10**free_mem)) / 18``
                  spread:  Kubernetes' LeastAllocated, ``(free_cpu + free_mem) / 2``
                  (``free_x`` = share of the node's room for x left; an unbounded resource
                  is always wholly free).
    name          last, so equal nodes are chosen the same way every time.

Why those two fit formulas. BestFit v3 is convex in the free share: it pulls a replica to
the node it nearly fills, and between two equally full nodes to the one whose cpu and
memory would be used evenly (10**a + 10**b, with a + b fixed, is least at a == b), which
strands less of either resource. Kubernetes' MostAllocated is linear and needs its
separate BalancedAllocation plugin for that. For spread the roles turn: Nomad's worst-fit
``10**free_cpu + 10**free_mem - 2`` prefers a node very free in one resource even when the
other is exhausted (10**1 + 10**0 = 11 > 2 * 10**0.5 = 6.3), the opposite of balance;
LeastAllocated is linear and evens out what each node has left.

Why lexicographic rather than Nomad's mean of scores: every rule above is one a user
states in the config, and an order of rules says what gives way to what without weights
to tune; ``explain`` shows each part, and the first difference decides.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Score", "rank_key", "binpack_fit", "spread_fit", "free_share", "SPREAD", "BINPACK"]

SPREAD, BINPACK = "spread", "binpack"


def free_share(used: float, request: float, room: float | None) -> float:
    """The share of ``room`` left once ``request`` is added to ``used``; 1 when unbounded."""
    if room is None:
        return 1.0
    if room <= 0:
        return 0.0
    left = 1.0 - (used + request) / room
    return left if left > 0.0 else 0.0


def binpack_fit(free_cpu: float, free_memory: float) -> float:
    """Nomad's ScoreFitBinPack (BestFit v3), normalised to 0..1: 1 when the node is full."""
    score = (20.0 - (10.0 ** free_cpu + 10.0 ** free_memory)) / 18.0
    return 0.0 if score < 0.0 else 1.0 if score > 1.0 else score


def spread_fit(free_cpu: float, free_memory: float) -> float:
    """Kubernetes' LeastAllocated (cpu and memory weighted 1:1), as 0..1: 1 when empty."""
    return (free_cpu + free_memory) / 2.0


def rank_key(strategy: str, spread_over: tuple[int, ...], failed_here: bool, replicas: int, opened: bool,
             held: bool, fit: float, worth: float, node: str) -> tuple:
    """The one definition of the order (lower is better; the first difference decides).
    ``held``: a node shape the packing search holds back from opening (``placement.place``);
    ``worth``: what an empty node would hold for its size (``placement_fleet.Fleet.worth``)."""
    if strategy == SPREAD:
        return (spread_over, failed_here, replicas, -fit, node)
    return (spread_over, failed_here, opened, held, -(worth if opened else fit), node)


@dataclass(frozen=True, slots=True)
class Score:
    """One candidate node's standing for one replica (see the module docstring)."""

    strategy: str
    spread_over: tuple[int, ...]
    failed_here: bool
    replicas: int
    opened: bool
    held: bool
    fit: float
    worth: float
    node: str


    @property
    def key(self) -> tuple:
        return rank_key(self.strategy, self.spread_over, self.failed_here, self.replicas, self.opened,
                        self.held, self.fit, self.worth, self.node)

    def describe(self) -> str:
        """``fit 0.73, 1 of web here, failed here, zone: 2 of web`` - what ``explain`` prints."""
        parts = [f"fit {self.fit:.3f} ({'BestFit' if self.strategy == BINPACK else 'LeastAllocated'})"]
        if self.strategy == SPREAD:
            parts.append(f"{self.replicas} of the service here")
        elif self.opened:
            parts.append(f"empty node worth {self.worth:.3f}" + (" (shape held back)" if self.held else ""))
        else:
            parts.append("node in use")
        if self.failed_here:
            parts.append("its replica just failed here")
        parts += [f"spread_over[{i}]: {n} of the service in its group" for i, n in enumerate(self.spread_over)]
        return ", ".join(parts)
