"""Resuming a broken stage stream (tenacity): which failures are worth a new call, how long to
wait between attempts, and the log line and metric of each resumption. The STT link and both of a
turn's streams use it, each with its own stopping rule."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from orchestrator.breaker import BreakerOpen
from orchestrator.calls import DeadlinePassed
from orchestrator.metrics import RESUMPTIONS
from voice.v1 import voice_agent_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

# Calls one of a turn's streams may take before the turn fails.
TURN_STREAM_ATTEMPTS = 5
# A turn's calls fail fast: while the channel cannot connect (TRANSIENT_FAILURE: the stage was
# killed, refuses, is unreachable) an attempt fails at once with UNAVAILABLE, and the resumption
# below retries it until the health Watch opens the breaker, which ends the turn with UNAVAILABLE
# within milliseconds. A wait-for-ready call would instead sit out the turn's whole deadline and
# end DEADLINE_EXCEEDED. An idle or connecting channel (after a reset or a GOAWAY) still holds a
# fail-fast call until its connection attempt ends, so a resumed stream reconnects as before.
TURN_CALLS_WAIT_FOR_READY = False


def is_transient(error: BaseException) -> bool:
    """Failures worth reopening the stream for: the stage or the path to it went away."""
    if isinstance(error, BreakerOpen):
        return True
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
        )
    return False


class _Backoff:
    """The wait before a new attempt: exponential from `initial_s` with as much jitter, capped at
    `max_s`; a stream that broke after running a while (longer than the longest wait) is resumed
    as promptly as at first, not after the wait its earlier failures had grown to."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._started = 0.0  # when the latest attempt started
        self._counted_from = 1  # the attempt the exponential wait counts from

    def attempt_started(self) -> None:
        self._started = time.monotonic()

    def __call__(self, state: RetryCallState) -> float:
        if time.monotonic() - self._started >= self._max_s:
            self._counted_from = state.attempt_number
        grown = self._initial_s * 2.0 ** (state.attempt_number - self._counted_from)
        return min(self._max_s, grown + random.uniform(0, self._initial_s))


@dataclass(frozen=True)
class Resumption:
    """How one stream is resumed. A turn gives up at once while the stage's breaker is open (the
    caller hears an error within milliseconds); the STT link keeps trying, its audio buffered."""

    stage: str
    stop: Callable[[RetryCallState], bool]
    initial_wait_s: float
    max_wait_s: float
    retry_breaker_open: bool

    def _retried(self, error: BaseException) -> bool:
        return is_transient(error) and (self.retry_breaker_open or not isinstance(error, BreakerOpen))

    def _retrying(self, backoff: _Backoff, log_fields: Callable[[], dict[str, object]]) -> AsyncRetrying:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            reason = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
            RESUMPTIONS.labels(self.stage, reason).inc()
            log.warning(
                f"{self.stage} stream broken; resuming",
                extra={"reason": str(error), **log_fields(), "attempt": state.attempt_number},
            )

        return AsyncRetrying(
            retry=retry_if_exception(self._retried),
            stop=self.stop,
            wait=backoff,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def run(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Runs attempt() until it returns; raises the last failure when it is not worth a retry
        or the stopping rule says so."""
        backoff = _Backoff(self.initial_wait_s, self.max_wait_s)
        async for attempt_state in self._retrying(backoff, dict):
            backoff.attempt_started()
            with attempt_state:
                await attempt()

    async def stream(
        self, attempt: Callable[[], AsyncGenerator[T, None]], *, log_fields: Callable[[], dict[str, object]]
    ) -> AsyncIterator[T]:
        """run() for an attempt that yields: what each attempt yields is passed on at once."""
        backoff = _Backoff(self.initial_wait_s, self.max_wait_s)
        async for attempt_state in self._retrying(backoff, log_fields):
            backoff.attempt_started()
            with attempt_state:
                async with contextlib.aclosing(attempt()) as items:
                    async for item in items:
                        yield item


class StageFailed(Exception):
    """A stage failed for good in this turn; reported to the client as an error event."""

    def __init__(self, stage: pb.Stage.ValueType, code: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.code = code
        self.message = message


async def resume_turn_stream(stage: pb.Stage.ValueType, attempt: Callable[[], Awaitable[None]]) -> None:
    """Runs one of a turn's streams, resumed when it breaks; raises StageFailed when it fails
    for good."""
    resumption = _TURN_STREAMS[stage]
    name = resumption.stage
    try:
        await resumption.run(attempt)
    except BreakerOpen as error:
        raise StageFailed(stage, "UNAVAILABLE", str(error)) from error
    except DeadlinePassed as error:
        raise StageFailed(pb.STAGE_UNSPECIFIED, "DEADLINE_EXCEEDED", "turn ran out of time") from error
    except grpc.aio.AioRpcError as error:
        raise StageFailed(stage, error.code().name, f"{name}: {error.details()}") from error


_TURN_STREAMS = {
    stage: Resumption(
        name,
        stop=stop_after_attempt(TURN_STREAM_ATTEMPTS),
        initial_wait_s=0.02,
        max_wait_s=0.5,
        retry_breaker_open=False,
    )
    for stage, name in ((pb.STAGE_LLM, "llm"), (pb.STAGE_TTS, "tts"))
}
