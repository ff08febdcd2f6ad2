"""Metrics rendering, parsed back with the Prometheus project's own text-format parser."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery.view import Instance, ServiceView, View
from proxy._metrics import BUCKETS, Metrics
from proxy._routes import build_table


def parse(m: Metrics, table=None) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items -> value} for every sample."""
    out: dict[str, dict[tuple, float]] = {}
    text = m.render(table).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(m: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}


def test_every_family_is_declared_with_its_type() -> None:
    assert families(Metrics()) == {
        "meshlet_proxy_requests": "counter",
        "meshlet_proxy_request_duration_seconds": "histogram",
        "meshlet_proxy_retries": "counter",
        "meshlet_proxy_ejections": "counter",
        "meshlet_proxy_endpoints_ejected": "gauge",
        "meshlet_proxy_upstream_connections": "gauge",
        "meshlet_proxy_active_requests": "gauge",
    }


def test_requests_by_service_and_code() -> None:
    m = Metrics()
    for code in (200, 200, 502, 200):
        m.request_done("web", code, 0.002)
    m.request_done("api", 503, 0.0)
    got = parse(m)["meshlet_proxy_requests_total"]
    assert got == {
        (("code", "200"), ("service", "web")): 3,
        (("code", "502"), ("service", "web")): 1,
        (("code", "503"), ("service", "api")): 1,
    }


def test_latency_histogram_is_cumulative_with_sum_and_count() -> None:
    m = Metrics()
    latencies = [0.0004, 0.001, 0.003, 0.2, 0.2, 7.0, 45.0]
    for x in latencies:
        m.request_done("web", 200, x)
    samples = parse(m)
    buckets = {float(dict(k)["le"]): v for k, v in samples["meshlet_proxy_request_duration_seconds_bucket"].items()}
    assert sorted(buckets) == sorted([*BUCKETS, float("inf")])
    for le in BUCKETS:
        assert buckets[le] == sum(1 for x in latencies if x <= le), le
    assert buckets[float("inf")] == len(latencies)
    assert samples["meshlet_proxy_request_duration_seconds_count"][(("service", "web"),)] == len(latencies)
    assert samples["meshlet_proxy_request_duration_seconds_sum"][(("service", "web"),)] == pytest.approx(
        sum(latencies))


def test_retries_ejections_and_gauges() -> None:
    m = Metrics()
    m.retry("web")
    m.retry("web")
    m.ejection("api")
    m.upstream_connections.inc()
    m.upstream_connections.inc(3)
    m.upstream_connections.dec()
    m.active_requests.inc()
    s = parse(m)
    assert s["meshlet_proxy_retries_total"] == {(("service", "web"),): 2}
    assert s["meshlet_proxy_ejections_total"] == {(("service", "api"),): 1}
    assert s["meshlet_proxy_upstream_connections"] == {(): 3}
    assert s["meshlet_proxy_active_requests"] == {(): 1}


def test_endpoints_ejected_is_read_from_the_table_at_scrape_time() -> None:
    t = [1000.0]
    view = View(services={"s": ServiceView("s", tuple(
        Instance(f"i{k}", "s", "n1", "127.0.0.1", 8000 + k, ports={}) for k in range(3)))})
    m = Metrics()
    table = build_table(view, clock=lambda: t[0], rng=random.Random(1), metrics=m)
    c = table.cluster("s")
    ep = c.endpoints[0]
    for _ in range(5):
        c.begin(ep)
        c.end(ep, status=None, failure="connect", latency=0.001)
    s = parse(m, table)
    assert s["meshlet_proxy_endpoints_ejected"] == {(("service", "s"),): 1}
    assert s["meshlet_proxy_ejections_total"] == {(("service", "s"),): 1}  # the cluster reported it
    t[0] += 30
    m.get_table = lambda: table
    assert parse(m)["meshlet_proxy_endpoints_ejected"] == {(("service", "s"),): 0}


def test_label_values_are_escaped() -> None:
    m = Metrics()
    odd = 'we"ird\\name\nx'
    m.request_done(odd, 200, 0.01)
    assert parse(m)["meshlet_proxy_requests_total"] == {(("code", "200"), ("service", odd)): 1}


def _serve(m: Metrics, seed: int) -> Metrics:
    """One worker's traffic (the same for the same seed), recorded in ``m``."""
    rng = random.Random(seed)
    for _ in range(200):
        m.request_done(rng.choice(["web", "api"]), rng.choice([200, 200, 503]), rng.uniform(0, 0.05))
    m.retry("web")
    m.ejection("api")
    m.active_requests.inc(2)
    m.upstream_connections.inc(3)
    return m


def test_the_workers_snapshots_add_up_to_one_process_that_served_it_all() -> None:
    """--workers: the parent adds the workers' snapshots (as JSON, as they travel) and
    renders what one process that had served every request would."""
    import json
    a, b = _serve(Metrics(), 1), _serve(Metrics(), 2)
    both = _serve(_serve(Metrics(), 1), 2)
    total = Metrics()
    total.add(json.loads(json.dumps(a.snapshot())))
    total.add(json.loads(json.dumps(b.snapshot())))
    got, want = parse(total), parse(both)
    sums = "meshlet_proxy_request_duration_seconds_sum"
    assert {k: v for k, v in got.items() if k != sums} == {k: v for k, v in want.items() if k != sums}
    assert got[sums] == pytest.approx(want[sums])
    assert got["meshlet_proxy_requests_total"][(("code", "200"), ("service", "web"))] > 0


def test_ejected_endpoints_are_the_most_of_any_worker_and_buckets_must_match() -> None:
    snap = Metrics().snapshot()
    total = Metrics()
    total.add(dict(snap, ejected={"web": 1, "api": 0}))
    total.add(dict(snap, ejected={"web": 1, "api": 2}))    # the same endpoint ejected in both
    assert parse(total)["meshlet_proxy_endpoints_ejected"] == {(("service", "api"),): 2, (("service", "web"),): 1}
    with pytest.raises(ValueError, match="buckets differ"):
        total.add(dict(snap, buckets=[0.1, 1.0]))


def test_draining_lists_merge_by_endpoint() -> None:
    from proxy._admin import merge_draining
    w0 = [{"service": "web", "id": "web-0", "port": 1, "active": 2}, {"service": "api", "id": "api-0", "active": 1}]
    w1 = [{"service": "web", "id": "web-0", "port": 1, "active": 3}]
    assert merge_draining([w0, w1, []]) == [{"service": "web", "id": "web-0", "port": 1, "active": 5},
                                            {"service": "api", "id": "api-0", "active": 1}]
    assert w0[0]["active"] == 2                               # inputs untouched
