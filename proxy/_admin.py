"""The proxy's admin listener (control plane, aiohttp): ``/metrics``, ``/routes``, ``/ready``.

- ``GET /metrics``: Prometheus text format 0.0.4 (see :mod:`proxy._metrics`).
- ``GET /routes``: the live route table as JSON (``RouteTable.to_json()``), or
  ``{"loaded": false}`` with 503 before the first table. ``draining``: the endpoints that
  left the table (deregistered, not passing) with requests of this process still in
  flight on them, ``[{"service", "id", "instance", "address", "port", "active"}]``: a
  rollout can wait for its retired replica to be absent here before SIGTERM.
- ``GET /ready``: 200 ``ready`` once the first table is loaded and the proxy is not
  draining (``is_ready()``), else 503 with the reason.

Errors: nothing here raises to a client; an exception in a handler is logged and
answered 500 with a one-line body (no traceback).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from ._metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:  # pragma: no cover
    from ._routes import RouteTable

__all__ = ["start_admin", "make_app"]

log = logging.getLogger("meshlet.proxy.admin")


def make_app(*, get_table: Callable[[], RouteTable | None], metrics: Metrics,
             is_ready: Callable[[], bool], get_draining: Callable[[], list] | None = None) -> web.Application:
    if metrics.get_table is None:
        metrics.get_table = get_table

    @web.middleware
    async def no_tracebacks(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("admin %s %s failed", request.method, request.path)
            return web.Response(status=500, text="internal error\n")

    async def metrics_handler(request: web.Request) -> web.Response:
        body = metrics.render(get_table())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def routes_handler(request: web.Request) -> web.Response:
        table = get_table()
        if table is None:
            return web.json_response({"loaded": False}, status=503)
        doc = table.to_json()
        doc["loaded"] = True
        doc["draining"] = get_draining() if get_draining is not None else []
        return web.Response(text=json.dumps(doc, indent=1, sort_keys=False) + "\n",
                            content_type="application/json")

    async def ready_handler(request: web.Request) -> web.Response:
        if get_table() is None:
            return web.Response(status=503, text="not ready: no route table loaded yet\n")
        if not is_ready():
            return web.Response(status=503, text="not ready: draining\n")
        return web.Response(text="ready\n")

    app = web.Application(middlewares=[no_tracebacks])
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/routes", routes_handler)
    app.router.add_get("/ready", ready_handler)
    return app


async def start_admin(host: str, port: int, *, get_table: Callable[[], RouteTable | None], metrics: Metrics,
                      is_ready: Callable[[], bool],
                      get_draining: Callable[[], list] | None = None) -> tuple[web.AppRunner, int]:
    """Serve the admin API on ``host:port`` (0: any free port). Returns the runner
    (``await runner.cleanup()`` stops it) and the bound port."""
    app = make_app(get_table=get_table, metrics=metrics, is_ready=is_ready, get_draining=get_draining)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port  # the real port when 0 was asked
    return runner, bound
