"""The proxy's Prometheus metrics.

Updates on the hot path are plain dict and int operations (no locks: one event loop
per worker); all formatting happens in :meth:`Metrics.render`, on scrape. Names follow
Envoy and Traefik (``requests_total`` by service and code, a duration histogram,
``retries_total``, ejections, and gauges).

Exposition: Prometheus text format 0.0.4
(``Content-Type: text/plain; version=0.0.4; charset=utf-8``).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from ._routes import RouteTable

__all__ = ["Metrics", "Gauge", "BUCKETS", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Prometheus' defaults (5 ms … 10 s) plus finer steps below, where a proxy
# hop to a fast backend lands, and 30 s for long requests.
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Gauge:
    """A value that goes up and down: ``metrics.active_requests.inc()`` / ``.dec()``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v


class _Histogram:
    """One service's requests: the duration histogram and the count by status code."""

    __slots__ = ("counts", "sum", "codes")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)  # per bucket, not cumulative; last one is +Inf
        self.sum = 0.0
        self.codes: dict[int, int] = {}

    @property
    def count(self) -> int:
        return sum(self.counts)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if isinstance(v, int) or v.is_integer():
        return str(int(v))
    return repr(v)


class Metrics:
    """Counters and gauges of one proxy process.

    ``table`` (or ``get_table``): where ``meshlet_proxy_endpoints_ejected`` is read at
    scrape time; ejections expire with time, so the gauge is computed, not kept.
    """

    def __init__(self, *, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.durations: dict[str, _Histogram] = {}   # by service (requests_total: its codes)
        self.retries: dict[str, int] = {}
        self.ejections: dict[str, int] = {}
        self.upstream_connections = Gauge()
        self.active_requests = Gauge()
        # TLS files (proxy._tls): reloads by (kind, name, result), and 1 while the files on
        # disk cannot be loaded (the certificates loaded before still serve)
        self.tls_reloads: dict[tuple[str, str, str], int] = {}
        self.tls_files_invalid: dict[tuple[str, str], int] = {}
        self.get_table: Callable[[], RouteTable | None] | None = None
        self.ejected: dict[str, int] | None = None   # set by add(): the workers' ejections
        # Is the catalog answering the route watches (read on scrape)? While not, the
        # routes are the last known ones. add() keeps the workers' lowest.
        self.catalog_up: Callable[[], bool] | None = None
        self.catalog_up_value: int | None = None

    # -- hot path -------------------------------------------------------------------

    def request_done(self, service: str, code: int, latency: float) -> None:
        h = self.durations.get(service)
        if h is None:
            h = self.durations[service] = _Histogram(len(self.buckets))
        codes = h.codes
        codes[code] = codes.get(code, 0) + 1
        h.counts[bisect_left(self.buckets, latency)] += 1
        h.sum += latency

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """Requests answered by (service, status code)."""
        return {(svc, code): n for svc, h in self.durations.items() for code, n in h.codes.items()}

    def retry(self, service: str) -> None:
        self.retries[service] = self.retries.get(service, 0) + 1

    def ejection(self, service: str) -> None:
        self.ejections[service] = self.ejections.get(service, 0) + 1

    # -- workers --------------------------------------------------------------------

    def snapshot(self, table: RouteTable | None = None) -> dict[str, Any]:
        """This process's values as JSON-able data (``--workers``: the parent adds every
        worker's into one Metrics and renders that)."""
        if table is None and self.get_table is not None:
            table = self.get_table()
        return {"buckets": list(self.buckets),
                "requests": [[svc, code, n] for (svc, code), n in self.requests.items()],
                "durations": {svc: {"counts": h.counts, "sum": h.sum, "count": h.count}
                              for svc, h in self.durations.items()},
                "retries": self.retries, "ejections": self.ejections,
                "ejected": table.ejected_by_service() if table is not None else {},
                "upstream_connections": self.upstream_connections.value,
                "active_requests": self.active_requests.value,
                "tls_reloads": [[*k, n] for k, n in self.tls_reloads.items()],
                "tls_files_invalid": [[*k, n] for k, n in self.tls_files_invalid.items()],
                "catalog_up": self._catalog_up()}

    def _catalog_up(self) -> int | None:
        if self.catalog_up_value is not None:
            return self.catalog_up_value
        return None if self.catalog_up is None else int(bool(self.catalog_up()))

    def add(self, snap: dict[str, Any]) -> None:
        """Add another process's ``snapshot()``: counters, histograms and the two gauges
        sum; ``ejected`` keeps the most of any process (each worker ejects on its own, so
        a sum would count one endpoint once per worker). ValueError if it does not fit."""
        if tuple(snap["buckets"]) != self.buckets:
            raise ValueError(f"histogram buckets differ: {snap['buckets']} vs {list(self.buckets)}")
        for svc, d in snap["durations"].items():   # checked before anything is added
            if len(d["counts"]) != len(self.buckets) + 1:
                raise ValueError(f"histogram of {svc}: {len(d['counts'])} counts, expected {len(self.buckets) + 1}")
        for svc, d in snap["durations"].items():
            h = self.durations.get(svc)
            if h is None:
                h = self.durations[svc] = _Histogram(len(self.buckets))
            h.counts = [a + b for a, b in zip(h.counts, d["counts"])]
            h.sum += d["sum"]
        for svc, code, n in snap["requests"]:
            h = self.durations.get(svc)
            if h is None:
                h = self.durations[svc] = _Histogram(len(self.buckets))
            h.codes[code] = h.codes.get(code, 0) + n
        for mine, theirs in ((self.retries, snap["retries"]), (self.ejections, snap["ejections"])):
            for svc, n in theirs.items():
                mine[svc] = mine.get(svc, 0) + n
        ejected = self.ejected if self.ejected is not None else {}
        for svc, n in snap["ejected"].items():
            ejected[svc] = max(ejected.get(svc, 0), n)
        self.ejected = ejected
        self.upstream_connections.value += snap["upstream_connections"]
        self.active_requests.value += snap["active_requests"]
        for kind, name, result, n in snap.get("tls_reloads", ()):
            key = (kind, name, result)
            self.tls_reloads[key] = self.tls_reloads.get(key, 0) + n
        for kind, name, n in snap.get("tls_files_invalid", ()):   # invalid in any worker
            self.tls_files_invalid[(kind, name)] = max(self.tls_files_invalid.get((kind, name), 0), n)
        if snap.get("catalog_up") is not None:
            mine = self.catalog_up_value
            self.catalog_up_value = snap["catalog_up"] if mine is None else min(mine, snap["catalog_up"])

    # -- scrape ---------------------------------------------------------------------

    def render(self, table: RouteTable | None = None) -> bytes:
        if table is None and self.get_table is not None:
            table = self.get_table()
        ejected = self.ejected if self.ejected is not None else (
            table.ejected_by_service() if table is not None else None)
        out: list[str] = []
        add = out.append

        add("# HELP meshlet_proxy_requests_total Requests answered, by service and status code.")
        add("# TYPE meshlet_proxy_requests_total counter")
        for (svc, code), n in sorted(self.requests.items()):
            add(f'meshlet_proxy_requests_total{{service="{_escape(svc)}",code="{code}"}} {n}')

        add("# HELP meshlet_proxy_request_duration_seconds Time from request to the end of the response.")
        add("# TYPE meshlet_proxy_request_duration_seconds histogram")
        les = {le: repr(float(le)) for le in self.buckets}  # "1.0", as Prometheus' own client
        for svc, h in sorted(self.durations.items()):
            s = _escape(svc)
            acc = 0
            for le, c in zip(self.buckets, h.counts):
                acc += c
                add(f'meshlet_proxy_request_duration_seconds_bucket{{service="{s}",le="{les[le]}"}} {acc}')
            add(f'meshlet_proxy_request_duration_seconds_bucket{{service="{s}",le="+Inf"}} {h.count}')
            add(f'meshlet_proxy_request_duration_seconds_sum{{service="{s}"}} {_num(h.sum)}')
            add(f'meshlet_proxy_request_duration_seconds_count{{service="{s}"}} {h.count}')

        add("# HELP meshlet_proxy_retries_total Retries sent to another endpoint.")
        add("# TYPE meshlet_proxy_retries_total counter")
        for svc, n in sorted(self.retries.items()):
            add(f'meshlet_proxy_retries_total{{service="{_escape(svc)}"}} {n}')

        add("# HELP meshlet_proxy_ejections_total Endpoints ejected by outlier detection.")
        add("# TYPE meshlet_proxy_ejections_total counter")
        for svc, n in sorted(self.ejections.items()):
            add(f'meshlet_proxy_ejections_total{{service="{_escape(svc)}"}} {n}')

        add("# HELP meshlet_proxy_endpoints_ejected Endpoints ejected now, by service.")
        add("# TYPE meshlet_proxy_endpoints_ejected gauge")
        if ejected is not None:
            for svc, n in sorted(ejected.items()):
                add(f'meshlet_proxy_endpoints_ejected{{service="{_escape(svc)}"}} {n}')

        add("# HELP meshlet_proxy_upstream_connections Open connections to upstream endpoints.")
        add("# TYPE meshlet_proxy_upstream_connections gauge")
        add(f"meshlet_proxy_upstream_connections {self.upstream_connections.value}")
        add("# HELP meshlet_proxy_active_requests Requests in flight.")
        add("# TYPE meshlet_proxy_active_requests gauge")
        add(f"meshlet_proxy_active_requests {self.active_requests.value}")
        if self.tls_files_invalid or self.tls_reloads:
            add("# HELP meshlet_proxy_tls_reloads_total Reloads of TLS files after they changed, by result.")
            add("# TYPE meshlet_proxy_tls_reloads_total counter")
            for (kind, name, result), n in sorted(self.tls_reloads.items()):
                add(f'meshlet_proxy_tls_reloads_total{{kind="{kind}",name="{_escape(name)}",result="{result}"}} {n}')
            add("# HELP meshlet_proxy_tls_files_invalid 1 while TLS files on disk cannot be loaded "
                "(the ones loaded before still serve).")
            add("# TYPE meshlet_proxy_tls_files_invalid gauge")
            for (kind, name), n in sorted(self.tls_files_invalid.items()):
                add(f'meshlet_proxy_tls_files_invalid{{kind="{kind}",name="{_escape(name)}"}} {n}')
        up = self._catalog_up()
        if up is not None:
            add("# HELP meshlet_proxy_catalog_up Whether the catalog answers the route watches (0: routing from "
                "the last known state).")
            add("# TYPE meshlet_proxy_catalog_up gauge")
            add(f"meshlet_proxy_catalog_up {up}")
        add("")
        return "\n".join(out).encode()
