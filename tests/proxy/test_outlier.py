"""Outlier detection (Envoy semantics) driven through Cluster.end with a fake clock:
ejection, return, growing ejection time, the max-ejection cap, and panic mode."""

from __future__ import annotations

import random

import pytest

from discovery.view import Instance, ServiceView, View
from proxy import _outlier
from proxy._metrics import Metrics
from proxy._outlier import OutlierSettings
from proxy._routes import Cluster, ClusterSettings, Endpoint, build_table


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(n: int, clock: FakeClock, *, metrics: Metrics | None = None, **outlier) -> tuple[Cluster, list[Endpoint]]:
    endpoints = [Endpoint(f"e{i}:80", "127.0.0.1", 8000 + i) for i in range(n)]
    c = Cluster("svc", "http", "http", ClusterSettings(outlier=OutlierSettings(**outlier)), tuple(endpoints),
                clock=clock, rng=random.Random(7), metrics=metrics)
    return c, endpoints


def fail(c: Cluster, ep: Endpoint, times: int = 5, *, status: int | None = 503, failure: str | None = None) -> None:
    for _ in range(times):
        c.begin(ep)
        c.end(ep, status=status, failure=failure, latency=0.01)


def picked(c: Cluster, n: int = 200) -> set[str]:
    return {c.pick().id for _ in range(n)}


@pytest.mark.parametrize("outcomes, ejected", [
    pytest.param([(500, None)] * 5, True, id="5-consecutive-5xx"),
    pytest.param([(500, None)] * 4, False, id="4-is-not-enough"),
    pytest.param([(500, None)] * 4 + [(200, None)] + [(500, None)] * 4, False, id="success-resets"),
    pytest.param([(404, None)] * 20, False, id="4xx-is-not-a-failure"),
    pytest.param([(None, "connect")] * 5, True, id="connect-failures"),
    pytest.param([(None, "reset")] * 2 + [(None, "timeout")] * 3, True, id="resets-and-timeouts"),
    pytest.param([(502, None), (None, "connect"), (504, None), (503, None), (502, None)], True, id="gateway-mix"),
    pytest.param([(None, None)] * 10, False, id="client-went-away-teaches-nothing"),
])
def test_when_an_endpoint_is_ejected(outcomes, ejected: bool) -> None:
    clock = FakeClock()
    c, (a, b, *_) = make(10, clock)
    for status, failure in outcomes:
        c.begin(a)
        c.end(a, status=status, failure=failure, latency=0.01)
    assert _outlier.is_ejected(a, clock.t) is ejected
    assert a.active == 0


def test_gateway_detector_alone() -> None:
    clock = FakeClock()
    c, (a, *_) = make(10, clock, consecutive_5xx=0)
    fail(c, a, 4, status=502)
    fail(c, a, 1, status=500)  # a 500 is not a gateway failure: resets that streak
    fail(c, a, 4, status=502)
    assert not _outlier.is_ejected(a, clock.t)
    fail(c, a, 1, status=504)
    assert _outlier.is_ejected(a, clock.t)


def test_disabled_detectors_never_eject() -> None:
    clock = FakeClock()
    c, (a, *_) = make(10, clock, consecutive_5xx=0, consecutive_gateway_failure=0)
    fail(c, a, 50, failure="connect")
    assert not _outlier.is_ejected(a, clock.t)


def test_ejected_endpoint_gets_no_traffic_and_returns_after_its_time() -> None:
    clock = FakeClock()
    metrics = Metrics()
    c, endpoints = make(10, clock, metrics=metrics)
    a = endpoints[0]
    fail(c, a)
    assert a.id not in picked(c, 500)
    assert c.ejected_count() == 1 and metrics.ejections == {"svc": 1}
    assert c.to_json()["endpoints"][0]["ejected"] is True
    clock.t += 29.9
    assert a.id not in picked(c, 500)
    clock.t += 0.1
    assert a.id in picked(c, 500)
    assert c.ejected_count() == 0


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    clock = FakeClock()
    c, (a, *_) = make(10, clock)
    durations = []
    for _ in range(12):
        fail(c, a)
        durations.append(round(a.ejected_until - clock.t))
        clock.t = a.ejected_until  # returns exactly then, and fails again at once
        c.pick()
    assert durations == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]


def test_time_in_service_lowers_the_next_ejection_time() -> None:
    clock = FakeClock()
    c, (a, *_) = make(10, clock)
    for _ in range(3):
        fail(c, a)
        clock.t = a.ejected_until
        c.pick()
    assert a.times_ejected == 3
    clock.t += 20  # two intervals (10 s) healthy: the multiplier drops from 3 to 1
    fail(c, a)
    assert a.ejected_until - clock.t == pytest.approx(60)


@pytest.mark.parametrize("n, max_percent, failing, expected", [
    pytest.param(10, 10, 3, 1, id="10pct-of-10"),
    pytest.param(20, 10, 5, 2, id="10pct-of-20"),
    pytest.param(3, 10, 3, 1, id="at-least-one-host"),
    pytest.param(4, 50, 4, 2, id="half"),
    pytest.param(3, 100, 3, 3, id="all-allowed"),
    pytest.param(5, 0, 2, 1, id="zero-percent-still-one"),
])
def test_max_ejection_percent(n: int, max_percent: float, failing: int, expected: int) -> None:
    clock = FakeClock()
    c, endpoints = make(n, clock, max_ejection_percent=max_percent)
    for ep in endpoints[:failing]:
        fail(c, ep)
    assert c.ejected_count() == expected


def test_a_host_refused_by_the_cap_is_ejected_later_when_room_frees_up() -> None:
    clock = FakeClock()
    c, (a, b, *_) = make(10, clock)
    fail(c, a)
    fail(c, b)
    assert not _outlier.is_ejected(b, clock.t)
    clock.t += 30  # a returns
    fail(c, b)  # a new streak of 5
    assert _outlier.is_ejected(b, clock.t)


@pytest.mark.parametrize("n, ejected, panic", [
    pytest.param(2, 1, False, id="1-of-2-healthy-is-50pct"),
    pytest.param(3, 2, True, id="1-of-3-healthy"),
    pytest.param(1, 1, True, id="single-host"),
    pytest.param(4, 2, False, id="2-of-4-healthy"),
])
def test_panic_mode_balances_over_all_endpoints(n: int, ejected: int, panic: bool) -> None:
    clock = FakeClock()
    c, endpoints = make(n, clock, max_ejection_percent=100)
    for ep in endpoints[:ejected]:
        fail(c, ep)
    assert c.ejected_count() == ejected
    got = picked(c, 400)
    assert c.panic is panic
    if panic:
        assert got == {e.id for e in endpoints}
    else:
        assert got == {e.id for e in endpoints[ejected:]}


def test_ejection_survives_a_table_rebuild() -> None:
    clock = FakeClock()

    def view(*ids: str) -> View:
        return View(services={"s": ServiceView("s", tuple(
            Instance(i, "s", "n1", "127.0.0.1", 8000 + k, ports={}) for k, i in enumerate(ids)))})

    t1 = build_table(view("a", "b", "c"), clock=clock, rng=random.Random(1))
    c1 = t1.cluster("s")
    a = c1.endpoints[0]
    fail(c1, a)
    t2 = build_table(view("a", "b", "c", "d"), previous=t1)
    c2 = t2.cluster("s")
    assert c2.endpoints[0] is a
    assert a.id not in picked(c2, 500)
    assert t2.ejected_by_service() == {"s": 1}
    clock.t += 30
    assert a.id in picked(c2, 500)


def test_an_ejection_through_an_old_snapshot_is_seen_by_the_new_one() -> None:
    clock = FakeClock()
    view = View(services={"s": ServiceView("s", tuple(
        Instance(i, "s", "n1", "127.0.0.1", 8000 + k, ports={}, weight=1 + k) for k, i in enumerate("abcd")))})
    t1 = build_table(view, clock=clock, rng=random.Random(1))
    view2 = View(services={"s": ServiceView("s", tuple(
        Instance(i, "s", "n1", "127.0.0.1", 8000 + k, ports={}) for k, i in enumerate("abcd")))})
    t2 = build_table(view2, previous=t1)
    assert t2.cluster("s") is not t1.cluster("s")
    t2.cluster("s").pick()
    a = t1.cluster("s").endpoints[0]
    fail(t1.cluster("s"), a)  # a request that began before the rebuild fails late
    assert a.id not in picked(t2.cluster("s"), 500)


def test_rtt_is_learnt_from_responses_and_timeouts_only() -> None:
    clock = FakeClock()
    c, (a, *_) = make(2, clock)
    c.begin(a)
    c.end(a, status=None, failure="connect", latency=0.0001)
    assert a.rtt == 0.030  # a fast failure must not make the endpoint look fast
    c.begin(a)
    c.end(a, status=None, failure="timeout", latency=2.0)
    assert a.rtt == 2.0
