"""Retry budget (Envoy: 20 % of requests in flight, at least 3) and the per-service
pending-request cap."""

from __future__ import annotations

import pytest

import config
from discovery.view import Instance, ServiceView, View
from proxy._retry import RetrySettings, retry_allowed, retry_limit
from proxy._routes import Cluster, ClusterSettings, Endpoint, build_table


@pytest.mark.parametrize("active, percent, minimum, limit", [
    pytest.param(0, 20, 3, 3, id="idle-min-3"),
    pytest.param(10, 20, 3, 3, id="20pct-of-10-is-below-min"),
    pytest.param(15, 20, 3, 3, id="20pct-of-15"),
    pytest.param(20, 20, 3, 4, id="20pct-of-20"),
    pytest.param(100, 20, 3, 20, id="20pct-of-100"),
    pytest.param(99, 20, 3, 19, id="truncated"),
    pytest.param(100, 0, 0, 0, id="no-retries"),
    pytest.param(10, 100, 0, 10, id="all"),
])
def test_retry_limit(active: int, percent: float, minimum: int, limit: int) -> None:
    assert retry_limit(active, percent, minimum) == limit
    if limit > 0:
        assert retry_allowed(limit - 1, active, percent, minimum)
    assert retry_allowed(limit, active, percent, minimum) is False


def cluster(**retries) -> Cluster:
    ep = Endpoint("e:1", "127.0.0.1", 1)
    return Cluster("s", None, "http", ClusterSettings(retries=RetrySettings(**retries), max_pending=1000), (ep,))


def test_cluster_budget_follows_requests_in_flight() -> None:
    c = cluster()
    for _ in range(3):
        assert c.retry_allowed()
        c.retry_begin()
    assert not c.retry_allowed()  # 3 in flight with no load: the minimum
    for _ in range(25):
        assert c.try_acquire_pending()
    assert c.retry_allowed()  # 20 % of 25 = 5
    c.retry_begin()
    c.retry_begin()
    assert not c.retry_allowed()
    c.retry_end()
    assert c.retry_allowed()
    assert c.retries_in_flight == 4


def test_cluster_budget_counts_attempts_in_flight_too() -> None:
    c = cluster(min_concurrent=0)
    ep = c.endpoints[0]
    assert not c.retry_allowed()
    for _ in range(10):
        c.begin(ep)
    assert c.retry_allowed()  # 20 % of 10 attempts = 2
    c.retry_begin()
    c.retry_begin()
    assert not c.retry_allowed()


def test_counters_never_go_negative() -> None:
    c = cluster()
    c.retry_end()
    c.release_pending()
    ep = c.endpoints[0]
    c.end(ep, status=200, failure=None, latency=0.001)
    assert (c.retries_in_flight, c.pending, ep.active) == (0, 0, 0)


def test_pending_cap_opens_the_breaker_and_closes_it_again() -> None:
    c = Cluster("s", None, "http", ClusterSettings(max_pending=2), ())
    assert c.try_acquire_pending() and c.try_acquire_pending()
    assert not c.try_acquire_pending()  # 503: breaker open
    c.release_pending()
    assert c.try_acquire_pending()


def test_pending_cap_zero_means_no_limit() -> None:
    c = Cluster("s", None, "http", ClusterSettings(max_pending=0), ())
    assert all(c.try_acquire_pending() for _ in range(5000))


def test_default_pending_cap_is_envoys_1024() -> None:
    c = Cluster("s", None, "http", ClusterSettings(), ())
    assert sum(c.try_acquire_pending() for _ in range(1100)) == 1024


def test_budget_and_cap_are_shared_across_rebuilds() -> None:
    def view(n: int) -> View:
        return View(services={"s": ServiceView("s", tuple(
            Instance(f"i{k}", "s", "n1", "127.0.0.1", 8000 + k, ports={}) for k in range(n)),
            spec=config.ServiceSpec.from_dict({"name": "s", "command": ["s"],
                                               "ports": [{"name": "http", "port": 0, "protocol": "http"}],
                                               "routes": {"max_pending": 3}}))})

    t1 = build_table(view(1))
    c1 = t1.cluster("s")
    for _ in range(3):
        c1.retry_begin()
        assert c1.try_acquire_pending()
    t2 = build_table(view(2), previous=t1)
    c2 = t2.cluster("s")
    assert c2 is not c1
    assert not c2.try_acquire_pending()
    assert not c2.retry_allowed()
    c1.release_pending()
    c1.retry_end()
    assert c2.try_acquire_pending()
    assert c2.retry_allowed()
