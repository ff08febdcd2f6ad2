"""Balancing policies: weighted distributions (seeded), load awareness, ring-hash
stability, peak-EWMA, and the safety properties of Cluster.pick."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy._balance import (DEFAULT_RTT, POLICIES, LeastRequest, PeakEwma, Random, RingHash, RoundRobin,
                            cookie_value, observe_rtt)
from proxy._routes import Cluster, ClusterSettings, Endpoint


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def eps(n: int, weights: list[int] | None = None) -> list[Endpoint]:
    weights = weights or [1] * n
    return [Endpoint(f"e{i}:80", f"127.0.0.{i + 1}", 80, w) for i, w in enumerate(weights)]


def shares(counter: Counter, endpoints: list[Endpoint]) -> list[float]:
    total = sum(counter.values())
    return [counter[e.id] / total for e in endpoints]


def test_policies_are_looked_up_by_name() -> None:
    assert set(POLICIES) == {"least_request", "round_robin", "random", "ring_hash", "peak_ewma"}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [1, 2, 7], [90, 10]], ids=["equal", "1-2-7", "canary-10"])
def test_idle_cluster_gets_the_configured_proportions(policy: str, weights: list[int]) -> None:
    endpoints = eps(len(weights), weights)
    p = POLICIES[policy](endpoints, [e.weight for e in endpoints], rng=random.Random(42), clock=FakeClock())
    n = 20000
    keys = [f"user-{i}".encode() for i in range(n)] if policy == "ring_hash" else [None] * n
    counts = Counter(p.pick(k).id for k in keys)
    total_w = sum(weights)
    expected = [w / total_w for w in weights]
    if policy == "peak_ewma" and len(set(weights)) > 1:
        # tower's weighted load divides the cost: the heavier endpoint wins every idle tie.
        heavy = max(endpoints, key=lambda e: e.weight)
        light = min(endpoints, key=lambda e: e.weight)
        assert counts[heavy.id] > counts[light.id]
        return
    tolerance = 0.04 if policy == "ring_hash" else 0.015
    for got, want in zip(shares(counts, endpoints), expected):
        assert abs(got - want) < tolerance, (policy, weights, shares(counts, endpoints))


def test_least_request_unequal_weights_is_exact_when_idle() -> None:
    endpoints = eps(3, [1, 2, 7])
    p = LeastRequest(endpoints, [1, 2, 7], rng=random.Random(3))
    counts = Counter(p.pick().id for _ in range(1000))
    assert [counts[e.id] for e in endpoints] == [100, 200, 700]


def test_least_request_avoids_the_busy_endpoint() -> None:
    endpoints = eps(3)
    endpoints[0].active = 10
    p = LeastRequest(endpoints, [1, 1, 1], rng=random.Random(1))
    counts = Counter(p.pick().id for _ in range(3000))
    # Two distinct draws always include a less busy endpoint.
    assert counts[endpoints[0].id] == 0


def test_least_request_unequal_weights_divides_by_active_plus_one() -> None:
    endpoints = eps(2, [3, 1])
    endpoints[0].active = 5  # effective weight 3/6 = 0.5 against 1/1
    p = LeastRequest(endpoints, [3, 1], rng=random.Random(1))
    counts = Counter(p.pick().id for _ in range(3000))
    assert shares(counts, endpoints) == pytest.approx([1 / 3, 2 / 3], abs=0.01)


def test_least_request_follows_load_as_it_changes() -> None:
    endpoints = eps(2)
    p = LeastRequest(endpoints, [1, 1], rng=random.Random(5))
    for _ in range(200):  # requests that never finish pile up evenly
        p.pick().active += 1
    assert abs(endpoints[0].active - endpoints[1].active) <= 1


def test_round_robin_is_smooth() -> None:
    endpoints = eps(3, [5, 1, 1])
    p = RoundRobin(endpoints, [5, 1, 1], rng=random.Random(0))
    seq = [p.pick().id[:2] for _ in range(14)]
    start = seq.index("e1")
    cycle = (seq + seq)[start:start + 7]
    assert sorted(Counter(cycle).items()) == [("e0", 5), ("e1", 1), ("e2", 1)]
    runs = max(len(r) for r in "".join("a" if s == "e0" else "|" for s in seq).split("|"))
    assert runs <= 4  # a a b a c a a (twice: ...a a | a a b...), never five in a row


def test_round_robin_equal_weights_cycles() -> None:
    endpoints = eps(3)
    p = RoundRobin(endpoints, [1, 1, 1], rng=random.Random(0))
    seq = [p.pick().id for _ in range(9)]
    assert seq[:3] == seq[3:6] == seq[6:] and len(set(seq[:3])) == 3


def test_random_weighted() -> None:
    endpoints = eps(2, [1, 3])
    p = Random(endpoints, [1, 3], rng=random.Random(9))
    counts = Counter(p.pick().id for _ in range(20000))
    assert shares(counts, endpoints) == pytest.approx([0.25, 0.75], abs=0.015)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_pick_among_never_returns_a_skipped_endpoint(policy: str) -> None:
    endpoints = eps(4, [1, 2, 3, 4])
    p = POLICIES[policy](endpoints, [1, 2, 3, 4], rng=random.Random(2), clock=FakeClock())
    skip = {endpoints[1].id, endpoints[3].id}
    got = {p.pick_among(f"k{i}".encode(), skip).id for i in range(500)}
    allowed = {endpoints[0].id, endpoints[2].id}
    assert got <= allowed
    if policy != "peak_ewma":  # idle peak-EWMA always prefers the heavier of the two
        assert got == allowed
    assert p.pick_among(b"k", {e.id for e in endpoints}) is None


# -- ring hash ---------------------------------------------------------------------

KEYS = [f"session-{i}".encode() for i in range(10000)]


def ring_map(endpoints: list[Endpoint]) -> dict[bytes, str]:
    ring = RingHash(endpoints, [e.weight for e in endpoints], rng=random.Random(0))
    return {k: ring.pick(k).id for k in KEYS}


@pytest.mark.parametrize("n", [2, 4, 9])
def test_ring_hash_adding_one_of_n_moves_about_one_nth_of_the_keys(n: int) -> None:
    before = ring_map(eps(n))
    grown = eps(n + 1)
    after = ring_map(grown)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == grown[-1].id for k in moved)  # only to the new endpoint
    assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.06


def test_ring_hash_removing_one_moves_only_its_keys() -> None:
    endpoints = eps(5)
    before = ring_map(endpoints)
    after = ring_map(endpoints[:2] + endpoints[3:])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == endpoints[2].id}


def test_ring_hash_is_stable_across_instances_and_skips_walk_clockwise() -> None:
    endpoints = eps(4)
    a = RingHash(endpoints, [1] * 4, rng=random.Random(1))
    b = RingHash(list(reversed(endpoints)), [1] * 4, rng=random.Random(2))
    assert all(a.pick(k).id == b.pick(k).id for k in KEYS[:500])
    # Skipping an endpoint is the same as the ring without it.
    without = RingHash(endpoints[1:], [1] * 3)
    assert all(a.pick_among(k, {endpoints[0].id}).id == without.pick(k).id for k in KEYS[:2000])


def test_ring_hash_without_key_picks_randomly() -> None:
    endpoints = eps(3)
    p = RingHash(endpoints, [1] * 3, rng=random.Random(4))
    assert len({p.pick(None).id for _ in range(100)}) == 3


def test_ring_hash_points_are_cached_across_snapshots() -> None:
    cache: dict = {}
    endpoints = eps(3)
    first = RingHash(endpoints, [1] * 3, cache=cache)
    assert set(cache) == {e.id for e in endpoints}
    cache[endpoints[0].id] = list(cache[endpoints[0].id])  # same content, new object
    again = RingHash(endpoints, [1] * 3, cache=cache)
    assert again.hashes == first.hashes
    RingHash(endpoints[1:], [1] * 2, cache=cache)
    assert set(cache) == {e.id for e in endpoints[1:]}  # departed endpoints are forgotten


@pytest.mark.parametrize("header, name, value", [
    (b"sid=abc; theme=dark", b"sid", b"abc"),
    (b"theme=dark;sid=abc", b"sid", b"abc"),
    (b'sid="q"', b"sid", b"q"),
    (b"xsid=1; sidx=2", b"sid", None),
    (b"", b"sid", None),
    (b"sid=", b"sid", b""),
])
def test_cookie_value(header: bytes, name: bytes, value: bytes | None) -> None:
    assert cookie_value(header, name) == value


# -- peak EWMA ---------------------------------------------------------------------

def test_observe_rtt_follows_peaks_at_once_and_decays_slowly() -> None:
    ep = Endpoint("e:1", "127.0.0.1", 1, now=0.0)
    assert ep.rtt == DEFAULT_RTT
    observe_rtt(ep, 0.5, now=1.0)
    assert ep.rtt == 0.5  # peak
    observe_rtt(ep, 0.01, now=11.0)  # one decay constant later: 1/e of the old estimate remains
    assert ep.rtt == pytest.approx(0.5 * 0.36788 + 0.01 * 0.63212, rel=1e-3)
    observe_rtt(ep, 0.01, now=11.0)  # no time passed: no change
    assert ep.rtt == pytest.approx(0.5 * 0.36788 + 0.01 * 0.63212, rel=1e-3)


def test_peak_ewma_prefers_the_fast_endpoint_and_retries_the_slow_one_later() -> None:
    clock = FakeClock(100.0)
    endpoints = eps(2)
    fast, slow = endpoints
    observe_rtt(fast, 0.005, clock.t)
    observe_rtt(fast, 0.005, clock.t)
    slow.rtt, slow.rtt_at = 0.5, clock.t
    fast.rtt, fast.rtt_at = 0.005, clock.t
    p = PeakEwma(endpoints, [1, 1], rng=random.Random(1), clock=clock)
    counts = Counter(p.pick().id for _ in range(1000))
    assert counts[slow.id] == 0
    fast.active = 200  # a fast endpoint buried in requests costs more than an idle slow one
    assert p.pick() is slow
    fast.active = 0
    # The slow endpoint got no traffic for a minute: its estimate decayed toward zero
    # (0.5 s * e^-6 = 1.2 ms) while the fast one kept measuring 5 ms, so it is tried again.
    clock.t += 60
    observe_rtt(fast, 0.005, clock.t)
    assert p.pick() is slow


# -- Cluster.pick safety properties -----------------------------------------------------

@st.composite
def clusters(draw):
    n = draw(st.integers(min_value=0, max_value=8))
    weights = draw(st.lists(st.integers(min_value=0, max_value=5), min_size=n, max_size=n))
    endpoints = eps(n, weights) if n else []
    for e in endpoints:
        e.active = draw(st.integers(min_value=0, max_value=5))
    ejected = draw(st.sets(st.sampled_from([e.id for e in endpoints]))) if n else set()
    exclude = draw(st.sets(st.sampled_from([e.id for e in endpoints]))) if n else set()
    policy = draw(st.sampled_from(sorted(POLICIES)))
    hash_on = ("header", "x-user") if policy == "ring_hash" else None
    key = draw(st.one_of(st.none(), st.binary(max_size=8)))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    return endpoints, ejected, exclude, policy, hash_on, key, seed


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_pick_safety(case) -> None:
    endpoints, ejected, exclude, policy, hash_on, key, seed = case
    clock = FakeClock()
    for e in endpoints:
        if e.id in ejected:
            e.ejected_until = clock.t + 30
    c = Cluster("s", "http", "http", ClusterSettings(policy=policy, hash_on=hash_on), tuple(endpoints),
                clock=clock, rng=random.Random(seed))
    all_zero = all(e.weight == 0 for e in endpoints)
    routable = [e for e in endpoints if e.weight > 0 or all_zero]
    healthy = [e for e in routable if e.id not in ejected]
    panic = bool(routable) and len(healthy) * 2 < len(routable)
    candidates = [e for e in (routable if panic else healthy) if e.id not in exclude]
    for _ in range(5):
        got = c.pick(key, exclude=frozenset(exclude))
        if not candidates:
            assert got is None
            continue
        assert got is not None
        assert got.id not in exclude
        assert panic or got.id not in ejected
        assert got.weight > 0 or all_zero
    assert c.panic == panic


def test_weight_zero_gets_no_new_traffic_unless_all_are_zero() -> None:
    endpoints = eps(3, [0, 1, 1])
    c = Cluster("s", None, "http", ClusterSettings(), tuple(endpoints), rng=random.Random(1))
    assert endpoints[0] not in {c.pick() for _ in range(300)}
    only_zero = eps(2, [0, 0])
    c = Cluster("s", None, "http", ClusterSettings(), tuple(only_zero), rng=random.Random(1))
    assert {c.pick().id for _ in range(300)} == {e.id for e in only_zero}


def test_empty_cluster_picks_none() -> None:
    assert Cluster("s", None, "http", ClusterSettings(), ()).pick() is None
