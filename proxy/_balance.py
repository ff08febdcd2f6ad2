"""Clusters and their load-balancing policies: pick one endpoint.

Vocabulary
----------
Endpoint
    One (instance, port) that receives traffic, with its live stats: requests in
    flight, peak-EWMA latency, outlier counters and ejection. The route table keeps the
    same object across rebuilds while the instance stays (key: instance id + port).
Cluster
    The ready endpoints of one port of one service, its settings and a policy built for
    exactly those endpoints. ``Cluster.pick`` puts ejections (:mod:`proxy._outlier`),
    panic mode, weight 0 and the retry's ``exclude`` together; ``begin``/``end`` feed
    the stats; the pending cap and the retry budget (:mod:`proxy._retry`) live here.
    A snapshot never changes; what it shares with the next snapshot of the same
    (service, port) (pending requests, retries in flight) lives in ``_Shared``.
policy
    An object built once per cluster snapshot from its routable endpoints and their
    weights (all > 0). Whatever can be precomputed is (fabio ``weighTargets``): a pick
    is then a few random draws, an index and a counter. ``pick(key)`` is the fast path
    (every endpoint eligible); ``pick_among(key, skip)`` the slow one, taken on retries
    and while endpoints are ejected: never an endpoint whose id is in ``skip``, None
    when all are skipped.

Policies are looked up by name in :data:`POLICIES` (uvicorn ``HTTP_PROTOCOLS``, fabio
``Picker``). They read ``Endpoint.active`` and ``Endpoint.rtt`` but never write them;
the RNG and the clock are injected so tests are deterministic.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import random as _random
import time
from bisect import bisect_right
from itertools import accumulate, count
from typing import TYPE_CHECKING, Any, Callable, Container, Sequence

from . import _outlier
from ._retry import retry_allowed

if TYPE_CHECKING:  # pragma: no cover
    from ._metrics import Metrics
    from ._routes import ClusterSettings

__all__ = ["Endpoint", "Cluster", "POLICIES", "LeastRequest", "RoundRobin", "Random",
           "RingHash", "PeakEwma", "hash64", "cookie_value", "DEFAULT_RTT", "DECAY", "observe_rtt"]

# Linkerd2-proxy's peak-EWMA defaults.
DEFAULT_RTT = 0.030  # seconds assumed for an endpoint never measured
DECAY = 10.0  # seconds: the time constant of the exponential decay

Clock = Callable[[], float]

log = logging.getLogger("meshlet.proxy.balance")


class Endpoint:
    """One instance port and its live stats (mutated by the cluster, read by /routes)."""

    __slots__ = (
        "id", "instance_id", "node", "address", "port", "weight", "active",
        "rtt", "rtt_at",  # peak-EWMA latency estimate (seconds) and when it was updated
        "c5xx", "cgw", "ejected_until", "times_ejected", "returned_at", "ejections",
    )

    def __init__(self, id: str, address: str, port: int, weight: int = 1, *,
                 instance_id: str = "", node: str = "", now: float = 0.0) -> None:
        self.id = id
        self.instance_id = instance_id or id
        self.node = node
        self.address = address
        self.port = port
        self.weight = weight
        self.active = 0
        self.rtt = DEFAULT_RTT
        self.rtt_at = now
        self.c5xx = 0
        self.cgw = 0
        self.ejected_until = 0.0
        self.times_ejected = 0
        self.returned_at = 0.0
        self.ejections = 0

    def __repr__(self) -> str:
        return f"<Endpoint {self.id} {self.address}:{self.port} w={self.weight} active={self.active}>"


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
            eps = self.endpoints  # (_p2c, inlined: this is every request's pick)
            n = self.n
            if n == 1:
                return eps[0]
            rand = self._random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            a = eps[i]
            b = eps[j]
            return b if b.active < a.active else a
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
        ids = {e.id for e in self.endpoints}
        for gone in [k for k in cache if k not in ids]:
            del cache[gone]  # instances come and go with every rollout: keep the cache bounded
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
        dt = now - ep.rtt_at
        w = math.exp(-dt / decay) if dt > 0.0 else 1.0  # (exp(-0.0) is 1.0: no time passed, no decay)
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


class _Shared:
    """Counters every snapshot of one (service, port) shares, so requests that began on
    an older snapshot still count (and are released) after a rebuild."""

    __slots__ = ("version", "admitted", "active", "retries", "endpoints", "ring_cache")

    def __init__(self) -> None:
        self.version = 0  # bumped on every ejection and return
        self.admitted = 0  # requests holding a pending slot
        self.active = 0  # attempts in flight (begin .. end)
        self.retries = 0  # retries in flight
        self.endpoints: dict[str, Endpoint] = {}
        self.ring_cache: dict[str, list[int]] = {}


class Cluster:
    """One port of one service: its settings, its endpoints and their balancer."""

    def __init__(self, name: str, port_name: str | None, protocol: str, settings: ClusterSettings,
                 endpoints: tuple[Endpoint, ...], *, shared: _Shared | None = None,
                 clock: Clock = time.monotonic, rng: _random.Random | None = None,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.port_name = port_name
        self.protocol = protocol
        self.settings = settings
        self.endpoints = endpoints
        self._shared = shared or _Shared()
        self._clock = clock
        self._metrics = metrics
        self.signature = (protocol, settings, tuple((e.id, e.address, e.port, e.weight) for e in endpoints))
        # Weight 0 means "no new traffic"; when every endpoint has weight 0 they share equally.
        routable = tuple(e for e in endpoints if e.weight > 0)
        weights = tuple(e.weight for e in routable)
        if not routable and endpoints:
            routable, weights = endpoints, (1,) * len(endpoints)
        self.routable = routable
        self._policy = None
        if routable:
            cls = POLICIES[settings.policy]   # config accepts these names only
            self._policy = cls(routable, weights, rng=rng, clock=clock, cache=self._shared.ring_cache)
        self._seen = -1  # shared.version the ejection view below was computed at
        self._next_return = 0.0  # earliest return of an ejected endpoint (0: none)
        self._skip: frozenset[str] | None = None  # ejected ids to avoid, None: avoid none
        self.panic = False
        # The settings every request reads, flattened (one attribute load each).
        self.request_timeout = settings.timeouts.request   # 0: none
        self.idle_timeout = settings.timeouts.idle
        self.per_try_timeout = settings.retries.per_try_timeout  # 0: none (safe requests hedge)
        self.retry_attempts = settings.retries.attempts
        self.hash_on = settings.hash_on
        self.max_pending = settings.max_pending   # 0: no limit

    def __repr__(self) -> str:
        return f"<Cluster {self.name}:{self.port_name} {self.protocol} endpoints={len(self.endpoints)}>"

    # -- balancing ------------------------------------------------------------------

    def _refresh(self) -> None:
        """Recompute which endpoints are ejected (and return those whose time is up)."""
        now = self._clock()
        sh = self._shared
        if _outlier.return_due(self.endpoints, now):
            sh.version += 1
        ejected = [e for e in self.endpoints if e.ejected_until]
        self._next_return = min((e.ejected_until for e in ejected), default=0.0)
        ids = frozenset(e.id for e in ejected)
        healthy = sum(1 for e in self.routable if e.id not in ids)
        self.panic = _outlier.is_panic(healthy, len(self.routable))
        self._skip = ids if ids and not self.panic else None
        self._seen = sh.version

    def pick(self, hash_key: bytes | None = None,
             exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        """An endpoint for the next attempt, or None when there is none to use.

        Never one whose id is in ``exclude`` (retries pass the ids already tried),
        never an ejected one unless the cluster is in panic mode, never one of weight 0
        unless all are 0. ``hash_key``: the header/cookie/client-IP bytes for ring_hash.
        """
        if self._seen != self._shared.version or (self._next_return and self._clock() >= self._next_return):
            self._refresh()
        policy = self._policy
        if policy is None:
            return None
        skip = self._skip
        if skip is None:
            if not exclude:
                return policy.pick(hash_key)
            return policy.pick_among(hash_key, exclude)
        return policy.pick_among(hash_key, skip.union(exclude) if exclude else skip)

    def begin(self, ep: Endpoint) -> None:
        ep.active += 1
        self._shared.active += 1

    def answered(self, ep: Endpoint, status: int, latency: float) -> None:
        """``end(ep, status=status, failure=None, latency=latency)`` with positional
        arguments and the success case inlined: every response's call."""
        if status >= 500:
            self.end(ep, status=status, failure=None, latency=latency)
            return
        if ep.active > 0:
            ep.active -= 1
        sh = self._shared
        if sh.active > 0:
            sh.active -= 1
        if latency >= 0:
            now = self._clock()
            if latency > ep.rtt:  # (observe_rtt, inlined)
                ep.rtt = latency
            else:
                dt = now - ep.rtt_at
                w = math.exp(-dt / DECAY) if dt > 0.0 else 1.0
                ep.rtt = ep.rtt * w + latency * (1.0 - w)
            ep.rtt_at = now
        ep.c5xx = 0
        ep.cgw = 0

    def end(self, ep: Endpoint, *, status: int | None, failure: str | None, latency: float) -> None:
        """One attempt on ``ep`` finished: a response ``status``, or a ``failure``
        ("connect" | "reset" | "timeout"), or neither (the client left: nothing learnt)."""
        if ep.active > 0:
            ep.active -= 1
        sh = self._shared
        if sh.active > 0:
            sh.active -= 1
        now = self._clock()
        if failure is None:
            if status is None:
                return  # the client went away: nothing learnt
            if latency >= 0:
                observe_rtt(ep, latency, now)
            if status < 500:  # the common case, inlined: a success ends both streaks
                ep.c5xx = 0
                ep.cgw = 0
                return
        elif failure == "timeout" and latency >= 0:
            observe_rtt(ep, latency, now)
        if _outlier.record(ep, status, failure, self.settings.outlier):
            self._try_eject(ep, now)

    def _try_eject(self, ep: Endpoint, now: float) -> None:
        s = self.settings.outlier
        ejected = sum(1 for e in self.endpoints if _outlier.is_ejected(e, now))
        if not _outlier.may_eject(ejected, len(self.endpoints), s.max_ejection_percent):
            log.info("service %s: endpoint %s failing, not ejected: %d of %d already ejected (max %g%%)",
                     self.name, ep.id, ejected, len(self.endpoints), s.max_ejection_percent)
            return
        until = _outlier.eject(ep, now, s)
        self._shared.version += 1
        log.warning("service %s: endpoint %s (%s:%d) ejected for %.0fs (ejection #%d)",
                    self.name, ep.id, ep.address, ep.port, until - now, ep.times_ejected)
        if self._metrics is not None:
            self._metrics.ejection(self.name)

    def ejected_count(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        return sum(1 for e in self.endpoints if _outlier.is_ejected(e, now))

    # -- limits ---------------------------------------------------------------------

    def try_acquire_pending(self) -> bool:
        """Admit one more request to this service, or False (503: breaker open)."""
        sh = self._shared
        cap = self.max_pending
        if cap and sh.admitted >= cap:
            return False
        sh.admitted += 1
        return True

    def release_pending(self) -> None:
        sh = self._shared
        if sh.admitted > 0:
            sh.admitted -= 1

    def retry_allowed(self) -> bool:
        sh = self._shared
        r = self.settings.retries
        return retry_allowed(sh.retries, max(sh.admitted, sh.active), r.budget_percent, r.min_concurrent)

    def retry_begin(self) -> None:
        self._shared.retries += 1

    def retry_end(self) -> None:
        sh = self._shared
        if sh.retries > 0:
            sh.retries -= 1

    @property
    def pending(self) -> int:
        return self._shared.admitted

    @property
    def retries_in_flight(self) -> int:
        return self._shared.retries

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        eps = []
        for e in self.endpoints:
            ejected = _outlier.is_ejected(e, now)
            eps.append({
                "id": e.id, "instance": e.instance_id, "node": e.node,
                "address": e.address, "port": e.port, "weight": e.weight, "active": e.active,
                "ejected": ejected,
                "ejected_for": round(e.ejected_until - now, 3) if ejected else 0,
                "ejections": e.ejections,
                "ewma": round(e.rtt * 1000.0, 3), "ewma_unit": "ms",
                "consecutive_5xx": e.c5xx, "consecutive_gateway_failures": e.cgw,
            })
        s = self.settings
        return {
            "service": self.name, "port_name": self.port_name, "protocol": self.protocol,
            "policy": s.policy, "hash_on": list(s.hash_on) if s.hash_on else None,
            "max_pending": s.max_pending, "pending": self._shared.admitted,
            "retries_in_flight": self._shared.retries,
            "panic": self.panic, "endpoints": eps,
        }
