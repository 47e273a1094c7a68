"""One conversation: reads the client's stream, runs the STT link and one turn at a time, and
handles barge-in. Every task it starts is cancelled and awaited when the conversation ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from orchestrator.metrics import TURNS
from orchestrator.output import SessionFailed, SessionOutput
from orchestrator.stt_link import FinalTranscript, SpeechRecognitionLink
from orchestrator.turn import StageFailed, Turn, TurnSettings
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, language_model_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import InvalidInput, PcmFormat
from voicepipe.logs import turn_id_var

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4096


@dataclass(frozen=True)
class SessionLimits:
    turn_budget_s: float  # deadline for one turn's LLM and TTS calls
    session_budget_s: float  # deadline for the session's STT call (re-armed on resumption)
    max_output_events: int
    slow_client_timeout_s: float


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
    ) -> None:
        self.session_id = session_id
        self.input_format = input_format
        self.turn_settings = turn_settings
        self.upstreams = upstreams
        self.limits = limits
        self.output = SessionOutput(limits.max_output_events, limits.slow_client_timeout_s)
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
        self._turn_lock = asyncio.Lock()
        self._stt = SpeechRecognitionLink(
            upstreams.stt,
            input_format,
            common_pb2.Correlation(session_id=session_id),
            lambda: self._session_deadline,
            on_speech_started=self._on_speech_started,
            on_transcript=self._on_interim,
            on_final=self._on_final,
            on_error=self._on_stt_error,
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
        reader = self._supervised(self._read(requests, stt), "reader")
        try:
            async for response in self.output.responses():
                yield response
        finally:
            tasks = [t for t in (reader, stt, self._turn_task) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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

    async def _read(self, requests: AsyncIterator[Any], stt: asyncio.Task[None]) -> None:
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
                    await self._start_turn(text, time.monotonic(), Duration())
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
            await stt
            if self._turn_task is not None:
                await asyncio.gather(self._turn_task, return_exceptions=True)
            self.output.close()
        except InvalidInput as error:
            self.output.fail(SessionFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)))

    # --- STT events --------------------------------------------------------------------------

    async def _on_speech_started(self) -> None:
        await self._interrupt()

    async def _on_interim(self, text: str, start: Duration, end: Duration) -> None:
        await self.output.put(
            pb.ConverseResponse(
                user_transcript=pb.UserTranscript(
                    text=text, is_final=False, audio_start_offset=start, audio_end_offset=end
                ),
                correlation=self._correlation(),
            )
        )

    async def _on_final(self, final: FinalTranscript) -> None:
        await self.output.put(
            pb.ConverseResponse(
                user_transcript=pb.UserTranscript(
                    text=final.text, is_final=True, audio_start_offset=final.start, audio_end_offset=final.end
                ),
                correlation=self._correlation(),
            )
        )
        if final.text.strip():
            await self._start_turn(final.text, final.speech_ended_at, final.finalization)

    async def _on_stt_error(self, code: str, message: str) -> None:
        await self._error(pb.STAGE_STT, code, message, "")

    async def _error(self, stage: pb.Stage.ValueType, code: str, message: str, turn_id: str) -> None:
        log.warning("stage error", extra={"stage": pb.Stage.Name(stage), "code": code, "detail": message})
        await self.output.put(
            pb.ConverseResponse(
                error=pb.SessionError(stage=stage, code=code, message=message),
                correlation=self._correlation(turn_id),
            )
        )

    # --- turns ---------------------------------------------------------------------------------

    async def _start_turn(self, user_text: str, speech_ended_at: float, stt_finalization: Duration) -> None:
        async with self._turn_lock:
            await self._interrupt_locked()
            self._turn_count += 1
            turn_id = str(self._turn_count)
            self.history.append(
                language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_USER, content=user_text)
            )
            turn = Turn(
                turn_id=turn_id,
                messages=list(self.history),
                correlation=self._correlation(turn_id),
                settings=self.turn_settings,
                upstreams=self.upstreams,
                output=self.output,
                speech_ended_at=speech_ended_at,
                stt_finalization=stt_finalization,
                deadline=min(time.monotonic() + self.limits.turn_budget_s, self._session_deadline),
            )
            await self.output.put(
                pb.ConverseResponse(
                    turn_started=pb.TurnStarted(user_text=user_text), correlation=turn.correlation
                )
            )
            self._turn = turn
            token = turn_id_var.set(turn_id)
            try:
                self._turn_task = self._supervised(self._run_turn(turn), f"turn-{turn_id}")
            finally:
                turn_id_var.reset(token)

    async def _run_turn(self, turn: Turn) -> None:
        try:
            await turn.run()
        except StageFailed as failure:
            TURNS.labels("failed").inc()
            self._remember_reply(turn.heard_text)
            await self._error(failure.stage, failure.code, failure.message, turn.turn_id)
            return
        TURNS.labels("completed").inc()
        self._remember_reply(turn.reply_text)
        await self.output.put(turn.completed_event())
        log.info("turn completed", extra={"reply_chars": len(turn.reply_text)})

    def _remember_reply(self, text: str) -> None:
        if text:
            self.history.append(
                language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_ASSISTANT, content=text)
            )

    async def _interrupt(self) -> None:
        async with self._turn_lock:
            await self._interrupt_locked()

    async def _interrupt_locked(self) -> None:
        """Barge-in: stop the active turn at once; the history keeps only what was heard."""
        turn, task = self._turn, self._turn_task
        if turn is None or task is None or task.done():
            return
        turn.interrupted = True  # from now on no audio of this turn leaves
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        TURNS.labels("interrupted").inc()
        self._remember_reply(turn.heard_text)
        log.info("turn interrupted", extra={"turn": turn.turn_id, "heard_chars": turn.heard_chars})
        await self.output.put(
            pb.ConverseResponse(
                turn_interrupted=pb.TurnInterrupted(heard_text=turn.heard_text), correlation=turn.correlation
            )
        )
