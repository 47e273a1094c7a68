"""Resuming a broken stage stream (tenacity): which failures are worth a new call, how long to
wait between attempts, and the log line and metric of each resumption. The STT link and both of a
turn's streams use it, each with its own stopping rule."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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

# Calls one of a turn's streams may take before the turn fails.
TURN_STREAM_ATTEMPTS = 5


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

    async def run(
        self,
        attempt: Callable[[], Awaitable[None]],
        *,
        log_fields: Callable[[], dict[str, object]] = dict,
        before_retry: Callable[[BaseException | None], Awaitable[None]] | None = None,
    ) -> None:
        """Runs attempt() until it returns; raises the last failure when it is not worth a retry
        or the stopping rule says so."""
        started = 0.0  # when the latest attempt started
        backoff_from = 1  # the attempt the exponential wait counts from

        def wait(state: RetryCallState) -> float:
            """Exponential from initial_wait_s with as much jitter; a stream that broke after
            running a while (longer than the longest wait) is resumed as promptly as at first,
            not after the wait its earlier failures had grown to."""
            nonlocal backoff_from
            if time.monotonic() - started >= self.max_wait_s:
                backoff_from = state.attempt_number
            grown = self.initial_wait_s * 2.0 ** (state.attempt_number - backoff_from)
            return min(self.max_wait_s, grown + random.uniform(0, self.initial_wait_s))

        async def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            reason = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
            RESUMPTIONS.labels(self.stage, reason).inc()
            log.warning(
                f"{self.stage} stream broken; resuming",
                extra={"reason": str(error), **log_fields(), "attempt": state.attempt_number},
            )
            if before_retry is not None:
                await before_retry(error)

        retrying = AsyncRetrying(
            retry=retry_if_exception(self._retried),
            stop=self.stop,
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt_state in retrying:
            started = time.monotonic()
            with attempt_state:
                await attempt()


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
