"""The catalog's Prometheus /metrics, parsed with the Prometheus project's own parser:
each series moves when what it counts happens."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _util import wait_for

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def scrape(catalog, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    r = catalog.http.get(catalog.url + path, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_requests_writes_and_kv_size_move(catalog) -> None:
    before = scrape(catalog)
    c = catalog.client()
    assert c.kv.put("a/key", "x" * 100) is True
    c.kv.get("a/key")
    catalog.http.get(catalog.url + "/v1/kv/a/key", headers={"X-Consul-Token": None})   # refused: 403
    after = scrape(catalog)
    req = "meshlet_catalog_http_requests_total"
    assert value(after, req, endpoint="/v1/kv/", method="PUT", code="200") \
        - value(before, req, endpoint="/v1/kv/", method="PUT", code="200") == 1
    assert value(after, req, endpoint="/v1/kv/", method="GET", code="200") \
        - value(before, req, endpoint="/v1/kv/", method="GET", code="200") == 1
    assert value(after, req, endpoint="/v1/kv/", method="GET", code="403") == 1
    writes = "meshlet_catalog_write_duration_seconds_count"
    assert value(after, writes) >= value(before, writes) + 1
    assert value(after, "meshlet_catalog_write_duration_seconds_sum") > 0
    assert value(after, "meshlet_catalog_kv_entries") == value(before, "meshlet_catalog_kv_entries") + 1
    assert value(after, "meshlet_catalog_kv_bytes") - value(before, "meshlet_catalog_kv_bytes") == len("a/key") + 100
    # Consul's path for the same text
    assert value(scrape(catalog, "/v1/agent/metrics?format=prometheus"), "meshlet_catalog_kv_entries") >= 1


def test_blocking_queries_open_is_a_gauge(catalog) -> None:
    c = catalog.client()
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    done = threading.Event()
    threading.Thread(target=lambda: (c.kv.get("k", index=index, wait="30s"), done.set()), daemon=True).start()
    wait_for(lambda: value(scrape(catalog), "meshlet_catalog_blocking_queries") == 1, what="one query parked")
    catalog.client().kv.put("k", "w")
    assert done.wait(10)
    wait_for(lambda: value(scrape(catalog), "meshlet_catalog_blocking_queries") == 0, what="none parked")


def test_metrics_need_the_token(catalog) -> None:
    r = catalog.http.get(catalog.url + "/metrics", headers={"X-Consul-Token": None})
    assert r.status_code == 403
