"""One call to an upstream stage, opened and closed the same way for every stream the
orchestrator holds (the STT link, a turn's Generate and Synthesize): the breaker is asked first,
the deadline is the caller's, the in-flight gauge counts it, a failure is counted and told to the
breaker, and the call (with its writer, for a bidirectional stream) is cancelled when it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import grpc

from orchestrator.metrics import STAGE_ERRORS
from orchestrator.upstreams import Upstream
from voice.v1 import common_pb2
from voicepipe.aio import cancel_and_wait


def call_metadata(correlation: common_pb2.Correlation) -> tuple[tuple[str, str], ...]:
    """The correlation ids as call metadata, for the stage's logs before it reads a message."""
    if correlation.turn_id:
        return (("x-session-id", correlation.session_id), ("x-turn-id", correlation.turn_id))
    return (("x-session-id", correlation.session_id),)


class DeadlinePassed(Exception):
    """No time is left for a new call to the stage."""


class StageCall:
    """An open call; `async with` it to have its outcome accounted and the call cancelled at the
    end. A call opened early and never used is closed with close()."""

    def __init__(self, upstream: Upstream, rpc: Any) -> None:
        self.upstream = upstream
        self.rpc = rpc
        self._writer: asyncio.Task[None] | None = None
        self._open = True

    @classmethod
    def open(cls, upstream: Upstream, deadline: float, start: Callable[[float], Any]) -> StageCall:
        """`start(timeout)` creates the gRPC call. Raises BreakerOpen while the stage is known
        to be down and DeadlinePassed when no time is left."""
        upstream.breaker.check()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed(f"{upstream.name}: no time left for a call")
        rpc = start(remaining)
        upstream.calls_in_flight.inc()
        return cls(upstream, rpc)

    def start_writer(self, write: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """The task writing a bidirectional call's requests; cancelled with the call."""
        self._writer = asyncio.create_task(write, name=name)
        return self._writer

    def close(self) -> None:
        if self._open:
            self._open = False
            self.rpc.cancel()
            self.upstream.calls_in_flight.dec()

    async def __aenter__(self) -> StageCall:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None
    ) -> None:
        try:
            if error is None:
                self.upstream.breaker.record_success()
            elif isinstance(error, grpc.aio.AioRpcError):
                STAGE_ERRORS.labels(self.upstream.name, error.code().name).inc()
                self.upstream.breaker.record_failure(error.code())
        finally:
            self.close()
            await cancel_and_wait(self._writer)
            if self._writer is not None and not self._writer.cancelled():
                # A writer that failed did so because the call did; the read loop has raised
                # the call's error (or the caller awaited the writer's).
                self._writer.exception()
