"""Load-balancing policies: pick one endpoint of a cluster snapshot.

Vocabulary
----------
policy
    An object built once per cluster snapshot from its routable endpoints and their
    weights (all > 0). Whatever can be precomputed is (fabio ``weighTargets``): a pick
    is then a few random draws, an index and a counter.
``pick(key)``
    The fast path: every endpoint of the snapshot is eligible.
``pick_among(key, skip)``
    The slow path, taken on retries (skip the endpoints already tried) and while
    endpoints are ejected: never returns an endpoint whose id is in ``skip``; ``None``
    when every endpoint is skipped.

Policies are looked up by name in :data:`POLICIES` (uvicorn ``HTTP_PROTOCOLS``, fabio
``Picker``). They read ``Endpoint.active`` and ``Endpoint.rtt`` (live, shared counters)
but never write them; the RNG and the clock are injected so tests are deterministic.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random as _random
from bisect import bisect_right
from itertools import accumulate, count
from typing import TYPE_CHECKING, Callable, Container, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ._routes import Endpoint

__all__ = [
    "POLICIES",
    "DEFAULT_POLICY",
    "LeastRequest",
    "RoundRobin",
    "Random",
    "RingHash",
    "PeakEwma",
    "hash64",
    "cookie_value",
    "DEFAULT_RTT",
    "DECAY",
    "observe_rtt",
]

# Linkerd2-proxy's peak-EWMA defaults.
DEFAULT_RTT = 0.030  # seconds assumed for an endpoint never measured
DECAY = 10.0  # seconds: the time constant of the exponential decay

Clock = Callable[[], float]


def _all_equal(weights: Sequence[int]) -> bool:
    first = weights[0]
    return all(w == first for w in weights)


def _weighted_index(cumulative: Sequence[float], total: float, r: float) -> int:
    """Index i with cumulative[i-1] <= r*total < cumulative[i]."""
    i = bisect_right(cumulative, r * total)
    return i if i < len(cumulative) else len(cumulative) - 1


class _Base:
    name = ""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        weights: Sequence[int],
        *,
        rng: _random.Random | None = None,
        clock: Clock | None = None,
        cache: dict | None = None,
    ) -> None:
        if not endpoints or len(endpoints) != len(weights):
            raise ValueError("a policy needs at least one endpoint and one weight per endpoint")
        if any(w <= 0 for w in weights):
            raise ValueError("policy weights must be > 0 (weight-0 endpoints are not routable)")
        self.endpoints = tuple(endpoints)
        self.weights = tuple(weights)
        self.n = len(self.endpoints)
        self.equal = _all_equal(self.weights)
        self.rng = rng or _random.Random()
        self._random = self.rng.random
        self.clock = clock

    def pick(self, key: bytes | None = None) -> Endpoint:  # pragma: no cover - abstract
        raise NotImplementedError

    def pick_among(self, key: bytes | None, skip: Container[str]) -> Endpoint | None:
        """Default slow path: a weighted random choice among the eligible endpoints."""
        eligible = [(e, w) for e, w in zip(self.endpoints, self.weights) if e.id not in skip]
        if not eligible:
            return None
        return _weighted_choice(eligible, self._random)

    def eligible(self, skip: Container[str]) -> list[tuple[Endpoint, int]]:
        return [(e, w) for e, w in zip(self.endpoints, self.weights) if e.id not in skip]


def _weighted_choice(eligible: Sequence[tuple[Endpoint, float]], rand: Callable[[], float]) -> Endpoint:
    total = 0.0
    for _, w in eligible:
        total += w
    r = rand() * total
    for e, w in eligible:
        r -= w
        if r < 0:
            return e
    return eligible[-1][0]


def _p2c(eps: Sequence[Endpoint], rand: Callable[[], float]) -> Endpoint:
    """Power of two choices on in-flight requests: two distinct random endpoints, the
    less busy wins, a tie keeps the first draw (so an idle cluster is uniform)."""
    n = len(eps)
    if n == 1:
        return eps[0]
    i = int(rand() * n)
    j = int(rand() * (n - 1))
    if j >= i:
        j += 1
    a = eps[i]
    b = eps[j]
    return b if b.active < a.active else a


class LeastRequest(_Base):
    """Envoy's least_request.

    Equal weights: power of two choices (``choice_count`` 2) on ``active``.
    Unequal weights (canaries): Envoy's earliest-deadline-first schedule over the
    effective weight ``weight / (active + 1)`` (``active_request_bias`` 1.0). An idle
    cluster thus gets exactly the configured proportions, and a busy endpoint's next
    deadline moves out in proportion to its load. O(log n) per pick (one heap pop+push).
    """

    name = "least_request"

    def __init__(self, endpoints, weights, **kw) -> None:
        super().__init__(endpoints, weights, **kw)
        if not self.equal:
            # Random start (as Envoy) so several proxies do not send in lock-step.
            self._heap = [(self._random() / w, i) for i, w in enumerate(self.weights)]
            heapq.heapify(self._heap)

    def pick(self, key: bytes | None = None) -> Endpoint:
        if self.equal:
            return _p2c(self.endpoints, self._random)
        heap = self._heap
        deadline, i = heap[0]
        ep = self.endpoints[i]
        heapq.heapreplace(heap, (deadline + (ep.active + 1) / self.weights[i], i))
        return ep

    def pick_among(self, key: bytes | None, skip: Container[str]) -> Endpoint | None:
        eligible = self.eligible(skip)
        if not eligible:
            return None
        if self.equal:
            return _p2c([e for e, _ in eligible], self._random)
        return _weighted_choice([(e, w / (e.active + 1)) for e, w in eligible], self._random)


class RoundRobin(_Base):
    """Smooth weighted round robin (nginx): one cycle of the sequence is computed once
    per snapshot (weights reduced by their gcd, at most ``MAX_SEQUENCE`` slots), so a
    pick is a counter and an index. Weights 5:1:1 give a a b a c a a, not a a a a a b c."""

    name = "round_robin"
    MAX_SEQUENCE = 1024

    def __init__(self, endpoints, weights, **kw) -> None:
        super().__init__(endpoints, weights, **kw)
        self.sequence = _smooth_sequence(self.weights, self.MAX_SEQUENCE)
        self._len = len(self.sequence)
        # Random start so several proxies (and workers) do not hit the same endpoint together.
        self._counter = count(int(self._random() * self._len))

    def pick(self, key: bytes | None = None) -> Endpoint:
        return self.endpoints[self.sequence[next(self._counter) % self._len]]

    def pick_among(self, key: bytes | None, skip: Container[str]) -> Endpoint | None:
        for _ in range(self._len):
            ep = self.endpoints[self.sequence[next(self._counter) % self._len]]
            if ep.id not in skip:
                return ep
        return None


def _smooth_sequence(weights: Sequence[int], limit: int) -> tuple[int, ...]:
    if _all_equal(weights):
        return tuple(range(len(weights)))
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    ws = [w // g for w in weights]
    total = sum(ws)
    if total > limit:
        ws = [max(1, round(w * limit / total)) for w in ws]
        total = sum(ws)
    # nginx's smooth weighted round robin, run once for a whole cycle.
    current = [0] * len(ws)
    out = []
    for _ in range(total):
        best = 0
        for i, w in enumerate(ws):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return tuple(out)


class Random(_Base):
    """Weighted random: a bisect over cumulative weights precomputed per snapshot."""

    name = "random"

    def __init__(self, endpoints, weights, **kw) -> None:
        super().__init__(endpoints, weights, **kw)
        self._cumulative = tuple(accumulate(self.weights))
        self._total = self._cumulative[-1]

    def pick(self, key: bytes | None = None) -> Endpoint:
        if self.equal:
            return self.endpoints[int(self._random() * self.n)]
        return self.endpoints[_weighted_index(self._cumulative, self._total, self._random())]


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process and worker, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RingHash(_Base):
    """Ketama-style consistent hashing on a ring of 64-bit points.

    Each endpoint owns ``POINTS_PER_WEIGHT`` × (weight / gcd of weights) points, hashed
    from its id (instance id + port), so the points of one endpoint never depend on
    the others: adding one endpoint to N takes about 1/(N+1) of the keys, all to the
    new one, and moves none between the old ones. A key maps to the first point
    clockwise of its hash. Skipping an endpoint (ejected, already tried) walks on
    clockwise, which gives exactly the ring without it. No key (no header, no cookie)
    means a weighted random pick. The ring is built once per snapshot and the points
    of each endpoint are cached across snapshots in ``cache``.
    """

    name = "ring_hash"
    POINTS_PER_WEIGHT = 256
    MAX_POINTS = 65536

    def __init__(self, endpoints, weights, *, cache: dict | None = None, **kw) -> None:
        super().__init__(endpoints, weights, **kw)
        g = 0
        for w in self.weights:
            g = math.gcd(g, w)
        units = [w // g for w in self.weights]
        per_unit = self.POINTS_PER_WEIGHT
        if per_unit * sum(units) > self.MAX_POINTS:
            per_unit = max(1, self.MAX_POINTS // sum(units))
        cache = cache if cache is not None else {}
        points: list[tuple[int, int]] = []
        for i, (ep, u) in enumerate(zip(self.endpoints, units)):
            n = max(1, per_unit * u)
            cached = cache.get(ep.id)
            if cached is None or len(cached) < n:
                base = ep.id.encode()
                cached = [hash64(base + b"#" + str(k).encode()) for k in range(n)]
                cache[ep.id] = cached
            points.extend((h, i) for h in cached[:n])
        points.sort()
        self.hashes = tuple(h for h, _ in points)
        self.owners = tuple(i for _, i in points)
        self._fallback = Random(self.endpoints, self.weights, rng=self.rng)

    def _start(self, key: bytes) -> int:
        idx = bisect_right(self.hashes, hash64(key))
        return 0 if idx == len(self.hashes) else idx

    def pick(self, key: bytes | None = None) -> Endpoint:
        if key is None:
            return self._fallback.pick()
        return self.endpoints[self.owners[self._start(key)]]

    def pick_among(self, key: bytes | None, skip: Container[str]) -> Endpoint | None:
        if key is None:
            return self._fallback.pick_among(None, skip)
        idx = self._start(key)
        size = len(self.owners)
        seen = 0
        tried: set[int] = set()
        for step in range(size):
            i = self.owners[(idx + step) % size]
            if i in tried:
                continue
            ep = self.endpoints[i]
            if ep.id not in skip:
                return ep
            tried.add(i)
            seen += 1
            if seen == self.n:
                break
        return None


def observe_rtt(ep: Endpoint, rtt: float, now: float, decay: float = DECAY) -> None:
    """Linkerd's peak-EWMA update: a slower sample replaces the estimate at once (peak);
    a faster one is blended in, weighted by the time since the last update."""
    if rtt > ep.rtt:
        ep.rtt = rtt
    else:
        w = math.exp(-max(0.0, now - ep.rtt_at) / decay)
        ep.rtt = ep.rtt * w + rtt * (1.0 - w)
    ep.rtt_at = now


class PeakEwma(_Base):
    """Linkerd2-proxy's balancer: power of two choices over
    ``cost = rtt_estimate × (active + 1) / weight``, where the estimate starts at
    ``DEFAULT_RTT`` (30 ms), follows peaks at once and otherwise decays with time
    constant ``DECAY`` (10 s) toward the samples (and toward 0 while idle, so an idle
    endpoint is tried again). Weights divide the cost (tower's ``Weight``)."""

    name = "peak_ewma"

    def __init__(self, endpoints, weights, *, clock: Clock | None = None, decay: float = DECAY, **kw) -> None:
        super().__init__(endpoints, weights, clock=clock, **kw)
        if self.clock is None:
            import time

            self.clock = time.monotonic
        self.decay = decay
        self._pairs = tuple(zip(self.endpoints, self.weights))

    def _cost(self, ep: Endpoint, w: int, now: float) -> float:
        est = ep.rtt * math.exp(-max(0.0, now - ep.rtt_at) / self.decay)
        return est * (ep.active + 1) / w

    def _choose(self, eligible: Sequence[tuple[Endpoint, int]]) -> Endpoint:
        n = len(eligible)
        if n == 1:
            return eligible[0][0]
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        if j >= i:
            j += 1
        now = self.clock()
        a, wa = eligible[i]
        b, wb = eligible[j]
        return b if self._cost(b, wb, now) < self._cost(a, wa, now) else a

    def pick(self, key: bytes | None = None) -> Endpoint:
        return self._choose(self._pairs)

    def pick_among(self, key: bytes | None, skip: Container[str]) -> Endpoint | None:
        eligible = self.eligible(skip)
        return self._choose(eligible) if eligible else None


POLICIES: dict[str, type[_Base]] = {
    p.name: p for p in (LeastRequest, RoundRobin, Random, RingHash, PeakEwma)
}
DEFAULT_POLICY = LeastRequest.name


def cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in one ``Cookie`` header value, or None.

    For ``hash_on: {cookie: NAME}``; the engine passes every Cookie header in turn."""
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            v = v.strip()
            if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                v = v[1:-1]
            return v
    return None
