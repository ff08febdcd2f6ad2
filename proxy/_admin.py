"""The proxy's admin listener (control plane, aiohttp): ``/metrics``, ``/routes``, ``/ready``, ``/tls``.

- ``GET /metrics``: Prometheus text format 0.0.4 (see :mod:`proxy._metrics`).
- ``GET /routes``: the live route table as JSON (``RouteTable.to_json()``), or
  ``{"loaded": false}`` with 503 before the first table. ``draining``: the endpoints that
  left the table (deregistered, not passing) with requests of this process still in
  flight on them, ``[{"service", "id", "instance", "address", "port", "active"}]``: a
  rollout can wait for its retired replica to be absent here before SIGTERM.
- ``GET /ready``: 200 ``ready`` once the first table is loaded and the proxy is not
  draining (``is_ready()``), else 503 with the reason. While the catalog does not answer
  the proxy stays ready (it routes from the last known table) and the line says so;
  ``?format=json`` (or ``Accept: application/json``) answers ``{"ready", "reason",
  "catalog": {"url", "reachable", "unreachable_since", "last_error"}}``.
- ``GET /tls``: the TLS listeners and upstream TLS, ``{"listeners": [{"listen", "default":
  {"cert_file", "subject", "names", "not_after"}, "certificates": [...], "files",
  "loaded_at", "error", "error_at"}], "upstreams": [{"service", "ca_file", "server_name",
  ...}]}``; ``error`` is the last reload's failure while the files stay unusable (the
  certificates loaded before still serve), else null.
- ``GET /snapshot``: this process's metrics as JSON (``Metrics.snapshot``), for the
  ``--workers`` parent.

With ``--workers N`` the parent serves the admin address (``start_workers_admin``) and each
worker an internal one on 127.0.0.1 (a free port, in its ready line): ``/metrics`` adds the
workers' snapshots (counters, histograms and gauges summed), ``/routes`` is a worker's
table with every worker's draining endpoints (``active`` summed), ``/tls`` a worker's with
the errors of any worker (each reloads on its own), ``/ready`` is 200 while
the parent is not draining and a worker is ready. A worker that does not answer (it is
restarting) is left out; none answering is a 503.

Errors: nothing here raises to a client; an exception in a handler is logged and
answered 500 with a one-line body (no traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
from aiohttp import web

from ._metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:  # pragma: no cover
    from ._routes import RouteTable

__all__ = ["start_admin", "make_app", "start_workers_admin", "make_workers_app", "merge_draining", "merge_tls"]

log = logging.getLogger("meshlet.proxy.admin")


@web.middleware
async def _no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return web.Response(status=500, text="internal error\n")


def _wants_json(request: web.Request) -> bool:
    return request.query.get("format") == "json" or "application/json" in request.headers.get("Accept", "")


def _ready_answer(request: web.Request, ready: bool, reason: str, catalog: dict[str, Any] | None,
                  **extra: Any) -> web.Response:
    status = 200 if ready else 503
    if _wants_json(request):
        doc: dict[str, Any] = {"ready": ready, "reason": reason, **extra}
        if catalog is not None:
            doc["catalog"] = catalog
        return web.json_response(doc, status=status)
    text = reason if not ready else "ready" + (f" ({extra['detail']})" if extra.get("detail") else "")
    if catalog is not None and not catalog.get("reachable", True):
        text += "; catalog unreachable, routing from the last known state"
    return web.Response(status=status, text=text + "\n")


def make_app(*, get_table: Callable[[], RouteTable | None], metrics: Metrics,
             is_ready: Callable[[], bool], get_draining: Callable[[], list] | None = None,
             get_vip_failures: Callable[[], list] | None = None,
             get_tls: Callable[[], dict[str, Any]] | None = None,
             get_catalog: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    if metrics.get_table is None:
        metrics.get_table = get_table

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
        doc["vip_failures"] = get_vip_failures() if get_vip_failures is not None else []
        return web.Response(text=json.dumps(doc, indent=1, sort_keys=False) + "\n",
                            content_type="application/json")

    async def ready_handler(request: web.Request) -> web.Response:
        catalog = get_catalog() if get_catalog is not None else None
        if get_table() is None:
            return _ready_answer(request, False, "not ready: no route table loaded yet", catalog)
        if not is_ready():
            return _ready_answer(request, False, "not ready: draining", catalog)
        return _ready_answer(request, True, "ready", catalog)

    async def snapshot_handler(request: web.Request) -> web.Response:
        return web.json_response(metrics.snapshot(get_table()))

    async def tls_handler(request: web.Request) -> web.Response:
        doc = get_tls() if get_tls is not None else {"listeners": [], "upstreams": []}
        return web.Response(text=json.dumps(doc, indent=1) + "\n", content_type="application/json")

    app = web.Application(middlewares=[_no_tracebacks])
    app.router.add_get("/snapshot", snapshot_handler)
    app.router.add_get("/tls", tls_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/routes", routes_handler)
    app.router.add_get("/ready", ready_handler)
    return app


def merge_draining(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers' ``draining`` lists as one: an endpoint once, its ``active`` summed."""
    out: dict[tuple[Any, Any], dict[str, Any]] = {}
    for entries in lists:
        for e in entries:
            key = (e.get("service"), e.get("id"))
            if key in out:
                out[key]["active"] = out[key].get("active", 0) + e.get("active", 0)
            else:
                out[key] = dict(e)
    return list(out.values())


# How long the parent waits for a worker's internal admin (one that does not answer in
# time is left out of the answer, as a restarting one is).
PEER_TIMEOUT = 2.0


def make_workers_app(*, peers: Callable[[], list[str]], is_draining: Callable[[], bool],
                     workers: int) -> web.Application:
    """The ``--workers`` parent's admin: answers from the workers' internal admins
    (``peers()``: the ``host:port`` of those running now, of ``workers``)."""
    session: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT))

    async def on_cleanup(app: web.Application) -> None:
        await session["s"].close()

    async def ask(peer: str, path: str) -> tuple[int, Any] | None:
        try:
            async with session["s"].get(f"http://{peer}{path}") as r:
                return r.status, await r.json(content_type=None) if path != "/ready" else await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("worker admin %s%s: %s", peer, path, exc)
            return None

    async def ask_all(path: str) -> list[tuple[int, Any]]:
        return [a for a in await asyncio.gather(*(ask(p, path) for p in peers())) if a is not None]

    async def metrics_handler(request: web.Request) -> web.Response:
        snaps = [doc for status, doc in await ask_all("/snapshot") if status == 200 and isinstance(doc, dict)]
        if not snaps:
            return web.Response(status=503, text="no worker answered\n")
        total = Metrics()
        for snap in snaps:
            total.add(snap)
        return web.Response(body=total.render(), headers={"Content-Type": CONTENT_TYPE})

    async def routes_handler(request: web.Request) -> web.Response:
        docs = [doc for status, doc in await ask_all("/routes") if status == 200 and isinstance(doc, dict)]
        if not docs:
            return web.json_response({"loaded": False}, status=503)
        doc = dict(docs[0])
        doc["draining"] = merge_draining(d.get("draining") or [] for d in docs)
        failures = {f["listen"]: f for d in docs for f in d.get("vip_failures") or () if isinstance(f, dict)}
        doc["vip_failures"] = [failures[k] for k in sorted(failures)]
        return web.Response(text=json.dumps(doc, indent=1, sort_keys=False) + "\n",
                            content_type="application/json")

    async def tls_handler(request: web.Request) -> web.Response:
        docs = [doc for status, doc in await ask_all("/tls") if status == 200 and isinstance(doc, dict)]
        if not docs:
            return web.json_response({"listeners": [], "upstreams": []}, status=503)
        return web.Response(text=json.dumps(merge_tls(docs), indent=1) + "\n", content_type="application/json")

    async def ready_handler(request: web.Request) -> web.Response:
        if is_draining():
            return _ready_answer(request, False, "not ready: draining", None)
        answers = [(s, d) for s, d in await ask_all("/ready?format=json") if isinstance(d, dict)]
        ready = sum(1 for status, _ in answers if status == 200)
        catalogs = [d["catalog"] for _, d in answers if isinstance(d.get("catalog"), dict)]
        # the workers' catalog view: unreachable if any worker's watches fail
        catalog = next((c for c in catalogs if not c.get("reachable", True)), catalogs[0] if catalogs else None)
        if not ready:
            why = answers[0][1].get("reason", "not ready") if answers else "no worker answered"
            return _ready_answer(request, False, why, catalog)
        return _ready_answer(request, True, "ready", catalog, detail=f"{ready} of {workers} workers",
                             workers_ready=ready, workers=workers)

    app = web.Application(middlewares=[_no_tracebacks])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/routes", routes_handler)
    app.router.add_get("/ready", ready_handler)
    app.router.add_get("/tls", tls_handler)
    return app


def merge_tls(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``/tls`` as one: the first worker's, each entry with an ``error`` if
    any worker has one (a worker that could not reload still serves the old certificate)."""
    out = json.loads(json.dumps(docs[0]))
    for kind, key in (("listeners", "listen"), ("upstreams", "service")):
        errors = {}
        for doc in docs:
            for entry in doc.get(kind) or ():
                if isinstance(entry, dict) and entry.get("error"):
                    errors.setdefault(entry.get(key), entry)
        for entry in out.get(kind) or ():
            bad = errors.get(entry.get(key))
            if bad is not None and not entry.get("error"):
                entry["error"], entry["error_at"] = bad["error"], bad.get("error_at")
    out["workers"] = len(docs)
    return out


async def start_workers_admin(host: str, port: int, *, peers: Callable[[], list[str]],
                              is_draining: Callable[[], bool], workers: int) -> tuple[web.AppRunner, int]:
    """Serve the ``--workers`` parent's admin on ``host:port``; as ``start_admin``."""
    return await _serve(make_workers_app(peers=peers, is_draining=is_draining, workers=workers), host, port)


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
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


async def start_admin(host: str, port: int, *, get_table: Callable[[], RouteTable | None], metrics: Metrics,
                      is_ready: Callable[[], bool],
                      get_draining: Callable[[], list] | None = None,
                      get_vip_failures: Callable[[], list] | None = None,
                      get_tls: Callable[[], dict[str, Any]] | None = None,
                      get_catalog: Callable[[], dict[str, Any]] | None = None) -> tuple[web.AppRunner, int]:
    """Serve the admin API on ``host:port`` (0: any free port). Returns the runner
    (``await runner.cleanup()`` stops it) and the bound port."""
    return await _serve(make_app(get_table=get_table, metrics=metrics, is_ready=is_ready,
                                 get_draining=get_draining, get_vip_failures=get_vip_failures,
                                 get_tls=get_tls, get_catalog=get_catalog), host, port)
