"""One way for engines to run blocking work (model inference, C libraries) off the event loop,
so one call's inference never stalls another call's frames: a pool of worker threads with a
bound on queued work. Work beyond the bound is refused with RESOURCE_EXHAUSTED at once rather
than queued without limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from typing import Generic, ParamSpec, TypeVar

import grpc

from voicepipe.stage import StageError

T = TypeVar("T")
P = ParamSpec("P")


class Emitter(Generic[T]):
    """Handed to a streaming worker function: `emit(item)` passes an item to the event loop;
    `cancelled` turns True once the consumer has gone (stop early when it does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[bool, object]]) -> None:
        self._loop = loop
        self._queue = queue
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, item: T) -> None:
        if not self._cancelled.is_set():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (False, item))

    def _finish(self, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (True, error))


class BlockingWorker:
    """`workers` threads named after `name`; at most `max_queued` calls waiting beyond those
    running. A library that is not thread-safe gets workers=1: its calls then run one at a time."""

    def __init__(self, name: str, *, workers: int = 1, max_queued: int = 8) -> None:
        self.name = name
        self.workers = workers
        self.max_queued = max_queued
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._admitted = 0  # running + queued

    def _admit(self) -> None:
        if self._admitted >= self.workers + self.max_queued:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.name} is at capacity ({self.workers} running, {self.max_queued} queued); retry later",
            )
        self._admitted += 1

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs) on a worker thread. If the caller is cancelled the work still
        finishes on its thread (a thread cannot be interrupted), but its slot is held until then."""
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        future.add_done_callback(self._release)
        return await asyncio.shield(future)

    async def stream(self, fn: Callable[[Emitter[T]], None]) -> AsyncIterator[T]:
        """Runs fn(emitter) on a worker thread and yields what it emits, as it emits it, then
        re-raises its exception if it failed. Closing the iterator marks the emitter cancelled."""
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bool, object]] = asyncio.Queue()
        emitter: Emitter[T] = Emitter(loop, queue)

        def work() -> None:
            error: BaseException | None = None
            try:
                fn(emitter)
            except BaseException as exc:  # handed to the consumer, who re-raises it
                error = exc
            emitter._finish(error)

        future = loop.run_in_executor(self._pool, work)
        future.add_done_callback(self._release)
        try:
            while True:
                done, item = await queue.get()
                if done:
                    if item is not None:
                        raise item  # type: ignore[misc]
                    return
                yield item  # type: ignore[misc]
        finally:
            emitter._cancelled.set()

    def _release(self, _: object) -> None:
        self._admitted -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
