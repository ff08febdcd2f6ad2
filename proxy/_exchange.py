"""One proxied request: route, pick, attempts (retries), response relay, time-outs.

Vocabulary
----------
Exchange
    A request from one client connection, from its validated head to the last byte of
    its response (or the generated answer that replaces one). It owns at most one upstream
    connection at a time (one *attempt*); a failed attempt before any response byte may be
    retried on a different endpoint (:func:`retry_decision`).
replay buffer
    The request body bytes kept so a retry can resend them: up to ``REPLAY_LIMIT``. Once
    more has been sent upstream the request is no longer replayable and is never retried.

Time-outs (Envoy's semantics; every deadline is checked by the server's sweep, see
``_server``):

* connect: per new upstream connection (``timeouts.connect``);
* per try: from the moment the request is complete upstream to its response head
  (``retries.per_try_timeout``; the attempt is abandoned and retried). Without one, a safe
  request (GET/HEAD/OPTIONS/TRACE) is *hedged* after ``HEDGE_AFTER``: sent to another
  endpoint too, the earlier attempt kept (``hedge``), the first response head wins;
* overall: from the moment the client's request is complete to the response head, across
  all attempts (``timeouts.request``; 0 = none);
* idle: no byte in either direction while the request body or the response body streams
  (``timeouts.idle``).

Generated answers: 502 upstream failure (refused, reset, invalid response), 503 no ready
instance or the service's pending-request limit reached, 504 time-out; each a short text
naming the service.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._decisions import REPLAY_LIMIT, hash_key, os_error, retry_decision, upstream_parts
from ._framing import CHUNKED, CRLF, NONE, RequestHead, chunk_header, generated, strip_prefix, trailer_block

if TYPE_CHECKING:  # pragma: no cover
    from ._http1 import ClientConnection
    from ._upstream import UpstreamConnection

__all__ = ["Exchange", "retry_decision", "REPLAY_LIMIT"]  # the last two re-exported from _decisions

log = logging.getLogger("meshlet.proxy.exchange")
INF = float("inf")


from ._hedge import Hedging  # noqa: E402
from ._relay import CONNECTING, DONE, RESPONDING, ROUTING, SENDING, Relay  # noqa: E402  (states)


class Exchange(Relay, Hedging):
    """See the module docstring."""

    __slots__ = (
        "client", "server", "head", "cluster", "service", "route", "state", "conn", "ep", "ep_t0", "tried",
        "retries", "retrying", "t0", "done_at", "try_deadline", "connect_deadline", "connect_task", "last_io",
        "body", "body_len", "replayable", "req_done", "req_trailers", "sent_upstream", "up_out", "up_head",
        "resp", "out_framing", "status", "pending", "stale_retry", "close_after", "bytes_out", "failure_note",
        "head_request", "hash_key", "timed_out", "resp_mark", "connect_fails", "hedge", "hedge_ep", "hedge_t0",
        "hedged", "try_hedges",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        self.client = client
        self.server = client.server
        self.head = head
        self.cluster: Any = None
        self.service = "-"
        self.route: Any = None
        self.state = ROUTING
        self.conn: UpstreamConnection | None = None
        self.ep: Any = None
        self.ep_t0 = 0.0
        self.tried: set[str] | None = None
        self.retries = 0
        self.retrying = False
        self.t0 = 0.0
        self.done_at = 0.0            # when the client's request was complete (overall time-out)
        self.try_deadline = 0.0
        self.connect_deadline = 0.0
        self.connect_task: Any = None
        self.last_io = 0.0
        self.body: list[bytes] | None = None   # replay buffer (decoded body pieces)
        self.body_len = 0
        self.replayable = True
        self.req_done = False
        self.req_trailers: list[tuple[bytes, bytes]] | None = None
        self.sent_upstream = False       # some byte of this attempt reached the upstream socket
        self.up_out: list[bytes] = []    # request bytes gathered while the client's parser runs
        self.up_head = b""
        self.resp: Any = None
        self.out_framing = NONE
        self.status = 0
        self.pending = False
        self.stale_retry = False
        self.close_after = False
        self.bytes_out = 0
        self.failure_note = ""
        self.head_request = head.method == b"HEAD"
        self.hash_key: bytes | None = None
        self.timed_out = False
        self.resp_mark = (-1, 0)  # (client flush count, output length) when the response head was queued
        self.connect_fails = 0        # connect failures so far (their own allowance: retry_decision)
        self.hedge: UpstreamConnection | None = None  # the earlier attempt, still waiting (see _hedge)
        self.hedge_ep: Any = None
        self.hedge_t0 = 0.0
        self.hedged = False           # a hedge was started (at most one per request)
        self.try_hedges = False       # try_deadline is HEDGE_AFTER (hedge), not per_try_timeout (abort)

    # -- start -------------------------------------------------------------------------

    def start(self, now: float = 0.0) -> None:
        """Route and send the first attempt (or answer at once). Called when the request
        becomes the connection's active one (pipelined requests wait their turn)."""
        server = self.server
        self.t0 = t0 = now or server.loop.time()
        server.metrics.active_requests.value += 1
        client = self.client
        head = self.head
        table = server.table
        if client.vip is None:
            route = table.match(head.host, head.path) if table is not None else None
            if route is None:
                host = head.host.decode("latin-1") or "(none)"
                self.answer(404, f"no route for host {host} and path {head.path.decode('latin-1')[:200]}")
                return
            self.route = route
            cluster = route.cluster
        else:
            cluster = table.vip_listeners.get(client.vip) if table is not None else None
            if cluster is None:
                self.answer(503, f"no service on {client.vip[0]}:{client.vip[1]}")
                return
        self.cluster = cluster
        self.service = cluster.name
        if not cluster.try_acquire_pending():
            self.answer(503, f"service {cluster.name}: too many pending requests")
            return
        self.pending = True
        hash_on = cluster.hash_on
        if hash_on is not None:
            self.hash_key = hash_key(hash_on, head, client.peer_ip)
        self.up_head = self._upstream_head()
        if self.req_done:
            self.done_at = t0
        self.attempt(False, None, t0)

    def _upstream_head(self) -> bytes:
        """The request head for the upstream. Its request line and fixed field lines are
        built once per head and kept on the (memoised) head: ``up_line`` (request line and
        the fields before the per-request ones) and ``up_post`` (the fields after them);
        the field lines are shared by the copies of a head made for other targets (see
        _framing's head memo). A route that strips a prefix from the target builds its
        request line per request. Per request: X-Forwarded-For with X-Forwarded-Proto
        (per connection: http or https) and X-Request-Id, in one join."""
        head = self.head
        line = head.up_line
        route = self.route
        if line is None or (route is not None and route.strip_prefix):
            fields = head.up_fields
            if fields is None:
                fields, head.up_post = upstream_parts(head)
                head.up_fields = fields
            if route is not None and route.strip_prefix:
                line = b"".join((head.method, b" ", strip_prefix(head.target, route.prefix), b" HTTP/1.1\r\n", fields))
            else:
                line = head.up_line = b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\n", fields))
        xff = self.client.xff_line if head.xff is None else b"x-forwarded-for: " + head.xff + self.client.xff_tail
        if head.request_id is None:
            server = self.server
            return b"".join((line, xff, server.rid_line, b"%x\r\n" % next(server.rid_counter), head.up_post))
        return b"".join((line, xff, head.up_post))

    # -- attempts ----------------------------------------------------------------------

    def attempt(self, fresh: bool = False, ep: Any = None, now: float = 0.0) -> None:
        cluster = self.cluster
        if ep is None:
            tried = self.tried
            if tried is None and not self.stale_retry:
                ep = cluster.pick(self.hash_key)
            else:
                cluster = self._current_cluster()
                ep = cluster.pick(self.hash_key, tried) if tried else cluster.pick(self.hash_key)
        if ep is None:
            if self.retries == 0 and self.connect_fails == 0 and not self.stale_retry:
                self.answer(503, f"no ready instance of service {cluster.name}")
            else:
                self.answer(*self._failure_answer())
            return
        cluster.begin(ep)
        self.ep = ep
        server = self.server
        if not now:
            now = server.loop.time()
        self.ep_t0 = now
        pool = server.pools.get(ep.id)
        if pool is None or pool.retired or pool.port != ep.port or pool.address != ep.address:
            pool = server.pool_for(ep, cluster)
        if not fresh and pool.idle:
            conn = pool.idle.pop()  # most recently used first
            if conn.closed or conn.transport.is_closing():
                conn = pool.acquire()
            if conn is not None:
                self.attach(conn, now)
                return
        self.state = CONNECTING
        self.connect_deadline = now + cluster.settings.timeouts.connect
        self._arm()
        self.connect_task = pool.connect(self._connected)

    def _connected(self, task: Any) -> None:
        if self.connect_task is not task:
            # This attempt was abandoned (time-out, client gone): keep a good connection.
            if not task.cancelled() and task.exception() is None:
                conn = task.result()[1]
                conn.pool.release(conn, self.server.loop.time())
            return
        self.connect_task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failure_note = f"connect to {self.ep.address}:{self.ep.port} failed: {os_error(exc)}"
            self.attempt_failed("connect", None)
            self.client.flush()
            return
        conn = task.result()[1]
        self.attach(conn, self.server.loop.time())
        self.flush_upstream()

    def attach(self, conn: UpstreamConnection, now: float) -> None:
        """Send the request (head and what we have of the body) on ``conn``."""
        self.conn = conn
        conn.owner = self  # (UpstreamConnection.start, inlined on the hot path)
        conn.uses += 1
        conn.in_head = conn.in_body = conn.final_done = False
        conn.head_len = 0
        conn.head_request = self.head_request
        self.state = SENDING
        body = self.body
        chunked = self.head.framing == CHUNKED
        if body or chunked:
            pieces = [self.up_head]
            if body:
                for piece in body:
                    if chunked:
                        pieces += (chunk_header(len(piece)), piece, CRLF)
                    else:
                        pieces.append(piece)
                if self.body_len > REPLAY_LIMIT:
                    self.replayable = False
                    self.body = None
            if self.req_done and chunked:
                pieces.append(trailer_block(self.req_trailers))
            self._send_up(b"".join(pieces))
        elif self.client.feeding:
            self.up_out.append(self.up_head)
        else:
            self.sent_upstream = True  # (_send_up, inlined)
            conn.transport.write(self.up_head)  # type: ignore[union-attr]
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        if client.pause_flags & 4:
            client.resume(4)  # PAUSE_CONNECT: body may flow again
        if self.req_done:
            client.deadline = self._set_try_deadline(now, self.cluster)
        else:
            self.last_io = now
            client.deadline = now + self.cluster.idle_timeout

    def _send_up(self, data: bytes) -> None:
        """Request bytes for the upstream. While the client's parser runs they are gathered
        and written once at the end (:meth:`flush_upstream`): one system call for head and
        body, and nothing leaves at all if the same bytes turn out to be malformed."""
        if self.client.feeding:
            self.up_out.append(data)
        else:
            self.sent_upstream = True
            self.conn.transport.write(data)  # type: ignore[union-attr]

    def flush_upstream(self) -> None:
        out = self.up_out
        if out:
            self.up_out = []
            conn = self.conn
            if conn is not None and not conn.closed:
                self.sent_upstream = True
                if len(out) == 1:
                    conn.transport.write(out[0])  # type: ignore[union-attr]
                else:
                    conn.transport.writelines(out)  # type: ignore[union-attr]

    def attempt_failed(self, failure: str | None, status: int | None, nxt: Any = None) -> None:
        """The current attempt failed before any response byte reached the client."""
        cluster = self.cluster
        ep = self.ep
        now = self.server.loop.time()
        conn = self.conn
        stale = (failure == "reset" and conn is not None and conn.uses > 1 and not self.stale_retry
                 and self.replayable and self.resp is None)
        if conn is not None:
            self.conn = None
            conn.abort() if failure else conn.close()
        if self.connect_task is not None:
            task, self.connect_task = self.connect_task, None
            task.cancel()
        if stale:
            # A pooled connection the server had closed: not the endpoint's fault. Retry
            # once on a fresh connection, outside the retry budget.
            cluster.end(ep, status=None, failure=None, latency=now - self.ep_t0)
            self.stale_retry = True
            self.ep = None
            self._end_retry()
            self.attempt(fresh=True)
            return
        cluster.end(ep, status=status, failure=failure, latency=now - self.ep_t0)
        self._end_retry()
        self.ep = None
        self.status = status or 0
        time_left = self._time_left(now)
        if self.hedge is not None and time_left > 0:
            self._promote_hedge()  # the earlier attempt is still out there: wait for it
            return
        if failure == "connect":
            self.connect_fails += 1
        # A connect failure reached no upstream, so retrying it adds no load anywhere: it
        # is exempt from the retry budget (Envoy counts it; a kill -9 of one instance under
        # load would otherwise turn the budget's excess into client-visible 502s).
        if (retry_decision(failure=failure, status=status, idempotent=self.head.idempotent,
                           replayable=self.replayable, response_started=self.resp is not None,
                           retries=self.retries, max_retries=cluster.settings.retries.attempts,
                           time_left=time_left, connect_failures=self.connect_fails,
                           endpoints=len(cluster.endpoints))
                and (failure == "connect" or cluster.retry_allowed())):
            tried = self.tried
            if tried is None:
                tried = self.tried = set()
            tried.add(ep.id)
            if failure == "connect":
                # Every endpoint had its try: start over (a stall may be over), except
                # on the one that just failed when there is another.
                routable = self._current_cluster().routable
                if all(e.id in tried for e in routable):
                    tried.clear()
                    if len(routable) > 1:
                        tried.add(ep.id)
            else:
                self.retries += 1
                self.retrying = True
                cluster.retry_begin()
            self.server.metrics.retry(self.service)
            self.attempt(ep=nxt)
            return
        self.answer(*self._failure_answer(failure))

    def _end_retry(self) -> None:
        if self.retrying:
            self.retrying = False
            self.cluster.retry_end()

    def _time_left(self, now: float) -> float:
        if not self.req_done:
            return 1.0  # the overall clock starts when the request is complete
        limit = self.cluster.settings.timeouts.request
        return self.done_at + limit - now if limit > 0 else INF  # 0: no overall time-out

    def _failure_answer(self, failure: str | None = None) -> tuple[int, str]:
        name = self.service
        if failure == "timeout" or self.timed_out:
            return 504, f"timed out waiting for service {name} ({self.failure_note})"
        note = self.failure_note or "connection reset before any response"
        return 502, f"upstream of service {name} failed: {note}"

    # -- request body from the client ----------------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.state == DONE:
            return
        conn = self.conn
        if conn is not None and self.state >= SENDING:  # also while an early response streams
            if self.head.framing == CHUNKED:
                self._send_up(chunk_header(len(data)))
                self._send_up(data)
                self._send_up(CRLF)
            else:
                self._send_up(data)
            self.last_io = self.server.loop.time()
            if self.replayable:
                self.body_len += len(data)
                if self.body_len > REPLAY_LIMIT:
                    self.replayable = False
                    self.body = None
                else:
                    if self.body is None:
                        self.body = []
                    self.body.append(data)
            return
        # Not attached yet (routing, connecting, between attempts): keep it; stop reading
        # past the replay limit until an upstream takes it.
        if self.body is None:
            self.body = []
        self.body.append(data)
        self.body_len += len(data)
        if self.body_len > REPLAY_LIMIT:
            self.client.pause(4)  # PAUSE_CONNECT

    def request_complete(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.req_done = True
        if self.state == DONE:
            return
        self.req_trailers = trailers
        now = self.server.loop.time() if self.t0 else 0.0
        self.done_at = now
        conn = self.conn
        if conn is not None and self.state >= SENDING:
            if self.head.framing == CHUNKED:
                self._send_up(trailer_block(trailers))
            if self.state == SENDING:
                self._set_try_deadline(now, self.cluster)
                self._arm()

    def request_broken(self, status: int, reason: str) -> None:
        """The client's request body turned out malformed (e.g. a bad chunk size): nothing
        more of it is forwarded and the upstream attempt is abandoned."""
        if self.state == DONE:
            return
        self.replayable = False
        self.req_done = True
        if self.resp is not None:
            self._abort_midstream(None)
            return
        conn = self.conn
        self.up_out = []
        if conn is not None and not self.sent_upstream:
            # Nothing of this request reached the upstream: its connection stays good.
            self.conn = None
            conn.pool.release(conn, self.server.loop.time())
        self.answer(status, reason, force_close=True)

    def _abort_midstream(self, failure: str | None) -> None:
        """The response had started: the client can only learn of it by the connection
        closing early."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        now = self.server.loop.time()
        if self.ep is not None:
            self.cluster.end(self.ep, status=None, failure=failure, latency=now - self.ep_t0)
            self.ep = None
        self._end_retry()
        self.finish(True, abort=True)

    # -- time-outs ---------------------------------------------------------------------

    def _arm(self) -> None:
        """Set the client connection's deadline to this exchange's next one."""
        state = self.state
        settings = self.cluster.settings if self.cluster is not None else None
        if settings is None:
            return
        limit = settings.timeouts.request
        if state == CONNECTING:
            d = self.connect_deadline
            if self.req_done and limit > 0:
                d = min(d, self.done_at + limit)
        elif state == SENDING:
            if self.req_done:
                d = self.done_at + limit if limit > 0 else INF
                if self.try_deadline:
                    d = min(d, self.try_deadline)
            else:
                d = self.last_io + settings.timeouts.idle
        elif state == RESPONDING:
            d = self.last_io + settings.timeouts.idle
        else:
            return
        self.client.deadline = d

    def on_deadline(self, now: float) -> None:
        state = self.state
        settings = self.cluster.settings if self.cluster is not None else None
        if settings is None or state == DONE:
            return
        if state == RESPONDING:
            last = max(self.last_io, self.client.last_io)
            if now - last >= settings.timeouts.idle:
                if self._retract():  # a held response: nothing of it reached the client
                    self.failure_note = f"response from {self.ep.address}:{self.ep.port} stalled"
                    self.timed_out = True
                    self.attempt_failed("timeout", None)
                    return
                log.info("%s: response idle for %.1fs; closing", self.service, now - last)
                self._abort_midstream("timeout")
            else:
                self.client.deadline = last + settings.timeouts.idle
            return
        overall_left = self._time_left(now)
        if state == CONNECTING:
            if overall_left <= 0 or now >= self.connect_deadline:
                self.failure_note = f"connect to {self.ep.address}:{self.ep.port} timed out"
                self.timed_out = True
                self.attempt_failed("timeout" if overall_left <= 0 else "connect", None)
                return
        elif state == SENDING:
            if not self.req_done:
                last = max(self.last_io, self.client.last_io)
                if now - last >= settings.timeouts.idle:
                    self.failure_note = "request body idle; timed out"
                    self.answer(408, "timed out reading the request body")
                    return
                self.client.deadline = last + settings.timeouts.idle
                return
            if overall_left > 0 and self.try_hedges and self.try_deadline and now >= self.try_deadline:
                self._hedge(now)
                self._arm()
                return
            if overall_left <= 0 or (self.try_deadline and now >= self.try_deadline):
                self.failure_note = "no response in time"
                self.timed_out = True
                if overall_left <= 0:
                    self.retries = 1 << 30  # no time left for another try
                self.attempt_failed("timeout", None)
                return
        self._arm()

    # -- the end -------------------------------------------------------------------------

    def answer(self, status: int, text: str, force_close: bool = False) -> None:
        """Write a generated answer (the response has not started) and finish."""
        if self.state == DONE:
            return
        if self.resp is not None:
            self._abort_midstream("reset")
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.connect_task is not None:
            task, self.connect_task = self.connect_task, None
            task.cancel()
        if self.ep is not None:
            now = self.server.loop.time()
            self.cluster.end(self.ep, status=None, failure=None, latency=now - self.ep_t0)
            self.ep = None
            self._end_retry()
        head = self.head
        client = self.client
        close = (force_close or not (self.req_done and head.keep_alive) or client.draining
                 or head.upgrade is not None or (client.dead and not client.queue))
        self.status = status
        self.client.send(generated(status, text, close=close, head=self.head_request,
                                   extra=b"" if close or head.version == 11 else b"connection: keep-alive\r\n"))
        self.finish(close)

    def finish(self, close: bool, abort: bool = False, tunnel: Any = None, now: float = 0.0) -> None:
        if self.state == DONE:
            return
        self.state = DONE
        if self.hedge is not None:
            self.drop_hedge()
        self.client.hold = False
        server = self.server
        if self.pending:
            self.pending = False
            self.cluster.release_pending()
        if not now:
            now = server.loop.time()
        latency = now - self.t0
        status = self.status if not abort else (self.status or 502)
        server.metrics.active_requests.value -= 1
        server.metrics.request_done(self.service, status, latency)
        if server.access_log is not None:
            server.access_log(self, now, latency, abort)
        self.client.exchange_done(self, close, abort, tunnel, now)

    def client_gone(self) -> None:
        """The client connection closed before the response was complete."""
        if self.state == DONE:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.connect_task is not None:
            task, self.connect_task = self.connect_task, None
            task.cancel()
        if self.ep is not None:
            now = self.server.loop.time()
            self.cluster.end(self.ep, status=None, failure=None, latency=now - self.ep_t0)
            self.ep = None
        if self.hedge is not None:
            self.drop_hedge()
        self._end_retry()
        self.state = DONE
        if self.pending:
            self.pending = False
            self.cluster.release_pending()
        server = self.server
        server.metrics.active_requests.value -= 1
        server.metrics.request_done(self.service, 499, server.loop.time() - self.t0)
