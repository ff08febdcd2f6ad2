"""The response half of an exchange: what the upstream answers, relayed to the client.

:class:`Relay` is the base of :class:`proxy._exchange.Exchange` (which defines the state
and the attempts); it holds the methods the upstream connection calls: interim and final
response heads, body, completion, upgrade, loss and invalid bytes. A response head is
checked once (memoised, :func:`proxy._framing.response_head`) and the client's head built
once per upstream head and variant (:func:`proxy._decisions.client_head`). A 502/503/504
to an idempotent request is retried on another endpoint when one is there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._decisions import client_head
from ._framing import (_RESPONSES, CHUNKED, CRLF, LAST_CHUNK, LENGTH, UNTIL_CLOSE, HeadError, response_head,
                       status_line, trailer_block)

if TYPE_CHECKING:  # pragma: no cover
    from ._upstream import UpstreamConnection

__all__ = ["Relay", "ROUTING", "CONNECTING", "SENDING", "RESPONDING", "DONE"]

# Exchange states
ROUTING, CONNECTING, SENDING, RESPONDING, DONE = range(5)
# A Content-Length response up to this size is relayed only once complete: if its upstream
# dies mid-body (a kill between a server's head and body writes), nothing has reached the
# client and the request is retried elsewhere, instead of the client getting a truncated
# response. Larger ones stream as they come (bounded memory).
HOLD_LIMIT = 64 * 1024


class Relay:
    """Response-side methods of an exchange (no state of its own)."""

    __slots__ = ()
    # Provided by Exchange:
    client: Any
    server: Any
    head: Any
    cluster: Any
    conn: Any
    ep: Any
    ep_t0: float
    state: int
    status: int
    resp: Any
    req_done: bool
    replayable: bool
    retries: int
    retrying: bool
    tried: Any
    hash_key: Any
    head_request: bool
    failure_note: str
    resp_mark: tuple[int, int]
    hedge: Any
    out_framing: int
    close_after: bool
    last_io: float
    bytes_out: int

    def response_interim(self, conn: UpstreamConnection, status: int, headers: list) -> None:
        """A 1xx other than 101: relayed to HTTP/1.1 clients (100 Continue, 103 Early Hints)."""
        if self.head.version == 11 and self.resp is None and conn is self.conn:
            parts = [status_line(status)]
            for name, value in headers:
                if name.lower() not in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length"):
                    parts += (name, b": ", value, CRLF)
            parts.append(CRLF)
            self.client.send(b"".join(parts))

    def response_head(self, conn: UpstreamConnection, status: int, version: str, headers: list) -> None:
        if conn is not self.conn:
            if not self.hedge_answered(conn):
                conn.close()
                return
        elif self.hedge is not None:
            self.drop_hedge()  # this attempt answered first
        try:
            resp = _RESPONSES.get((status, version, self.head_request, *headers))  # the memo, inline
            if resp is None:
                resp = response_head(status, version, headers, self.head_request)
        except HeadError as exc:
            conn.poisoned = True
            self.failure_note = exc.reason
            self.attempt_failed(None, 502)
            return
        head = self.head
        if status >= 502 and status <= 504 and head.idempotent and self.replayable and self._retry_elsewhere(status):
            conn.poisoned = True  # we do not read the rest of this answer
            return
        if status == 101 and head.upgrade is None:
            conn.poisoned = True
            self.failure_note = "upstream switched protocols without being asked"
            self.attempt_failed(None, 502)
            return
        self.resp = resp
        self.state = RESPONDING
        self.status = status
        client = self.client
        keep = head.keep_alive and self.req_done and not client.draining and head.upgrade is None
        variant = head.version << 1 | keep   # (resp is of one status: it is part of the memo's key)
        out = resp.outs.get(variant)
        if out is None:
            out = client_head(resp, status, head, keep)
            if status != 101:  # a 101's head carries the request's Upgrade value
                resp.outs[variant] = out
        self.resp_mark = (client.flushes, len(client.out))
        if resp.framing == LENGTH and resp.content_length <= HOLD_LIMIT:
            client.hold = True  # until complete: an upstream dying mid-body can still be retried
        client.out.append(out[0])
        self.out_framing = out[1]
        self.close_after = out[2]
        self.last_io = now = self.server.loop.time()
        client.deadline = now + self.cluster.idle_timeout

    def fast_response(self, conn: UpstreamConnection, resp: Any, data: bytes, start: int) -> bool:
        """A whole response in one read whose head is known by its bytes (``resp``, see
        _framing's raw-bytes memo: a validated Content-Length response, not a 1xx, 204,
        304 or 502-504): relay head and body and complete, as response_head, on_body
        and response_complete would. False when this exchange is not in the plain state
        that allows it (the caller then parses as usual)."""
        if self.state != SENDING or conn is not self.conn or not self.req_done or self.hedge is not None:
            return False
        head = self.head
        status = resp.status
        self.resp = resp
        self.state = RESPONDING
        self.status = status
        client = self.client
        keep = head.keep_alive and not client.draining and head.upgrade is None
        variant = head.version << 1 | keep
        out = resp.outs.get(variant)
        if out is None:
            out = resp.outs[variant] = client_head(resp, status, head, keep)
        body = data[start:]
        client.out += (out[0], body)
        self.bytes_out += len(body)
        self.out_framing = out[1]
        self.close_after = out[2]
        self._complete(conn, client)  # (response_complete's checks hold: RESPONDING, not 101, not chunked)
        client.flush()
        return True

    def _retry_elsewhere(self, status: int) -> bool:
        """A 502/503/504 for an idempotent request: retry it on another endpoint if the
        budget, the attempts and the time allow and there is one; else it is the answer."""
        cluster = self._current_cluster()
        now = self.server.loop.time()
        if (self.retries < cluster.settings.retries.attempts and self._time_left(now) > 0
                and cluster.retry_allowed()):
            exclude = {self.ep.id} if self.tried is None else self.tried | {self.ep.id}
            nxt = cluster.pick(self.hash_key, exclude)
            if nxt is not None:
                self.failure_note = f"answered {status}"
                self.attempt_failed(None, status, nxt)
                return True
        return False

    def response_body(self, data: bytes) -> None:
        if self.state != RESPONDING:
            return
        self.bytes_out += len(data)
        self.last_io = self.server.loop.time()
        if self.out_framing == CHUNKED:
            self.client.send_chunk(data)
        else:
            self.client.send(data)

    def response_complete(self, conn: UpstreamConnection) -> None:
        """The upstream's final response is complete (after its parser returned)."""
        if self.state != RESPONDING or self.status == 101:
            return
        client = self.client
        if self.out_framing == CHUNKED:
            client.out.append(trailer_block(conn.trailers))
        self._complete(conn, client)

    def _complete(self, conn: UpstreamConnection, client: Any) -> None:
        """The response is complete: the connection back to its pool, the endpoint's
        stats, then the exchange's end."""
        client.hold = False
        now = self.server.loop.time()
        self.conn = None
        if self.req_done and self.resp.keep_alive:
            pool = conn.pool
            if not (conn.poisoned or conn.closed or conn.reading_paused or pool.retired
                    or len(pool.idle) >= pool.max_idle):
                conn.owner = None  # (Pool.release, inlined on the hot path)
                conn.idle_since = now
                pool.idle.append(conn)
            else:
                pool.release(conn, now)
        else:
            conn.close()
        self.cluster.answered(self.ep, self.status, now - self.ep_t0)
        if self.retrying:
            self._end_retry()
        self.finish(self.close_after, False, None, now)

    def response_upgraded(self, conn: UpstreamConnection) -> bool:
        """The upstream switched protocols (101): tunnel the two connections."""
        if self.state != RESPONDING or self.status != 101:
            conn.close()
            return False
        now = self.server.loop.time()
        self.conn = None
        conn.owner = None
        self.cluster.end(self.ep, status=101, failure=None, latency=now - self.ep_t0)
        self._end_retry()
        self.client.flush()
        self.finish(False, tunnel=conn)
        return True

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed while this exchange owned it."""
        if conn is not self.conn:
            if conn is self.hedge:
                self.drop_hedge("reset")
            return
        if self.state == RESPONDING:
            if self.resp.framing == UNTIL_CLOSE and exc is None:
                self.conn = None
                conn.owner = None
                if self.out_framing == CHUNKED:
                    self.client.send(LAST_CHUNK)
                now = self.server.loop.time()
                self.cluster.end(self.ep, status=self.status, failure=None, latency=now - self.ep_t0)
                self._end_retry()
                self.finish(self.close_after)
            elif self._retract():
                self.failure_note = f"connection to {self.ep.address}:{self.ep.port} lost before the whole response"
                if not self.head.idempotent:
                    self.replayable = False  # it was processed: a 502, never a second try
                self.attempt_failed("reset", None)
            else:
                self._abort_midstream("reset")
            self.client.flush()
            return
        self.failure_note = f"connection to {self.ep.address}:{self.ep.port} lost before any response"
        self.attempt_failed("reset", None)
        self.client.flush()

    def upstream_failed(self, conn: UpstreamConnection, failure: str, note: str) -> None:
        """Invalid bytes from the upstream: close it; 502 (or abort, if the response
        had started)."""
        if conn is not self.conn:
            if conn is self.hedge:
                self.drop_hedge("reset")
            else:
                conn.close()
            return
        self.failure_note = note
        conn.poisoned = True
        if self.state == RESPONDING and not self._retract():
            self._abort_midstream("reset")  # the client has bytes of this response already
            return
        self.attempt_failed(None, 502)

    def _retract(self) -> bool:
        """Take back the response begun (nothing of it has left for the client yet), so
        the attempt counts as failed before any response byte; False if bytes left."""
        client = self.client
        flushes, mark = self.resp_mark
        if client.flushes != flushes:
            return False
        del client.out[mark:]
        client.hold = False
        self.resp = None
        self.state = SENDING
        self.status = 0
        self.bytes_out = 0
        return True
