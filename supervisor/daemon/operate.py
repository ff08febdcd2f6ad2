"""What the admin API serves to operate the mesh: events, metrics, the dashboard and its
actions. Added to the admin API's application by ``add_routes`` (daemon/admin.py)::

    GET  /v1/events?service=S&since=N&limit=N&kind=K&wait=D
                     {"events": [{seq, at, kind, service, instance, node, text}], "last": N}
                     events newer than seq ``since`` (the "last" of a previous answer), the
                     newest ``limit`` (default 1000) of them; with ``wait`` (e.g. 30s, at
                     most 5m) an answer with no event waits until one comes (long poll:
                     ``meshlet events -f``, the dashboard)
    GET  /metrics    Prometheus text (daemon/metrics.py)
    GET  /v1/endpoints
                     per service, what DNS answers (the passing instances of the catalog,
                     the VIP) and what each proxy the supervisor knows routes to (GET /routes)
    GET  /  /ui/<file>
                     the dashboard: one page, its CSS and JS, shipped in the package
    POST /v1/services/<service>/rollback   {"to": N} optional      (meshlet rollback)
    POST /v1/services/<service>/restart                            (meshlet restart)
    POST /v1/services/<service>/pause      {"reason": "..."} optional (meshlet rollout pause)
    POST /v1/services/<service>/resume                             (meshlet rollout resume)
    POST /v1/services/<service>/scale      {"replicas": N}         (meshlet scale)
                     -> {"message": "..."}; they write the catalog as the CLI does (the same
                     functions, commands/rollout.py and scale.py) and the supervisor acts on
                     what it reads there

Errors are JSON ``{"error": "..."}``: 400 bad input (naming the parameter or field), 404 no
such service or action, 403 a request from another site, 409 refused (nothing to roll back
to, changed meanwhile), 503 the catalog did not answer.

The actions change things, so a browser on another site must not be able to send them
(the admin API is on loopback, which any page the user opens can reach): they need a
JSON body (``Content-Type: application/json``, which a cross-site form cannot send without
a CORS preflight, which is never allowed here), a ``Host`` that names a loopback address
(no DNS rebinding) and, when the browser sends ``Origin``, that it is this very address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

import config

from ..commands.rollout import CliError, NoSuchService, request_restart, roll_back, set_paused
from ..commands.scale import ScaleError, scale_service
from .metrics import CONTENT_TYPE

__all__ = ["add_routes", "OperateBackend", "UI_DIR", "MAX_WAIT"]

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_FILES = {"index.html": "text/html", "app.js": "application/javascript", "style.css": "text/css"}
MAX_WAIT = 300.0
DEFAULT_LIMIT = 1000
ACTIONS = ("rollback", "restart", "pause", "resume", "scale")


class OperateBackend(Protocol):
    """What these routes may ask of the supervisor."""

    event_log: Any          # daemon/events.py EventLog
    metrics: Any            # daemon/metrics.py SupervisorMetrics
    nodes: Any              # name -> config.NodeSpec

    def status(self) -> dict[str, Any]: ...

    def all_proxy_admins(self) -> tuple[str, ...]: ...

    @property
    def catalog(self) -> Any: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _wait_seconds(text: str | None) -> float:
    """``wait``: a duration (30s, 1m) or seconds; ValueError naming it when bad."""
    if text in (None, ""):
        return 0.0
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else float(config.parse_duration(text))
    except (ValueError, config.UnitError):
        raise ValueError(f"wait: expected a duration like 30s (at most {MAX_WAIT:g}s), got {text!r}") from None
    if seconds < 0:
        raise ValueError(f"wait: expected a duration >= 0, got {text!r}")
    return min(seconds, MAX_WAIT)


def _int_param(query: Any, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    text = query.get(name)
    if text in (None, ""):
        return default
    try:
        n = int(text)
    except ValueError:
        n = lo - 1
    if n < lo or (hi is not None and n > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an integer {bound}, got {text!r}")
    return n


def _is_loopback_host(host: str) -> bool:
    """Does a ``Host`` header ("127.0.0.1:8080", "[::1]:80", "localhost") name a loopback address?"""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    else:
        name = host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Routes:
    def __init__(self, backend: OperateBackend) -> None:
        self.backend = backend

    # --- events -----------------------------------------------------------------------------

    async def get_events(self, request: web.Request) -> web.Response:
        q = request.query
        log_ = self.backend.event_log
        try:
            since = _int_param(q, "since", None, -1)
            limit = _int_param(q, "limit", DEFAULT_LIMIT, 1, 10_000)
            wait = _wait_seconds(q.get("wait"))
        except ValueError as exc:
            return _error(400, str(exc))
        service = q.get("service") or None
        kinds = [k for k in q.getall("kind", []) if k]
        if since is not None and since > log_.last_seq:
            since = -1            # numbered anew (the catalog's events were cleared): all of them
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            cursor = log_.last_seq
            found = log_.select(service=service, since=since, limit=limit, kinds=kinds)
            left = deadline - loop.time()
            if found or since is None or left <= 0:
                break
            since = cursor     # none of the newer ones matched: wait past them
            if not await log_.wait(cursor, left):
                break
        return web.json_response({"events": [e.to_json() for e in found], "last": log_.last_seq})

    # --- metrics ----------------------------------------------------------------------------

    async def get_metrics(self, request: web.Request) -> web.Response:
        log_ = self.backend.event_log
        body = self.backend.metrics.render(self.backend.status(), event_write_failures=log_.write_failures,
                                           events_dropped=log_.dropped)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # --- endpoints --------------------------------------------------------------------------

    async def get_endpoints(self, request: web.Request) -> web.Response:
        from discovery.consul import instances_from_health
        names = [s["name"] for s in self.backend.status().get("services", ())]
        client = self.backend.catalog
        proxies: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            async def routes(admin: str) -> None:
                try:
                    async with http.get(f"http://{admin}/routes", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        proxies[admin] = await r.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    proxies[admin] = {"error": f"{type(exc).__name__}: {exc}".rstrip(": ")}
            await asyncio.gather(*(routes(a) for a in self.backend.all_proxy_admins()))
        domain = next((d.get("domain") for d in proxies.values() if isinstance(d, dict) and d.get("domain")),
                      "meshlet")
        out = []
        for name in names:
            dns: list[dict[str, Any]] = []
            problem = None
            if client is not None:
                try:
                    _, entries = await client.health.service(name)
                    dns = [{"instance": i.id, "address": i.address, "port": i.port, "status": i.status}
                           for i in instances_from_health(entries)]
                except Exception as exc:  # noqa: BLE001 - shown, not raised
                    problem = f"the catalog did not answer: {exc}"
            vip = None
            seen: list[dict[str, Any]] = []
            for admin, doc in sorted(proxies.items()):
                if not isinstance(doc, dict) or "error" in doc:
                    seen.append({"proxy": admin, "error": (doc or {}).get("error", "no answer")})
                    continue
                svc = (doc.get("services") or {}).get(name) or {}
                vip = vip or svc.get("vip")
                eps = [{"instance": e.get("instance"), "address": e.get("address"), "port": e.get("port"),
                        "weight": e.get("weight"), "ejected": e.get("ejected")}
                       for c in svc.get("clusters") or () for e in c.get("endpoints") or ()]
                seen.append({"proxy": admin, "endpoints": eps})
            out.append({"service": name, "dns_name": f"{name}.service.{domain}", "vip": vip,
                        "dns": sorted(dns, key=lambda d: d["instance"]), "dns_problem": problem, "proxies": seen})
        return web.json_response({"services": out})

    # --- the page ----------------------------------------------------------------------------

    async def get_ui(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file", "index.html")
        kind = UI_FILES.get(name)
        if kind is None:
            return _error(404, f"no dashboard file {name!r}")
        return web.Response(body=(UI_DIR / name).read_bytes(), content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    # --- actions ------------------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        host = request.headers.get("Host", "")
        if not _is_loopback_host(host):
            return _error(403, f"Host {host!r} is not a loopback address: the admin API answers actions "
                               "only when reached by its own address")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in (f"http://{host}",):
            return _error(403, f"a request from {origin!r} may not act on this supervisor (only its own page)")
        if request.content_type != "application/json":
            return _error(400, "body: expected JSON (Content-Type: application/json), "
                               f"got {request.content_type or 'nothing'!r}")
        return None

    async def post_action(self, request: web.Request) -> web.Response:
        service, action = request.match_info["service"], request.match_info["action"]
        if action not in ACTIONS:
            return _error(404, f"no service action {action!r} ({', '.join(ACTIONS)})")
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await request.json() if request.can_read_body else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"body: not valid JSON ({exc})")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            return _error(400, f"body: expected a JSON object, got {type(body).__name__}")
        client = self.backend.catalog
        if client is None:
            return _error(503, "the supervisor has not started yet")
        try:
            if action == "scale":
                replicas = body.get("replicas")
                if isinstance(replicas, str) and replicas.strip().lstrip("-").isdigit():
                    replicas = int(replicas)
                if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                    return _error(400, f"replicas: expected a whole number >= 0, got {replicas!r}")
                mesh = dataclasses.replace(config.MESH_DEFAULTS, nodes=tuple(self.backend.nodes.values()))
                message = await scale_service(client, service, replicas, mesh,
                                              "the supervisor's nodes: " + ", ".join(self.backend.nodes))
            elif action == "rollback":
                to = body.get("to")
                if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
                    return _error(400, f"to: expected a revision number >= 1 from the history, got {to!r}")
                entry = await roll_back(client, service, to)
                message = f"{service}: rolling back to revision {entry['number']} ({entry['revision']})"
            elif action == "restart":
                message = await request_restart(client, service)
            else:
                reason = body.get("reason") or "paused from the dashboard"
                if not isinstance(reason, str):
                    return _error(400, f"reason: expected text, got {reason!r}")
                message = await set_paused(client, service, action == "pause", reason)
        except NoSuchService as exc:
            return _error(404, str(exc))
        except ScaleError as exc:
            return _error(404 if exc.missing else 400 if exc.code == 2 else 409, str(exc))
        except CliError as exc:
            return _error(400 if exc.code == 2 else 409, str(exc))
        except config.ConfigError as exc:
            return _error(409, "; ".join(str(i) for i in exc.issues))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            return _error(503, f"the catalog did not answer: {exc or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - consul.ConsulException and kin: refused
            log.warning("%s of %s failed: %s", action, service, exc)
            return _error(503, f"the catalog refused the request: {exc}")
        log.info("dashboard: %s", message)
        return web.json_response({"message": message})


def add_routes(app: web.Application, backend: OperateBackend) -> None:
    r = _Routes(backend)
    app.router.add_get("/v1/events", r.get_events)
    app.router.add_get("/metrics", r.get_metrics)
    app.router.add_get("/v1/endpoints", r.get_endpoints)
    app.router.add_get("/", r.get_ui)
    app.router.add_get("/ui", r.get_ui)
    app.router.add_get("/ui/{file}", r.get_ui)
    app.router.add_post("/v1/services/{service}/{action}", r.post_action)
