"""Hedging: a safe request whose response head is late is sent to a second endpoint.

:class:`Hedging` is a base of :class:`proxy._exchange.Exchange` (which holds the state:
``hedge``, ``hedge_ep``, ``hedge_t0``, ``hedged``). When ``HEDGE_AFTER`` passes without a
response head on a route without ``per_try_timeout`` (see ``Exchange._set_try_deadline``),
the current attempt is parked as ``hedge`` and a new one starts on another endpoint. The
first response head wins: from the new attempt (the hedge is dropped) or from the parked
one (``hedge_answered``: the new attempt is abandoned and the parked one becomes current).
If the new attempt fails first, the parked one is waited for again (``_promote_hedge``).
Every end of the exchange drops a hedge still parked. Envoy: ``hedge_on_per_try_timeout``.
Also here: arming an attempt's per-try deadline (``per_try_timeout`` or ``HEDGE_AFTER``),
and the current table's cluster for a retry or hedge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._decisions import HEDGE_AFTER, SAFE_METHODS, hedge_decision
from ._relay import SENDING

if TYPE_CHECKING:  # pragma: no cover
    from ._upstream import UpstreamConnection

__all__ = ["Hedging"]

INF = float("inf")


class Hedging:
    """Hedging methods of an exchange (no state of its own)."""

    __slots__ = ()
    # Provided by Exchange:
    server: Any
    head: Any
    cluster: Any
    conn: Any
    ep: Any
    ep_t0: float
    state: int
    resp: Any
    replayable: bool
    retries: int
    retrying: bool
    tried: Any
    hash_key: Any
    service: str
    try_deadline: float
    connect_task: Any
    hedge: Any
    hedge_ep: Any
    hedge_t0: float
    hedged: bool
    try_hedges: bool
    done_at: float

    def _set_try_deadline(self, now: float, cluster: Any) -> float:
        """Arm this attempt's per-try deadline (the request is complete upstream) and
        return the earlier of it and the overall deadline. ``per_try_timeout`` aborts the
        attempt; without one, a safe request is hedged after ``HEDGE_AFTER``. ``cluster``:
        this exchange's, whose settings apply."""
        limit = cluster.request_timeout
        d = self.done_at + limit if limit > 0 else INF
        ptt = cluster.per_try_timeout
        if ptt > 0:
            self.try_hedges = False
            t = self.try_deadline = now + ptt
        elif not self.hedged and cluster.retry_attempts and self.head.method in SAFE_METHODS:
            self.try_hedges = True
            t = self.try_deadline = now + HEDGE_AFTER
        else:
            self.try_deadline = 0.0
            return d
        return t if t < d else d

    def _current_cluster(self) -> Any:
        """For a retry: the service's cluster in the current table (endpoints that left
        the catalog since the request began are not tried again), else the one it began with."""
        cluster = self.cluster
        table = self.server.table
        if table is not None:
            cur = table.clusters.get((cluster.name, cluster.port_name))
            if cur is not None and cur is not cluster:
                self.cluster = cluster = cur
        return cluster

    def _hedge(self, now: float) -> None:
        """``HEDGE_AFTER`` passed without a response head: send the request to another
        endpoint too, keep the current attempt (``hedge``), and take the first response
        head. When no other attempt may start, keep waiting."""
        self.try_deadline = 0.0
        cluster = self.cluster
        settings = cluster.settings
        if not hedge_decision(safe=True, replayable=self.replayable, response_started=self.resp is not None,
                              upgrade=self.head.upgrade is not None, hedged=self.hedged,
                              retries=self.retries, max_retries=settings.retries.attempts,
                              time_left=self._time_left(now)):
            return
        cluster = self._current_cluster()
        exclude = {self.ep.id} if self.tried is None else self.tried | {self.ep.id}
        nxt = cluster.pick(self.hash_key, exclude)
        if nxt is None or not cluster.retry_allowed():
            return
        self.hedged = True
        self.hedge, self.hedge_ep, self.hedge_t0 = self.conn, self.ep, self.ep_t0
        self.conn = None
        self.ep = None
        if self.tried is None:
            self.tried = set()
        self.tried.add(self.hedge_ep.id)
        self.retries += 1
        self.retrying = True
        cluster.retry_begin()
        self.server.metrics.retry(self.service)
        self.attempt(ep=nxt, now=now)

    def _promote_hedge(self) -> None:
        """The later attempt failed or was given up: wait for the earlier one again."""
        self.conn, self.ep, self.ep_t0 = self.hedge, self.hedge_ep, self.hedge_t0
        self.hedge = self.hedge_ep = None
        self.state = SENDING
        self.try_deadline = 0.0
        self._arm()

    def hedge_answered(self, conn: UpstreamConnection) -> bool:
        """The earlier attempt's response head came first: it wins, the later one ends."""
        if conn is not self.hedge:
            return False
        now = self.server.loop.time()
        cur, self.conn = self.conn, None
        if cur is not None:
            cur.abort()
        if self.connect_task is not None:
            task, self.connect_task = self.connect_task, None
            task.cancel()
        if self.ep is not None:
            self.cluster.end(self.ep, status=None, failure=None, latency=now - self.ep_t0)
        self.conn, self.ep, self.ep_t0 = conn, self.hedge_ep, self.hedge_t0
        self.hedge = self.hedge_ep = None
        self.state = SENDING
        return True

    def drop_hedge(self, failure: str | None = None) -> None:
        """End the earlier attempt (the other one answered, the exchange ended, or it failed)."""
        conn, self.hedge = self.hedge, None
        if conn is not None:
            conn.abort()
            ep, self.hedge_ep = self.hedge_ep, None
            self.cluster.end(ep, status=None, failure=failure, latency=self.server.loop.time() - self.hedge_t0)
