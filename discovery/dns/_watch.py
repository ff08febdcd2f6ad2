"""The catalog watch on a thread of its own, so a catalog change never stalls answering.

A change costs the DNS server ~1 ms of Python (measured with py-spy under the bench's
churn: ~0.75 ms for the blocking query's round trip through aiohttp and py-consul, ~0.35 ms
to build the View and the zone). On the answering loop that is ~10 queries at 10k QPS
held up per change: the whole of p99 latency under churn. Here the Mirror runs on its own
event loop in a daemon thread and the zone is built there too (``Engine.prepare`` is
pure); the answering loop only swaps the finished zone in and drops the cached answers it
changed (``Engine.commit``, microseconds).

The two threads share the GIL. The interpreter hands it over every
``sys.getswitchinterval()`` seconds (5 ms by default), which would turn the watch's work
back into answering stalls of up to 5 ms; ``SWITCH_INTERVAL`` makes the watch thread give
way within 0.2 ms when a query is waiting. With nothing to do the watch thread sleeps in
its own poll and costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from discovery.view import View

from ._engine import Engine, Update

__all__ = ["CatalogThread", "SWITCH_INTERVAL"]

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0002


class CatalogThread:
    """``start()`` (on the answering loop) returns once the catalog answered and the
    engine serves the first View's zone (``MirrorError`` when the catalog does not answer
    within ``timeout``); every later change reaches ``engine.commit`` on the answering
    loop, in order (one channel, ``call_soon_threadsafe``, for the first zone and the rest).
    ``close()`` stops the thread."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url, self.engine = url, engine
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[View] | None = None
        self._thread = threading.Thread(target=self._run, name="catalog watch", daemon=True)
        self._timeout = 10.0
        self._prepared = engine.zone
        self._started = False

    async def start(self, timeout: float = 10.0) -> View:
        self._main = asyncio.get_running_loop()
        self._first = self._main.create_future()
        self._timeout = timeout
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread.start()
        return await self._first

    async def close(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the thread's loop is already closed
                pass
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # -- the watch thread

    def _to_main(self, fn: object, *args: object) -> None:
        assert self._main is not None
        try:
            self._main.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]
        except RuntimeError:  # the answering loop has closed: shutting down
            pass

    def _run(self) -> None:
        import uvloop

        try:
            uvloop.run(self._watch())
        except asyncio.CancelledError:
            pass                                           # close()
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._started:
                self._to_main(self._fail, exc)
            else:
                log.exception("the catalog watch thread stopped")

    async def _watch(self) -> None:
        from discovery.consul import Mirror

        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        mirror = Mirror(self.url, on_change=self._changed)
        try:
            await mirror.start(self._timeout)          # MirrorError goes to start()
            view = mirror.view
            self._started = True
            update = self.engine.prepare(view, self._prepared)
            if update is not None:
                self._prepared = update.zone
            self._to_main(self._commit_first, update, view)
            await asyncio.Event().wait()               # until close() cancels this task
        finally:
            await mirror.close()

    def _changed(self, view: View) -> None:
        if not self._started:
            return                                     # the first View: _watch takes it
        update = self.engine.prepare(view, self._prepared)
        if update is not None:
            self._prepared = update.zone
            self._to_main(self.engine.commit, update)

    # -- on the answering loop

    def _commit_first(self, update: Update | None, view: View) -> None:
        if update is not None:
            self.engine.commit(update)
        if self._first is not None and not self._first.done():
            self._first.set_result(view)

    def _fail(self, exc: BaseException) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)
