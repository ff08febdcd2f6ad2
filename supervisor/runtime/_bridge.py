"""Small async plumbing shared by the runtimes.

``EventQueue``: the single-consumer queue behind ``Runtime.events()``. Events put before
the consumer arrives are kept, so an exit between start() and subscribing is not lost.

``iterate_in_thread``: runs a blocking iterator (the Docker SDK's log/exec streams) in its
own thread and yields its items in the event loop, with backpressure (a bounded queue; the
thread waits while it is full) and cancellation (closing the async iterator calls
``cancel`` so the blocked thread wakes up, e.g. CancellableStream.close()).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

from .base import RuntimeEvent

__all__ = ["EventQueue", "iterate_in_thread"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class EventQueue:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._consuming = False
        self._closed = False

    def put(self, event: RuntimeEvent) -> None:
        """From the event loop's thread."""
        if not self._closed:
            self._queue.put_nowait(event)

    def put_threadsafe(self, loop: asyncio.AbstractEventLoop, event: RuntimeEvent) -> None:
        try:
            loop.call_soon_threadsafe(self.put, event)
        except RuntimeError:   # loop closed: nobody is listening any more
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(_END)

    async def stream(self) -> AsyncIterator[RuntimeEvent]:
        if self._consuming:
            # Refuse misuse: two consumers would each see half the exits.
            raise RuntimeError(f"{self._owner}: events() already has a consumer")
        self._consuming = True
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            self._consuming = False


class _Failure(Generic[T]):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def iterate_in_thread(open_iter: Callable[[], Iterator[T]],
                            cancel: Callable[[Iterator[T]], None], *,
                            name: str, maxsize: int = 64) -> AsyncGenerator[T, None]:
    """Yield the items of ``open_iter()`` (called in a new daemon thread)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
    stopped = threading.Event()
    holder: list[Iterator[T]] = []
    lock = threading.Lock()

    def deliver(item: object) -> bool:
        """Blocks while the queue is full; False once the consumer went away."""
        try:
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:
            return False
        while True:
            try:
                fut.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if stopped.is_set():
                    fut.cancel()
                    return False
            except (concurrent.futures.CancelledError, RuntimeError):
                return False

    def pump() -> None:
        try:
            it = open_iter()
            with lock:
                holder.append(it)
                if stopped.is_set():
                    cancel(it)
                    return
            for item in it:
                if stopped.is_set() or not deliver(item):
                    return
            deliver(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            if not stopped.is_set():
                deliver(_Failure(exc))

    thread = threading.Thread(target=pump, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stopped.set()
        with lock:
            for it in holder:
                try:
                    cancel(it)
                except Exception:  # closing a stream that already ended
                    log.debug("%s: cancel failed", name, exc_info=True)
