"""The session's outgoing event stream: one bounded queue between the pipeline and the client.

A client that reads too slowly fills it; producers then wait up to `slow_client_timeout_s`
and after that the session ends with RESOURCE_EXHAUSTED, so memory stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from voice.v1 import voice_agent_pb2 as pb


class SessionFailed(Exception):
    """Ends the Converse call with a status; raised out of SessionOutput.responses()."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Deferred:
    """An event built at the moment it is handed to the transport, or dropped (build -> None):
    reply audio of an interrupted turn is dropped, and a turn's latency is measured when its
    first audio actually leaves."""

    build: Callable[[], pb.ConverseResponse | None]


OutputItem = pb.ConverseResponse | Deferred | SessionFailed | None


class EventSink(Protocol):
    """Where a turn's parts put the events they make for the client: the session's output, or
    a speculative turn's held events (see speculation.py)."""

    async def put(self, item: pb.ConverseResponse | Deferred) -> None: ...


class SessionOutput:
    def __init__(
        self, max_events: int, slow_client_timeout_s: float, on_fail: Callable[[], None] = lambda: None
    ) -> None:
        self._queue: asyncio.Queue[OutputItem] = asyncio.Queue(max_events)
        self._slow_client_timeout_s = slow_client_timeout_s
        self.max_events = max_events
        self.failed = False
        # Called on failure: the stream may be stuck in a transport write to a client that does
        # not read, so the session's work is stopped here rather than after the status is sent.
        self._on_fail = on_fail

    async def put(self, item: pb.ConverseResponse | Deferred) -> None:
        """Queues an event; raises SessionFailed if the client does not read in time."""
        try:
            self._queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        try:
            async with asyncio.timeout(self._slow_client_timeout_s):
                await self._queue.put(item)
        except TimeoutError:
            failure = SessionFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client is not reading: {self.max_events} events waited more than"
                f" {self._slow_client_timeout_s:g} s",
            )
            self.fail(failure)
            raise failure from None

    def fail(self, failure: SessionFailed) -> None:
        """Ends the stream with an error status, ahead of anything still queued; the first
        failure wins."""
        if self.failed:
            return
        self.failed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(failure)
        self._on_fail()

    def close(self, failure: SessionFailed | None = None) -> None:
        """Ends the stream once everything queued has been sent: with OK, or with the status of
        `failure` (a draining server's UNAVAILABLE, which follows the last ticket)."""
        try:
            self._queue.put_nowait(failure)
        except asyncio.QueueFull:
            self.fail(SessionFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "client is not reading"))

    async def responses(self) -> AsyncIterator[pb.ConverseResponse]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, SessionFailed):
                raise item
            if isinstance(item, Deferred):
                built = item.build()
                if built is not None:
                    yield built
            else:
                yield item
