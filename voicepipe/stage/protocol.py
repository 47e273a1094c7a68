"""The stream protocol the STT and TTS contracts share (config first, then data, in a oneof),
how a call is accepted or rejected, the tasks that do a call's work beside its responses
(`CallOutbox`), the session limit, and the stage's own timing metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc
from prometheus_client import Counter, Histogram

from voicepipe.aio import cancel_and_wait
from voicepipe.audio_format import InvalidInput
from voicepipe.handlers import drain
from voicepipe.logs import bind_correlation
from voicepipe.stage import StageError

log = logging.getLogger(__name__)

Settings = TypeVar("Settings")
Response = TypeVar("Response")
Item = TypeVar("Item")
Context = grpc.aio.ServicerContext[Any, Any]

STAGE_FIGURE_SECONDS = Histogram(
    "voicepipe_stage_figure_seconds",
    "The stage's own timing figures as it reports them to callers: stt_finalization (end of"
    " speech to final), llm_time_to_first_token, tts_time_to_first_audio.",
    ("figure",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
STAGE_REJECTED = Counter(
    "voicepipe_stage_rejected_calls_total",
    "Calls a stage ended with a status of its own choosing, by gRPC code: bad input"
    " (INVALID_ARGUMENT), the session limit (RESOURCE_EXHAUSTED), engine failures.",
    ("grpc_code",),
)


async def read_config(requests: AsyncIterator[Any], data_field: str, data_name: str) -> Any:
    """The `config` of a stream's first request (a oneof of `config` and `data_field`), or
    InvalidInput saying what came instead."""
    first = await anext(requests, None)
    if first is None:
        raise InvalidInput("request stream ended before config; the first request must carry config")
    kind = first.WhichOneof("request")
    if kind == data_field:
        raise InvalidInput(f"{data_name} arrived before config; the first request must carry config")
    if kind is None:
        raise InvalidInput(
            f"request has neither config nor {data_field} set; the first request must carry config"
        )
    return first.config


async def open_stream(
    requests: AsyncIterator[Any],
    context: Context,
    data_field: str,
    data_name: str,
    parse: Callable[[Any], Settings],
) -> Settings:
    """Reads the config that opens a stream, tags the call's log lines with its correlation ids
    and validates it with `parse`; a bad start ends the call with INVALID_ARGUMENT and the reason,
    a good one is accepted at once (see accept()).
    (grpc.aio runs each call in its own task, so the ids stay with this call.)"""
    try:
        config = await read_config(requests, data_field, data_name)
        bind_correlation(config.correlation.session_id, config.correlation.turn_id)
        settings = parse(config)
    except InvalidInput as error:
        await drain(requests)  # the client may still be writing: let it finish (see drain())
        await reject(error, context)
    except StageError as error:
        await reject(error, context)
    await accept(context)
    return settings


async def accept(context: Context) -> None:
    """Sends the response headers as soon as a call is accepted, so that they do not ride with
    (and delay) the first result, which is what the caller is waiting for."""
    await context.send_initial_metadata(())


async def reject(error: BaseException, context: Context) -> NoReturn:
    """Ends the call: INVALID_ARGUMENT with the reason for bad input, the engine's own status for
    a StageError, INTERNAL (logged with its traceback) for anything else, which is a bug.
    A cancellation is passed on."""
    if not isinstance(error, Exception) or isinstance(error, grpc.aio.AbortError):
        raise error
    if isinstance(error, InvalidInput):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    elif isinstance(error, StageError):
        code, message = error.code, error.message
    else:
        log.error("engine failed", exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, f"the stage failed: {type(error).__name__}: {error}"
    if code is not grpc.StatusCode.INTERNAL:
        log.info("rejected request", extra={"code": code.name, "reason": message})
    STAGE_REJECTED.labels(code.name).inc()
    await context.abort(code, message)


async def serve_stream(
    request_iterator: AsyncIterator[Any],
    context: Context,
    *,
    data: tuple[str, str],
    parse: Callable[[Any], Settings],
    sessions: SessionLimit,
    body: Callable[[Settings, AsyncIterator[Any]], AsyncGenerator[Response, None]],
) -> AsyncGenerator[Response, None]:
    """A bidi call of a config-first contract: opens it (`data` is the oneof's data field and
    its name in messages), holds a session slot, streams `body`'s responses, and ends the call
    with the status that fits whatever `body` raised (see reject())."""
    requests = aiter(request_iterator)
    settings = await open_stream(requests, context, *data, parse)
    try:
        with sessions.hold():
            async with contextlib.aclosing(body(settings, requests)) as responses:
                async for response in responses:
                    yield response
    except InvalidInput as error:
        await drain(requests)  # the client may still be writing: let it finish (see drain())
        await reject(error, context)
    except Exception as error:
        await reject(error, context)


@dataclass(frozen=True)
class Failure:
    """A call's task failed: the call ends with `error` (see reject())."""

    error: Exception


class _End:
    """The call's work is done: no more responses."""


# Responses a call's tasks may have produced ahead of the client before they wait for it.
OUTBOX_ROOM = 64


class CallOutbox(Generic[Item]):
    """The work of one bidi call beside its responses: tasks (the one reading the requests, the
    engine's) hand the call its responses, in order, through this outbox. A task that raises,
    or calls `fail`, ends the call with that error as soon as the responses before it have gone:
    one way for any task to end a call. `responses()` yields them and, however the call ends,
    cancels and awaits every task."""

    def __init__(self, call_name: str) -> None:
        self._name = call_name
        self._queue: asyncio.Queue[Item | Failure | _End] = asyncio.Queue()
        self._room = asyncio.Semaphore(OUTBOX_ROOM)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, work: Coroutine[Any, Any, None], role: str) -> None:
        """Runs `work` in a task named `role:call name`; if it raises, the call fails with it."""
        self._tasks.append(asyncio.create_task(self._run(work), name=f"{role}:{self._name}"))

    async def _run(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as error:
            self.fail(error)

    async def send(self, item: Item) -> None:
        """Queues a response; waits while OUTBOX_ROOM responses wait for the client."""
        await self._room.acquire()
        self._queue.put_nowait(item)

    def end(self) -> None:
        self._queue.put_nowait(_End())

    def fail(self, error: Exception) -> None:
        self._queue.put_nowait(Failure(error))

    async def responses(self) -> AsyncGenerator[Item, None]:
        try:
            while not isinstance(item := await self._queue.get(), _End):
                if isinstance(item, Failure):
                    raise item.error
                self._room.release()
                yield item
        finally:
            await cancel_and_wait(*self._tasks)


class SessionLimit:
    """At most `limit` calls at once (0: no limit); the next gets RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.limit and self.active >= self.limit:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this stage is at its session limit ({self.limit} concurrent calls); retry later",
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
