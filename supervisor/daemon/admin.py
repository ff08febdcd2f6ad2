"""The supervisor's admin API: JSON over HTTP on a loopback address (``mesh.admin_listen``).

    GET  /v1/status                      services, ready/desired, instances (status.py); nodes
                                         with capacity, reserve, room and allocated; per
                                         service "rollout": null or {phase, revision (target),
                                         number (in the history), progress ("2/3 updated, 1 old"),
                                         updated, replicas and old (the same as numbers),
                                         pause_requested (`rollout pause` holds this or the next rollout),
                                         reason, reverted_from, summary (one line), terminating}
    GET  /v1/logs/<service>?follow=1&tail=N&instance=ID
                                         the instances' logs as text; with several instances
                                         each line is prefixed "<instance id> | "
    GET  /v1/logs/<service>?previous=1[&instance=ID]
                                         the last lines of the replicas that exited (the
                                         newest exit of each slot, or of that instance)
    GET  /v1/explain/<service>           per slot, every node filtered out (why) or scored,
                                         and what placement would pick now (core.explain)
    POST /v1/nodes/<node>/cordon         no new replica on the node (stored in the catalog)
    POST /v1/nodes/<node>/drain          cordon, and move its replicas off as a rolling update
                                         would: each replacement ready before its predecessor
                                         stops, max_surge at a time
    POST /v1/nodes/<node>/uncordon       undo both; answers the node's new state
    GET  /v1/volumes                     every volume meshlet keeps: [{name, kind (named,
                                         per-replica, host), volume, driver, node, size
                                         (bytes used; null: unknown), users (instance ids),
                                         created_at}] (`meshlet volume ls`)
    DELETE /v1/volumes/<name>            delete a volume and its data; 409 while a replica
                                         mounts it, 404 when none is known (`meshlet volume rm`)
    POST /v1/rebalance[?dry_run=1]       move replicas where placement would put them now
                                         ({"planned": [...], "moves": [...in progress],
                                         "dropped": [...given up, why]}); GET: the moves in progress
    POST /v1/down                        stop every workload and the supervisor (`meshlet down`)

Events (``GET /v1/events``), ``GET /metrics``, the dashboard (``GET /``), ``GET /v1/endpoints``
and the dashboard's actions (``POST /v1/services/<service>/<action>``) are daemon/operate.py's.

Errors are JSON ``{"error": "..."}`` with 400/404; nothing raises into the client.

What the server may ask of the supervisor is ``AdminBackend``: its status document and
the log sources of a service; ``on_down`` is called for ``POST /v1/down``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import web

import config

from ..runtime import Runtime, VolumeInUse, WorkloadError
from .operate import add_routes as add_operate_routes

__all__ = ["AdminServer", "AdminBackend"]

log = logging.getLogger(__name__)


class AdminBackend(Protocol):
    """What the admin API may ask of the supervisor."""

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document."""

    def log_sources(self, service: str, instance: str | None = None) -> list[tuple[str, Runtime]]:
        """(instance id, runtime) of the service's instances (or only ``instance``)."""

    def explain(self, service: str) -> dict[str, Any] | None:
        """Per slot, every node with its filter reason or score (None: not desired)."""

    def previous_logs(self, service: str, instance: str | None = None) -> list[Any]:
        """The kept exits (``LastExit``) of the service's slots, the newest of each slot
        (or those of ``instance``)."""

    async def rebalance(self, *, dry_run: bool) -> dict[str, Any]:
        """Plan (and unless ``dry_run`` start) the moves of ``meshlet rebalance``."""

    async def set_node(self, name: str, *, cordon: bool | None = None,
                       drain: bool | None = None) -> dict[str, Any]:
        """Cordon, drain or uncordon a node; its new state. KeyError: no such node."""

    async def list_volumes(self) -> list[dict[str, Any]]:
        """Every volume meshlet keeps (``GET /v1/volumes``)."""

    async def remove_volume(self, name: str) -> dict[str, Any]:
        """Delete a volume; VolumeInUse while mounted, WorkloadError when unknown."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AdminServer:
    def __init__(self, backend: AdminBackend, *, on_down: Callable[[], Any]) -> None:
        self.backend = backend
        self.on_down = on_down
        self.down_requested = False
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()   # open log streams, ended at close()
        app = web.Application()
        app.router.add_get("/v1/status", self.get_status)
        app.router.add_get("/v1/logs/{service}", self.get_logs)
        app.router.add_get("/v1/explain/{service}", self.get_explain)
        app.router.add_post("/v1/nodes/{node}/{action}", self.post_node)
        app.router.add_get("/v1/volumes", self.get_volumes)
        app.router.add_delete("/v1/volumes/{name}", self.delete_volume)
        app.router.add_post("/v1/rebalance", self.post_rebalance)
        app.router.add_get("/v1/rebalance", self.get_rebalance)
        app.router.add_post("/v1/down", self.post_down)
        # events, /metrics, the dashboard and its actions (daemon/operate.py)
        add_operate_routes(app, backend)  # type: ignore[arg-type]
        self.app = app

    async def start(self, listen: str) -> str:
        """Bind ``listen`` (loopback only) and return the bound "host:port"."""
        host, port = config.split_hostport(listen, default_host="127.0.0.1")
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"the admin API listens on loopback only, not {host}")
        except ValueError as exc:
            if "loopback" in str(exc):
                raise
            if host != "localhost":
                raise ValueError(f"admin listen address {listen!r}: expected a loopback IP") from None
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        bound = sockets[0].getsockname() if sockets else (host, port)
        return f"{bound[0]}:{bound[1]}"

    async def close(self) -> None:
        # Followed log streams never end on their own; end them so cleanup does not wait.
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.backend.status())

    def _previous(self, service: str, instance: str | None) -> web.Response:
        exits = self.backend.previous_logs(service, instance)
        if not exits:
            return _error(404, f"no exited replica of service {service!r}" + (f" with id {instance!r}" if instance else "")
                          + " is kept (the supervisor keeps the last exits of each slot since it started)")
        parts = []
        for e in exits:
            code = "exited" if e.code is None else f"exited with code {e.code}"
            when = time.strftime("%H:%M:%S", time.localtime(e.at))
            parts.append(f"==> {e.instance_id} (slot {e.slot}, revision {e.revision[:12]}, {code} at {when}) <==\n"
                         + "".join(line + "\n" for line in e.lines))
        return web.Response(text="\n".join(parts), content_type="text/plain", charset="utf-8")

    async def get_explain(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        doc = self.backend.explain(service)
        if doc is None:
            return _error(404, f"no service {service!r} is desired (apply it first)")
        return web.json_response(doc)

    async def post_node(self, request: web.Request) -> web.Response:
        name, action = request.match_info["node"], request.match_info["action"]
        change = {"cordon": {"cordon": True}, "uncordon": {"cordon": False, "drain": False},
                  "drain": {"drain": True}}.get(action)
        if change is None:
            return _error(404, f"no node action {action!r} (cordon, drain or uncordon)")
        try:
            state = await self.backend.set_node(name, **change)
        except KeyError:
            return _error(404, f"no node {name!r} (see meshlet node ls)")
        except Exception as exc:  # noqa: BLE001 - the catalog refused: say so, change nothing
            return _error(503, f"cannot store the state of node {name!r} in the catalog: {exc}")
        return web.json_response({"node": name, **state})

    async def get_volumes(self, request: web.Request) -> web.Response:
        return web.json_response({"volumes": await self.backend.list_volumes()})

    async def delete_volume(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self.backend.remove_volume(request.match_info["name"]))
        except VolumeInUse as exc:
            return _error(409, str(exc))
        except WorkloadError as exc:
            return _error(404, str(exc))

    async def post_rebalance(self, request: web.Request) -> web.Response:
        dry = request.query.get("dry_run", "0") not in ("0", "", "false")
        try:
            return web.json_response(await self.backend.rebalance(dry_run=dry))
        except Exception as exc:  # noqa: BLE001 - the catalog refused to store the moves
            return _error(503, f"cannot start the rebalance: {exc}")

    async def get_rebalance(self, request: web.Request) -> web.Response:
        return web.json_response(await self.backend.rebalance(dry_run=True))

    async def post_down(self, request: web.Request) -> web.Response:
        self.down_requested = True
        asyncio.get_running_loop().call_soon(self.on_down)
        return web.json_response({"stopping": True})

    async def get_logs(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        follow = request.query.get("follow", "0") not in ("0", "", "false")
        tail_text = request.query.get("tail")
        try:
            tail = int(tail_text) if tail_text else None
            if tail is not None and tail < 0:
                raise ValueError
        except ValueError:
            return _error(400, f"tail: expected an integer >= 0, got {tail_text!r}")
        wanted = request.query.get("instance")
        if request.query.get("previous", "0") not in ("0", "", "false"):
            return self._previous(service, wanted)
        sources = self.backend.log_sources(service, wanted)
        if not sources:
            return _error(404, f"no instances of service {service!r}"
                          + (f" with id {wanted!r}" if wanted else ""))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        prefix = len(sources) > 1
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)

        async def pump(iid: str, rt: Runtime) -> None:
            try:
                buf = b""
                stream: AsyncIterator[bytes] = rt.logs(iid, follow=follow, tail=tail)
                async for chunk in stream:
                    if not prefix:
                        await queue.put(chunk)
                        continue
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        await queue.put(iid.encode() + b" | " + line + b"\n")
                if prefix and buf:
                    await queue.put(iid.encode() + b" | " + buf + b"\n")
            except WorkloadError as exc:
                await queue.put(f"{iid} | (logs unavailable: {exc})\n".encode())
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(iid, rt)) for iid, rt in sources]
        open_streams = len(tasks)
        me = asyncio.current_task()
        if me is not None:
            self._streams.add(me)
        try:
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                await resp.write(item)
        except ConnectionResetError:
            return resp      # the follower went away (Ctrl-C on `meshlet logs -f`): nothing to report
        finally:
            for t in tasks:
                t.cancel()
            self._streams.discard(me)  # type: ignore[arg-type]
        await resp.write_eof()
        return resp
