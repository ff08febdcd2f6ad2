"""HTTP plumbing shared by every endpoint: routing, Consul's error texts, headers, JSON.

Routing is Consul's table (agent/http_register.go): exact paths and prefixes ending in
``/``; the longest match wins. For a matched path a method outside the route's list gets
405 with ``Allow: OPTIONS,<methods>``; ``OPTIONS`` gets 200 with ``Allow``. Any other
``/v1/`` path is 404 ``Invalid URL path: not a recognized HTTP API endpoint``.

Handlers answer a :class:`_wire.Reply`, a :class:`_watch.Blocking` (``req.block``: the
hub answers it now or parks it) or a :class:`_wire.Streaming`. They raise CatalogError
(status + plain-text reason) or DecodeError (400); anything else is logged with its
traceback and answered 500 with a one-line reason, never a trace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Union
from urllib.parse import urlencode

from multidict import MultiDictProxy

from ._decode import DecodeError, parse_uint
from ._errors import BadRequest, CatalogError, MethodNotAllowed, TooLarge
from ._watch import Blocking, parse_wait
from ._wire import Reply, Request, Streaming

if TYPE_CHECKING:
    from ._server import CatalogServer

__all__ = ["Req", "Router", "Reply", "Answer", "dumps", "json_response", "text_reply", "read_headers",
           "make_handler", "error_reply"]

log = logging.getLogger("discovery.catalog.http")

INVALID_PATH = "Invalid URL path: not a recognized HTTP API endpoint\n"
_METHODS = frozenset(("GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH"))
# Parameters that say how long to wait (or who asks), not what to answer: not part of an
# answer's identity, so watchers naming their token in ?token= still share one answer.
_WAIT_PARAMS = frozenset(("index", "wait", "token"))

Answer = Union[Reply, Blocking, Streaming]


def dumps(obj: Any, pretty: bool = False) -> bytes:
    if pretty:
        return (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode()
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def read_headers(index: int) -> dict[str, str]:
    """Consul's query metadata; the index is never 0 (a 0 makes clients busy-loop)."""
    return {
        "X-Consul-Index": str(max(1, int(index))),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }


@dataclass(slots=True)
class Req:
    """One request as handlers see it."""

    request: Request
    server: "CatalogServer"
    tail: str  # the path after a prefix route ("" for exact routes)

    @property
    def query(self) -> MultiDictProxy[str]:
        return self.request.query

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def pretty(self) -> bool:
        return "pretty" in self.request.query

    def flag(self, name: str) -> bool:
        return name in self.request.query

    def header(self, name: str, default: str = "") -> str:
        return self.request.headers.get(name.lower(), default)

    async def body(self, limit: int, what: str = "Request body") -> bytes:
        """The request body, refusing more than ``limit`` bytes with 413."""
        data = self.request.body
        if len(data) > limit:
            raise TooLarge(_too_large(len(data), limit))
        return data

    async def json_body(self, limit: int = 4 * 1024 * 1024, allow_empty: bool = False) -> Any:
        raw = await self.body(limit)
        if not raw.strip():
            if allow_empty:
                return None
            raise BadRequest("Request decode failed: EOF")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None
        except RecursionError:
            raise BadRequest("Request decode failed: exceeded max depth") from None

    def blocking(self) -> tuple[int, float]:
        """``(index, wait seconds)`` with Consul's 400 texts for bad values."""
        q = self.request.query
        if "stale" in q and "consistent" in q:
            raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")
        try:
            wait = parse_wait(q.get("wait"))
        except DecodeError:
            raise BadRequest("Invalid wait time") from None
        index = 0
        if "index" in q:
            try:
                index = parse_uint(q["index"])
            except DecodeError:
                raise BadRequest("Invalid index") from None
        return index, wait

    def block(
        self,
        evaluate: Callable[[], tuple[int, Any]],
        respond: Callable[[int, Any], Reply] | None = None,
        *,
        topics: tuple[str, ...] = (),
        keys: tuple[str, ...] = (),
        prefixes: tuple[str, ...] = (),
    ) -> Blocking:
        """A blocking read: ``evaluate() -> (index, data)``, answered by ``respond(index,
        data)`` (JSON of data with the index headers by default) now or, if the client
        holds ``?index=`` and the answer has not passed it, once a write to ``topics``,
        ``keys`` or ``prefixes`` moves it (or the wait runs out)."""
        index, wait = self.blocking()
        request = self.request
        query = request.query
        identity = tuple(sorted((k, v) for k, v in query.items() if k not in _WAIT_PARAMS)) if query else ()
        pretty = "pretty" in query
        if respond is None:
            def respond(idx: int, data: Any) -> Reply:
                return json_response(data, index=idx, pretty=pretty)
        return Blocking(evaluate, respond, index, wait, (request.path, identity), topics, keys, prefixes)

    def json(self, obj: Any, index: int | None = None, status: int = 200) -> Reply:
        return json_response(obj, index=index, pretty=self.pretty, status=status)


def _too_large(size: int, limit: int) -> str:
    return (
        f"Request body({size} bytes) too large, max size: {limit} bytes. See "
        "https://developer.hashicorp.com/consul/docs/agent/config/config-files#kv_max_value_size."
    )


def json_response(obj: Any, index: int | None = None, pretty: bool = False, status: int = 200,
                  body: bytes | None = None) -> Reply:
    return Reply(status, body if body is not None else dumps(obj, pretty), "application/json",
                 read_headers(index) if index is not None else None)


def text_reply(status: int, reason: str, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, reason.encode(), "text/plain", dict(headers) if headers else None)


def conflicting(query: Mapping[str, str], *flags: str) -> None:
    """Consul's ``conflictingFlags``: at most one of ``flags`` may be given."""
    if sum(f in query for f in flags) > 1:
        encoded = urlencode(sorted((k, v) for k, v in query.items() if k != "token"))  # never echo a token
        raise BadRequest(f"Conflicting flags: {encoded}\n")


Handler = Callable[[Req], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Route:
    methods: Mapping[str, Handler]
    check_dc: bool = True
    pattern: str = ""           # the path or prefix it was added under (the metrics label)


class Router:
    """Consul's route table: exact paths and prefixes (ending in "/"), longest first."""

    def __init__(self) -> None:
        self.exact: dict[str, Route] = {}
        self.prefixes: list[tuple[str, Route]] = []

    def add(self, path: str, methods: Mapping[str, Handler], *, check_dc: bool = True) -> None:
        route = Route(dict(methods), check_dc, path)
        if path.endswith("/"):
            self.prefixes.append((path, route))
            self.prefixes.sort(key=lambda item: -len(item[0]))
        else:
            self.exact[path] = route

    def resolve(self, path: str) -> tuple[Route, str] | None:
        route = self.exact.get(path)
        if route is not None:
            return route, ""
        for prefix, route in self.prefixes:
            if path.startswith(prefix):
                return route, path[len(prefix):]
        return None


def error_reply(exc: BaseException, index: int | None = None) -> Reply:
    """The reply for an error raised by a handler (``index``: add the query metadata, as
    reads carry it even when they fail; py-consul insists on X-Consul-Index for a 404)."""
    if isinstance(exc, MethodNotAllowed):
        return text_reply(exc.status, exc.reason, {"Allow": exc.allow})
    if isinstance(exc, CatalogError):
        return text_reply(exc.status, exc.reason, read_headers(index) if index is not None else None)
    if isinstance(exc, DecodeError):
        return text_reply(400, f"Request decode failed: {exc}")
    log.error("request failed", exc_info=exc)
    return text_reply(500, f"Internal error: {type(exc).__name__}")


def make_handler(router: Router, server: "CatalogServer") -> Callable[[Request], Awaitable[Answer]]:
    """The one entry point of the HTTP server: route, check method and dc, call, map errors."""

    count = server.stats.request

    async def handle(request: Request) -> Answer:
        found = router.resolve(request.path)
        if found is None:
            count("other", request.method if request.method in _METHODS else "other", 404)
            return text_reply(404, INVALID_PATH)
        answer = await _handle(request, *found)
        count(found[0].pattern, request.method, answer.status if isinstance(answer, Reply) else 200)
        return answer

    async def _handle(request: Request, route: Route, tail: str) -> Answer:
        path = request.path
        method = request.method
        try:
            if method == "OPTIONS":
                return Reply(200, headers={"Allow": ",".join(("OPTIONS", *route.methods))})
            handler = route.methods.get(method)
            if handler is None:
                raise MethodNotAllowed(method, tuple(route.methods))
            server.gate.check(request, path)
            dc = request.query.get("dc")
            if route.check_dc and dc and dc != server.opts.datacenter:
                raise CatalogError("No path to datacenter")
            return await handler(Req(request, server, tail))
        except (CatalogError, DecodeError) as exc:
            return error_reply(exc, server.store.index if method == "GET" else None)
        except Exception as exc:  # the client gets one line; the log gets the traceback
            log.exception("%s %s failed", method, path)
            return text_reply(500, f"Internal error: {type(exc).__name__}")

    return handle
