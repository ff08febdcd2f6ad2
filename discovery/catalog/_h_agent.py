"""``/v1/agent/*`` handlers (agent/agent_endpoint.go)."""

from __future__ import annotations

import time

from aiohttp import web

from ._http import Req, Router

__all__ = ["register"]


async def agent_metrics(req: Req) -> web.StreamResponse:
    """Consul's metrics JSON shape; our gauges describe the catalog itself.

    ``meshlet.catalog.blocked_queries`` (blocking queries waiting now) and
    ``meshlet.catalog.watch_wakeups`` (wake-ups delivered since start) let tests and
    operators see that a write woke exactly the watchers it should.
    """
    server = req.server
    st = server.state
    gauges = {
        "meshlet.catalog.index": server.store.index,
        "meshlet.catalog.blocked_queries": server.hub.blocked,
        "meshlet.catalog.watch_wakeups": server.hub.wakeups,
        "meshlet.catalog.kv_entries": len(st.kv),
        "meshlet.catalog.services": len(st.services),
        "meshlet.catalog.checks": len(st.checks),
        "meshlet.catalog.sessions": len(st.sessions),
    }
    body = {
        "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime()),
        "Gauges": [{"Name": k, "Value": v, "Labels": {}} for k, v in gauges.items()],
        "Points": [],
        "Counters": [],
        "Samples": [],
    }
    return req.json(body)


def register(router: Router) -> None:
    router.add("/v1/agent/metrics", {"GET": agent_metrics}, check_dc=False)
