"""The catalog's Prometheus metrics: ``GET /metrics`` (and Consul's
``/v1/agent/metrics?format=prometheus``), text format 0.0.4, the management token needed
as for every other read (Prometheus: ``authorization: {credentials_file: ...}``).

- ``meshlet_catalog_http_requests_total{endpoint,method,code}``: ``endpoint`` is the route
  (``/v1/kv/``, ``/v1/health/service/``: never a key or a name, so the label stays small;
  ``other`` for paths no route serves); a blocking read is counted when it is taken, as 200.
- ``meshlet_catalog_blocking_queries``: blocking queries parked now.
- ``meshlet_catalog_write_duration_seconds``: histogram, one observation per committed
  batch of writes (taken -> durable, the fsync included).
- ``meshlet_catalog_kv_entries``, ``meshlet_catalog_kv_bytes`` (keys and values),
  ``meshlet_catalog_index``, ``meshlet_catalog_services``, ``meshlet_catalog_watch_wakeups_total``.

Counting is a dict add per request and a list add per commit; formatting is on scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._server import CatalogServer

__all__ = ["Stats", "render", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A batch commit is one fsync: ~1 ms on a fast disk, tens of ms on a slow one.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Stats:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.write_counts = [0] * (len(BUCKETS) + 1)
        self.write_sum = 0.0
        self.write_count = 0

    def request(self, endpoint: str, method: str, code: int) -> None:
        key = (endpoint, method, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def wrote(self, seconds: float) -> None:
        self.write_counts[bisect_left(BUCKETS, seconds)] += 1
        self.write_sum += seconds
        self.write_count += 1


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(server: "CatalogServer") -> bytes:
    stats: Stats = server.stats
    st = server.state
    out: list[str] = []
    add = out.append
    add("# HELP meshlet_catalog_http_requests_total HTTP requests, by route, method and status code.")
    add("# TYPE meshlet_catalog_http_requests_total counter")
    for (endpoint, method, code), n in sorted(stats.requests.items()):
        add(f'meshlet_catalog_http_requests_total{{endpoint="{_escape(endpoint)}",method="{method}",code="{code}"}} {n}')
    add("# HELP meshlet_catalog_blocking_queries Blocking queries waiting now.")
    add("# TYPE meshlet_catalog_blocking_queries gauge")
    add(f"meshlet_catalog_blocking_queries {server.hub.blocked}")
    add("# HELP meshlet_catalog_watch_wakeups_total Blocking queries answered after a write woke them.")
    add("# TYPE meshlet_catalog_watch_wakeups_total counter")
    add(f"meshlet_catalog_watch_wakeups_total {server.hub.wakeups}")
    add("# HELP meshlet_catalog_write_duration_seconds Committed write batches, from taken to durable.")
    add("# TYPE meshlet_catalog_write_duration_seconds histogram")
    acc = 0
    for le, c in zip(BUCKETS, stats.write_counts):
        acc += c
        add(f'meshlet_catalog_write_duration_seconds_bucket{{le="{float(le)!r}"}} {acc}')
    add(f'meshlet_catalog_write_duration_seconds_bucket{{le="+Inf"}} {stats.write_count}')
    add(f"meshlet_catalog_write_duration_seconds_sum {stats.write_sum!r}")
    add(f"meshlet_catalog_write_duration_seconds_count {stats.write_count}")
    kv_bytes = sum(len(k) + len(row.get("Value") or b"") for k, row in st.kv.rows.items())
    for name, kind, value, text in (
        ("kv_entries", "gauge", len(st.kv), "KV keys."),
        ("kv_bytes", "gauge", kv_bytes, "KV keys and values, in bytes."),
        ("services", "gauge", len(st.services), "Registered service instances."),
        ("index", "gauge", server.store.index, "The catalog's raft-style index (Consul's X-Consul-Index)."),
    ):
        add(f"# HELP meshlet_catalog_{name} {text}")
        add(f"# TYPE meshlet_catalog_{name} {kind}")
        add(f"meshlet_catalog_{name} {value}")
    add("")
    return "\n".join(out).encode()
