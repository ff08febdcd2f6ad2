"""``--metrics HOST:PORT``: the DNS server's Prometheus ``/metrics`` and ``/ready``.

Counting stays off the answering path's costs: the listeners add to plain ints
(``Counters``: one add per UDP batch, one per TCP message), the engine counts the answers
it builds on a cache miss by query type and rcode (``Engine.answers``: already the slow
path), and everything is formatted on scrape. A cache hit is a query that needed no build:
received minus built, minus the ones dropped as malformed.

- ``GET /metrics``: Prometheus text format 0.0.4:
  ``meshlet_dns_queries_total{transport}`` (received), ``meshlet_dns_cache_hits_total``,
  ``meshlet_dns_answers_built_total{qtype,rcode}`` (answers built on a miss; hits repeat
  them), ``meshlet_dns_forwarded_total``, ``meshlet_dns_zone_build_seconds`` (histogram,
  from the zone builder), ``meshlet_dns_zone_index``, ``meshlet_dns_catalog_up``.
- ``GET /ready``: 200 while a zone is served (from the last known state when the catalog
  is down: the answer says so); ``?format=json`` gives ``{"ready", "zone_index",
  "catalog": {"reachable", "unreachable_since", "last_error", "url"}}``.

Control plane only (aiohttp), on its own listener.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["Counters", "start_metrics", "render", "BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Zone builds take ~1 ms for a few services and grow with the fleet.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Counters:
    """Plain ints the listeners add to (one event loop: no locks)."""

    __slots__ = ("udp", "tcp", "forwarded", "build_counts", "build_sum", "build_count")

    def __init__(self) -> None:
        self.udp = 0
        self.tcp = 0
        self.forwarded = 0
        self.build_counts = [0] * (len(BUCKETS) + 1)
        self.build_sum = 0.0
        self.build_count = 0

    def built(self, seconds: float) -> None:
        self.build_counts[bisect_left(BUCKETS, seconds)] += 1
        self.build_sum += seconds
        self.build_count += 1


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(counters: Counters, engine: Any, catalog: dict[str, Any]) -> bytes:
    from dnslib import QTYPE, RCODE

    out: list[str] = []
    add = out.append
    built = sum(engine.answers.values())
    received = counters.udp + counters.tcp
    add("# HELP meshlet_dns_queries_total DNS messages received, by transport.")
    add("# TYPE meshlet_dns_queries_total counter")
    add(f'meshlet_dns_queries_total{{transport="udp"}} {counters.udp}')
    add(f'meshlet_dns_queries_total{{transport="tcp"}} {counters.tcp}')
    add("# HELP meshlet_dns_cache_hits_total Queries answered from the pre-encoded answers.")
    add("# TYPE meshlet_dns_cache_hits_total counter")
    add(f"meshlet_dns_cache_hits_total {max(0, received - built - engine.dropped)}")
    add("# HELP meshlet_dns_answers_built_total Answers built on a cache miss, by query type and rcode.")
    add("# TYPE meshlet_dns_answers_built_total counter")
    for (qtype, rcode), n in sorted(engine.answers.items()):
        add(f'meshlet_dns_answers_built_total{{qtype="{QTYPE.get(qtype, str(qtype))}",'
            f'rcode="{RCODE.get(rcode, str(rcode))}"}} {n}')
    add("# HELP meshlet_dns_forwarded_total Queries sent on to the recursors.")
    add("# TYPE meshlet_dns_forwarded_total counter")
    add(f"meshlet_dns_forwarded_total {counters.forwarded}")
    add("# HELP meshlet_dns_zone_build_seconds Time to build a zone from a catalog view (zone builder).")
    add("# TYPE meshlet_dns_zone_build_seconds histogram")
    acc = 0
    for le, c in zip(BUCKETS, counters.build_counts):
        acc += c
        add(f'meshlet_dns_zone_build_seconds_bucket{{le="{float(le)!r}"}} {acc}')
    add(f'meshlet_dns_zone_build_seconds_bucket{{le="+Inf"}} {counters.build_count}')
    add(f"meshlet_dns_zone_build_seconds_sum {_num(counters.build_sum)}")
    add(f"meshlet_dns_zone_build_seconds_count {counters.build_count}")
    add("# HELP meshlet_dns_zone_index The catalog view the served zone was built from.")
    add("# TYPE meshlet_dns_zone_index gauge")
    add(f"meshlet_dns_zone_index {engine.zone.index}")
    add("# HELP meshlet_dns_catalog_up Whether the catalog answers the zone's watches (0: answering from "
        "the last known state).")
    add("# TYPE meshlet_dns_catalog_up gauge")
    add(f"meshlet_dns_catalog_up {int(bool(catalog.get('reachable', True)))}")
    add("")
    return "\n".join(out).encode()


async def start_metrics(host: str, port: int, *, counters: Counters, engine: Any,
                        catalog: Callable[[], dict[str, Any]]) -> tuple[web.AppRunner, str]:
    """Serve /metrics and /ready on ``host:port`` (0: a free port). Returns the runner
    (``await runner.cleanup()`` stops it) and the bound ``host:port``."""
    from aiohttp import web     # here: the answering path never needs it

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(counters, engine, catalog()), headers={"Content-Type": CONTENT_TYPE})

    async def ready(request: web.Request) -> web.Response:
        state = catalog()
        if request.query.get("format") == "json" or "application/json" in request.headers.get("Accept", ""):
            return web.json_response({"ready": True, "zone_index": engine.zone.index, "catalog": state})
        text = "ready"
        if not state.get("reachable", True):
            text += "; catalog unreachable, answering from the last known state"
        return web.Response(text=text + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return runner, f"{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"[{bound[0]}]:{bound[1]}"
