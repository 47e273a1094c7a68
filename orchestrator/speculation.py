"""A turn started on a speculative transcript: STT's text at the start of a pause in speech,
before the endpointing silence has held (see TranscriptionResult.speculative).

Its Generate and Synthesize calls run during the silence, but every event it makes for the
client (reply text, reply audio) is held here. When the final transcript confirms the same
words the turn becomes the conversation's turn and what it holds leaves at once; when speech
resumes (the speculation is withdrawn) or the final says something else, the turn is cancelled
and the history never saw it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from orchestrator.metrics import SPECULATIVE
from orchestrator.output import Deferred, EventSink
from orchestrator.turn import Turn
from voice.v1 import language_model_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait


class HeldOutput:
    """A speculative turn's events: held until `release`, then passed on as they come."""

    def __init__(self) -> None:
        self._held: list[pb.ConverseResponse | Deferred] = []
        self._to: EventSink | None = None

    async def put(self, item: pb.ConverseResponse | Deferred) -> None:
        if self._to is None:
            self._held.append(item)
        else:
            await self._to.put(item)

    async def release(self, to: EventSink) -> None:
        """Sends what is held, in order (events made meanwhile join the end), then passes on."""
        while self._held:
            await to.put(self._held.pop(0))
        self._to = to


@dataclass
class Speculation:
    """The running speculative turn and the user's words it answers."""

    text: str
    message: language_model_pb2.ChatMessage  # its place in the history, once confirmed
    turn: Turn
    output: HeldOutput
    task: asyncio.Task[None]

    async def cancel(self, outcome: str) -> None:
        """Stops its calls; nothing it made reaches the client."""
        await cancel_and_wait(self.task)
        self.turn.close()
        SPECULATIVE.labels(outcome).inc()
