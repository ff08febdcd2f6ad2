"""The nodes as the supervisor sees them: health from each engine, an operator's cordon
and drain from the catalog, and what the node sides (``meshlet node``) report.

``NodeMonitor`` asks every node's runtime for its health (``Runtime.health``: engine
answers, event stream alive, CPUs and memory) every ``every`` seconds, folds each answer
into ``core.nodes.observe`` with the grace period, and reports transitions through
``on_change(node, before, after)``. It watches ``meshlet/nodes/`` for cordon and drain,
and ``meshlet/node-sides/`` for the proxies of the other hosts (their admin addresses,
which a retired replica waits on). ``infos()`` is what placement and reconcile see.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import config
from discovery.consul import kv_put, watch_kv_prefix

from ..core.nodes import NodeControl, NodeHealth, availability, control_doc, observe, parse_control
from ..core.placement import NodeInfo, node_info
from ..runtime import Runtime, WorkloadError

__all__ = ["NodeMonitor", "PROBE_EVERY", "PROBE_TIMEOUT"]

log = logging.getLogger("supervisor.nodes")

PROBE_EVERY = 2.0        # seconds between two looks at each engine
PROBE_TIMEOUT = 5.0      # an engine that takes longer to answer counts as not answering


class NodeMonitor:
    def __init__(self, nodes: Mapping[str, config.NodeSpec], runtimes: Mapping[str, Runtime], client: Any, *,
                 grace: float, on_change: Callable[[str, NodeHealth, NodeHealth], None],
                 on_control: Callable[[str], None], on_sides: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time,
                 every: float = PROBE_EVERY, timeout: float = PROBE_TIMEOUT) -> None:
        self.nodes, self.runtimes, self.client = nodes, runtimes, client
        self.grace, self.every, self.timeout, self.clock = grace, every, timeout, clock
        self.on_change, self.on_control, self.on_sides = on_change, on_control, on_sides
        self.health: dict[str, NodeHealth] = {name: NodeHealth() for name in nodes}
        self.control: dict[str, NodeControl] = {name: NodeControl() for name in nodes}
        self.sides: dict[str, dict[str, Any]] = {}     # host -> its `meshlet node` document
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._probe_loop(), name="node health"),
                       asyncio.create_task(self._watch_control(), name="node control"),
                       asyncio.create_task(self._watch_sides(), name="node sides")]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- what the core sees -------------------------------------------------------------

    def info(self, name: str) -> NodeInfo:
        h, c = self.health[name], self.control[name]
        return node_info(self.nodes[name], cpu=h.cpu, memory=h.memory, unavailable=availability(h, c),
                         lost=h.lost, draining=c.draining and h.reachable)

    def infos(self) -> tuple[NodeInfo, ...]:
        return tuple(self.info(name) for name in self.nodes)

    def state(self, name: str) -> dict[str, Any]:
        """For status: ready | unreachable | lost, since when and why; cordoned, draining."""
        h, c = self.health[name], self.control[name]
        return {"state": "lost" if h.lost else "ready" if h.reachable else "unreachable",
                "since": h.since, "error": h.error, "cordoned": c.cordoned, "draining": c.draining}

    def proxy_admins(self) -> list[str]:
        return [a for doc in self.sides.values() if isinstance(a := doc.get("proxy_admin"), str)]

    # --- an operator's say --------------------------------------------------------------

    async def set_control(self, name: str, control: NodeControl) -> None:
        """Store cordon/drain of ``name`` in the catalog (the watch applies it here too)."""
        await kv_put(self.client, config.node_key(name), control_doc(control, self.clock()))
        self._apply_control(name, control)

    def _apply_control(self, name: str, control: NodeControl) -> None:
        if name in self.control and self.control[name] != control:
            self.control[name] = control
            log.info("node %s: %s", name, "draining" if control.draining else
                     "cordoned" if control.cordoned else "uncordoned")
            self.on_control(name)

    async def load(self) -> None:
        """Read cordon/drain and the node sides once (before the first reconcile)."""
        _, entries = await self.client.kv.get(config.NODES_PREFIX, recurse=True)
        docs = {e["Key"]: e.get("Value") or b"" for e in entries or ()}
        for name in self.nodes:
            self.control[name] = parse_control(docs.get(config.node_key(name)))
        _, entries = await self.client.kv.get(config.NODE_SIDES_PREFIX, recurse=True)
        self._set_sides({e["Key"]: e.get("Value") or b"" for e in entries or ()})

    async def _watch_control(self) -> None:
        async for docs in watch_kv_prefix(self.client, config.NODES_PREFIX):
            for name in self.nodes:
                self._apply_control(name, parse_control(docs.get(config.node_key(name))))

    async def _watch_sides(self) -> None:
        async for docs in watch_kv_prefix(self.client, config.NODE_SIDES_PREFIX):
            self._set_sides(docs)

    def _set_sides(self, docs: Mapping[str, bytes]) -> None:
        sides = {}
        for key, raw in docs.items():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                sides[key[len(config.NODE_SIDES_PREFIX):]] = doc
        if sides != self.sides:
            self.sides = sides
            self.on_sides()

    # --- health -------------------------------------------------------------------------

    async def check(self, name: str) -> NodeHealth:
        """One look at ``name``'s engine; returns (and keeps) its new health."""
        before = self.health[name]
        try:
            cap = await self.runtimes[name].health(timeout=self.timeout)
            after = observe(before, True, self.clock(), self.grace, cpu=cap.cpu, memory=cap.memory)
        except (WorkloadError, OSError, asyncio.TimeoutError) as exc:
            after = observe(before, False, self.clock(), self.grace, error=str(exc) or type(exc).__name__)
        self.health[name] = after
        if (before.reachable, before.lost) != (after.reachable, after.lost):
            self.on_change(name, before, after)
        return after

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(name) for name in self.nodes))

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next look tries again
                log.exception("node health check failed")
            await asyncio.sleep(self.every)
