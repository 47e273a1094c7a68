"""One conversation: reads the client's stream, runs the STT link and one turn at a time, and
handles barge-in. Every task it starts is cancelled and awaited when the conversation ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from orchestrator.metrics import TURNS
from orchestrator.output import SessionFailed, SessionOutput
from orchestrator.retry import StageFailed
from orchestrator.stt_link import (
    FinalTranscript,
    InterimTranscript,
    SpeechRecognitionLink,
    SpeechStarted,
    SttFailed,
)
from orchestrator.turn import Turn, TurnSettings
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, language_model_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import InvalidInput, PcmFormat
from voicepipe.logs import turn_id_var

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4096
# Turns waiting while the agent answers an earlier one (typed turns queue; speech interrupts).
MAX_QUEUED_TURNS = 16


@dataclass(frozen=True)
class SessionLimits:
    turn_budget_s: float  # deadline for one turn's LLM and TTS calls
    session_budget_s: float  # deadline for the session's STT call (re-armed on resumption)
    max_output_events: int
    slow_client_timeout_s: float
    reply_audio_lead_s: float


class Conversation:
    """State and tasks of one Converse call."""

    def __init__(
        self,
        session_id: str,
        input_format: PcmFormat,
        turn_settings: TurnSettings,
        system_prompt: str,
        upstreams: Upstreams,
        limits: SessionLimits,
        client_deadline: float | None,
        on_stop: Callable[[], None],
    ) -> None:
        self.session_id = session_id
        self.input_format = input_format
        self.turn_settings = turn_settings
        self.upstreams = upstreams
        self.limits = limits
        self.output = SessionOutput(limits.max_output_events, limits.slow_client_timeout_s, self._stop)
        self._on_stop = on_stop
        self._tasks: list[asyncio.Task[None]] = []
        self.history: list[language_model_pb2.ChatMessage] = []
        if system_prompt:
            self.history.append(
                language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_SYSTEM, content=system_prompt)
            )
        self._session_deadline = min(
            time.monotonic() + limits.session_budget_s, client_deadline or float("inf")
        )
        self._turn_count = 0
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._turn_requests: asyncio.Queue[_TurnRequest | None] = asyncio.Queue(MAX_QUEUED_TURNS + 1)
        self._runner_idle = False  # the turn runner waits for a request; nothing is being played
        self._stt = SpeechRecognitionLink(
            upstreams.stt, input_format, self._correlation(), self._session_deadline
        )

    def _correlation(self, turn_id: str = "") -> common_pb2.Correlation:
        return common_pb2.Correlation(session_id=self.session_id, turn_id=turn_id)

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[pb.ConverseResponse]:
        """The Converse response stream; `requests` is what follows the config message."""
        await self.output.put(
            pb.ConverseResponse(
                session_started=pb.SessionStarted(session_id=self.session_id), correlation=self._correlation()
            )
        )
        stt = self._supervised(self._stt.run(), "stt")
        listener = self._supervised(self._listen(), "stt-events")
        turns = self._supervised(self._run_turns(), "turns")
        reader = self._supervised(self._read(requests, listener, turns), "reader")
        self._tasks = [reader, stt, listener, turns]
        try:
            async for response in self.output.responses():
                yield response
        finally:
            self._stop()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _stop(self) -> None:
        """Stops the session's work (and with it every upstream call) and frees its slot."""
        for task in self._tasks:
            task.cancel()
        self._on_stop()

    def _supervised(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A session task whose unexpected failure ends the session with INTERNAL instead of
        leaving the client waiting on a stream that nothing feeds any more."""

        async def supervise() -> None:
            try:
                await work
            except SessionFailed:
                pass  # already queued for the client
            except Exception as error:
                log.exception("session task failed", extra={"task": name})
                self.output.fail(
                    SessionFailed(grpc.StatusCode.INTERNAL, f"internal error in {name}: {error!r}")
                )

        return asyncio.create_task(supervise(), name=f"session-{self.session_id}-{name}")

    async def _read(
        self, requests: AsyncIterator[Any], listener: asyncio.Task[None], turns: asyncio.Task[None]
    ) -> None:
        """Client input until END_OF_INPUT or half-close; then finish the last turn and end."""
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "audio":
                    self.input_format.check_message(request.audio)
                    self._stt.feed(request.audio)
                elif kind == "text":
                    text = request.text.text
                    if not text.strip() or len(text) > MAX_TEXT_CHARS:
                        raise InvalidInput(
                            f"text turn must be 1 to {MAX_TEXT_CHARS} characters, got {len(text)}"
                        )
                    # A typed turn waits for the turn being played (speech interrupts it instead).
                    arrived = time.monotonic()
                    self._queue_turn(_TurnRequest(text, arrived, Duration(), arrived))
                elif kind == "control":
                    if request.control.type != pb.CONTROL_TYPE_END_OF_INPUT:
                        raise InvalidInput(
                            f"control.type {request.control.type} is not supported; use END_OF_INPUT"
                        )
                    break
                elif kind == "config":
                    raise InvalidInput("config may be sent only once, as the first message")
                else:
                    raise InvalidInput("empty request: set one of config, audio, text or control")
            self._stt.end_input()
            await listener  # ends after the link's last event
            await self._turn_requests.put(None)
            await turns
            self.output.close()
        except InvalidInput as error:
            self.output.fail(SessionFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)))

    # --- STT events --------------------------------------------------------------------------

    async def _listen(self) -> None:
        """What STT reports: barge-in, transcripts for the client, and the turns they start."""
        async for event in self._stt.events():
            match event:
                case SpeechStarted():
                    self._interrupt()
                case InterimTranscript():
                    await self._transcript(event.text, event.start, event.end, is_final=False)
                case FinalTranscript():
                    await self._on_final(event)
                case SttFailed():
                    await self._error(pb.STAGE_STT, event.code, event.message, "")

    async def _transcript(self, text: str, start: Duration, end: Duration, *, is_final: bool) -> None:
        await self.output.put(
            pb.ConverseResponse(
                user_transcript=pb.UserTranscript(
                    text=text, is_final=is_final, audio_start_offset=start, audio_end_offset=end
                ),
                correlation=self._correlation(),
            )
        )

    async def _on_final(self, final: FinalTranscript) -> None:
        # The turn first: when the conversation is idle its Generate request leaves now, ahead of
        # this event to the client.
        if final.text.strip():
            self._queue_turn(
                _TurnRequest(final.text, final.speech_ended_at, final.finalization, final.received_at)
            )
        await self._transcript(final.text, final.start, final.end, is_final=True)

    async def _error(self, stage: pb.Stage.ValueType, code: str, message: str, turn_id: str) -> None:
        log.warning("stage error", extra={"stage": pb.Stage.Name(stage), "code": code, "detail": message})
        await self.output.put(
            pb.ConverseResponse(
                error=pb.SessionError(stage=stage, code=code, message=message),
                correlation=self._correlation(turn_id),
            )
        )

    # --- turns ---------------------------------------------------------------------------------

    def _queue_turn(self, request: _TurnRequest) -> None:
        if self._runner_idle and self._turn_requests.empty():
            # Nothing is playing or waiting: the turn starts now (see Turn.open_generation).
            request.turn = self._new_turn(request)
            request.turn.open_generation()
        try:
            self._turn_requests.put_nowait(request)
        except asyncio.QueueFull:
            failure = SessionFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {MAX_QUEUED_TURNS} turns are waiting for the agent to answer",
            )
            self.output.fail(failure)
            raise failure from None

    async def _run_turns(self) -> None:
        """One turn at a time, in order; barge-in cancels the one playing (see _interrupt)."""
        try:
            while True:
                self._runner_idle = True
                request = await self._turn_requests.get()
                self._runner_idle = False
                if request is None:
                    return
                await self._play_turn(request)
        finally:
            self._runner_idle = False
            while not self._turn_requests.empty():  # the session ended with turns waiting
                if (waiting := self._turn_requests.get_nowait()) is not None and waiting.turn:
                    waiting.turn.close()

    async def _play_turn(self, request: _TurnRequest) -> None:
        turn = request.turn or self._new_turn(request)
        try:
            await self.output.put(
                pb.ConverseResponse(
                    turn_started=pb.TurnStarted(user_text=request.text), correlation=turn.correlation
                )
            )
            token = turn_id_var.set(turn.turn_id)
            task = asyncio.create_task(turn.run(), name=f"session-{self.session_id}-turn-{turn.turn_id}")
            turn_id_var.reset(token)
            self._turn, self._turn_task = turn, task
            try:
                await asyncio.wait([task])
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._turn_task = None
        finally:
            turn.close()
        await self._end_turn(turn, task)

    def _new_turn(self, request: _TurnRequest) -> Turn:
        self._turn_count += 1
        turn_id = str(self._turn_count)
        self.history.append(
            language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_USER, content=request.text)
        )
        turn = Turn(
            turn_id=turn_id,
            messages=list(self.history),
            correlation=self._correlation(turn_id),
            settings=self.turn_settings,
            upstreams=self.upstreams,
            output=self.output,
            speech_ended_at=request.speech_ended_at,
            stt_finalization=request.stt_finalization,
            transcript_received_at=request.transcript_received_at,
            deadline=min(time.monotonic() + self.limits.turn_budget_s, self._session_deadline),
        )
        return turn

    async def _end_turn(self, turn: Turn, task: asyncio.Task[None]) -> None:
        """Reports how the turn ended; the history keeps what the user heard of the reply."""
        if task.cancelled():  # barge-in
            TURNS.labels("interrupted").inc()
            self._remember_reply(turn.heard_text)
            log.info("turn interrupted", extra={"turn": turn.turn_id, "heard_chars": turn.heard_chars})
            await self.output.put(
                pb.ConverseResponse(
                    turn_interrupted=pb.TurnInterrupted(heard_text=turn.heard_text),
                    correlation=turn.correlation,
                )
            )
        elif isinstance(failure := task.exception(), StageFailed):
            TURNS.labels("failed").inc()
            self._remember_reply(turn.heard_text)
            await self._error(failure.stage, failure.code, failure.message, turn.turn_id)
        elif failure is not None:
            raise failure
        else:
            TURNS.labels("completed").inc()
            self._remember_reply(turn.reply_text)
            await self.output.put(turn.completed_event())
            log.info("turn completed", extra={"turn": turn.turn_id, "reply_chars": len(turn.reply_text)})

    def _remember_reply(self, text: str) -> None:
        if text:
            self.history.append(
                language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_ASSISTANT, content=text)
            )

    def _interrupt(self) -> None:
        """Barge-in: stop the turn being played at once; no more of its audio leaves."""
        turn, task = self._turn, self._turn_task
        if turn is None or task is None or task.done() or turn.interrupted:
            return
        turn.interrupted = True
        task.cancel()


@dataclass(slots=True)
class _TurnRequest:
    text: str
    speech_ended_at: float  # monotonic time the user stopped speaking (or the text arrived)
    stt_finalization: Duration
    transcript_received_at: float  # when the final transcript arrived (a text turn: speech_ended_at)
    turn: Turn | None = None  # already started, when it arrived while the conversation was idle
