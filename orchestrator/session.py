"""One conversation: reads the client's stream, follows what the STT link reports, and hands
the turns to the TurnRunner. Every task it starts is cancelled and awaited when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from orchestrator.output import SessionFailed, SessionOutput
from orchestrator.retry import StageFailed
from orchestrator.sentences import FirstSegment
from orchestrator.stt_link import (
    FinalTranscript,
    InterimTranscript,
    SpeculationWithdrawn,
    SpeculativeTranscript,
    SpeechRecognitionLink,
    SpeechStarted,
    SttFailed,
)
from orchestrator.tickets import Tickets
from orchestrator.timings import TurnTimings
from orchestrator.turn import TurnSettings
from orchestrator.turns import TurnContext, TurnRequest, TurnRunner, report_stage_error
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, resumption_pb2, speech_to_text_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe.audio_format import InvalidInput, PcmFormat

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 4096
DRAINED = "the orchestrator is shutting down: continue the conversation with its last resumption ticket"
# A drained conversation waits this long for its client to half-close before the call ends (a
# grpc.aio client whose write crosses the status sees INTERNAL instead of it: grpc/grpc#36066).
DRAIN_HALF_CLOSE_WAIT_S = 1.0
TAKEN_OVER = "the conversation was resumed on another call"


@dataclass(frozen=True)
class SessionLimits:
    turn_budget_s: float  # deadline for one turn's LLM and TTS calls
    session_budget_s: float  # deadline for the session's STT call (re-armed on resumption)
    max_output_events: int
    slow_client_timeout_s: float
    reply_audio_lead_s: float
    end_of_utterance_silence_ms: int = 0  # asked of the STT stage (0: its default)
    first_segment: FirstSegment = "clause"  # where a reply's first TTS segment may end
    reply_max_tokens: int = 0  # asked of the LLM stage (0: its default)
    speculative_generation: bool = False  # start a turn on STT's speculative transcript


class Conversation:
    """State and tasks of one Converse call."""

    def __init__(
        self,
        start: resumption_pb2.ResumptionState,
        input_format: PcmFormat,
        turn_settings: TurnSettings,
        upstreams: Upstreams,
        limits: SessionLimits,
        tickets: Tickets | None,
        client_deadline: float | None,
        on_stop: Callable[[], None],
        *,
        resumed: bool,
    ) -> None:
        """`start`: the session's settings and where it starts (see TurnRunner), from a ticket
        when `resumed`."""
        session_id = start.session_id
        self.session_id = session_id
        self.resumed = resumed
        self.input_format = input_format
        self.output = SessionOutput(limits.max_output_events, limits.slow_client_timeout_s, self._stop)
        self._on_stop = on_stop
        self._tasks: list[asyncio.Task[None]] = []
        session_deadline = min(time.monotonic() + limits.session_budget_s, client_deadline or float("inf"))
        self._turns = TurnRunner(
            TurnContext(
                session_id, turn_settings, upstreams, self.output, limits.turn_budget_s, session_deadline
            ),
            start,
            tickets,
        )
        self._stt = SpeechRecognitionLink(
            upstreams.stt,
            input_format,
            self._correlation(),
            session_deadline,
            speech_to_text_pb2.EndpointingConfig(
                end_of_utterance_silence_ms=limits.end_of_utterance_silence_ms
            ),
            start.audio_offset,
            speculative=limits.speculative_generation,
        )
        self._turns_before = start.turns
        self._input_closed = asyncio.Event()

    def _correlation(self) -> common_pb2.Correlation:
        return common_pb2.Correlation(session_id=self.session_id)

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[pb.ConverseResponse]:
        """The Converse response stream; `requests` is what follows the config message."""
        started = pb.SessionStarted(
            session_id=self.session_id, resumed=self.resumed, turns_before=self._turns_before
        )
        await self.output.put(pb.ConverseResponse(session_started=started, correlation=self._correlation()))
        await self._turns.send_ticket()
        listener = self._supervised(self._listen(), "stt")
        turns = self._supervised(self._run_turns(), "turns")
        reader = self._supervised(self._read(requests, listener, turns), "reader")
        self._tasks = [reader, listener, turns]
        try:
            async for response in self.output.responses():
                yield response
        finally:
            self._stop()
            await cancel_and_wait(*self._tasks)

    def drain(self) -> None:
        """The server is going away: the turn being played ends (its ticket goes out), then the
        call ends with UNAVAILABLE, and the client continues on another replica."""
        self._turns.drain()

    def take_over(self) -> None:
        """Another call continues this conversation (from its ticket): this one ends now."""
        self.output.fail(SessionFailed(grpc.StatusCode.ABORTED, TAKEN_OVER))

    async def _run_turns(self) -> None:
        await self._turns.run()
        if self._turns.draining:
            await self.output.put(
                pb.ConverseResponse(draining=pb.Draining(), correlation=self._correlation())
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_HALF_CLOSE_WAIT_S):
                    await self._input_closed.wait()
            self.output.close(SessionFailed(grpc.StatusCode.UNAVAILABLE, DRAINED))

    def _stop(self) -> None:
        """Stops the session's work (and with it every upstream call) and frees its slot. Called
        by the output as soon as the session fails (the stream may be stuck writing to a client
        that does not read); run() awaits the tasks when the stream ends."""
        for task in self._tasks:
            task.cancel()
        self._on_stop()

    def _supervised(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A session task whose failure ends the session (INTERNAL when unexpected) instead of
        leaving the client waiting on a stream that nothing feeds any more."""

        async def supervise() -> None:
            try:
                await work
            except SessionFailed as failure:
                self.output.fail(failure)  # already queued, where it was raised
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
                    self._turns.submit(TurnRequest(text, TurnTimings(arrived, Duration(), arrived)))
                elif kind == "control":
                    if request.control.type == pb.CONTROL_TYPE_END_OF_INPUT:
                        break
                    if request.control.type != pb.CONTROL_TYPE_BARGE_IN:
                        raise InvalidInput(
                            f"control.type {request.control.type} is not supported;"
                            " use END_OF_INPUT or BARGE_IN"
                        )
                    self._turns.interrupt()
                elif kind == "config":
                    raise InvalidInput("config may be sent only once, as the first message")
                else:
                    raise InvalidInput("empty request: set one of config, audio, text or control")
            self._input_closed.set()
            self._stt.end_input()
            await listener  # ends after the link's last event
            await self._turns.finish()
            await turns
            self.output.close()
        except InvalidInput as error:
            self.output.fail(SessionFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)))

    async def _listen(self) -> None:
        """What STT reports: barge-in, transcripts for the client, and the turns they start. The
        link's call lives as long as this loop (aclosing: a cancelled session closes it now)."""
        async with contextlib.aclosing(self._stt.events()) as events:
            async for event in events:
                match event:
                    case SpeechStarted():
                        self._turns.interrupt(event.started_at)
                    case InterimTranscript():
                        await self._transcript(event.text, event.start, event.end, is_final=False)
                    case SpeculativeTranscript():
                        # The turn starts on it: STT's part of its latency is this result's, and
                        # the wait for the final's confirmation counts as the orchestrator's.
                        timings = TurnTimings(event.speech_ended_at, event.finalization, event.received_at)
                        await self._turns.speculate(event.text, timings)
                    case SpeculationWithdrawn():
                        await self._turns.withdraw_speculation()
                    case FinalTranscript():
                        # The turn first: when the conversation is idle its Generate request leaves
                        # now, ahead of this event to the client.
                        timings = TurnTimings(event.speech_ended_at, event.finalization, event.received_at)
                        await self._turns.submit_speech(event.text, timings, event.end)
                        await self._transcript(event.text, event.start, event.end, is_final=True)
                    case SttFailed():
                        failure = StageFailed(pb.STAGE_STT, event.code, event.message)
                        await report_stage_error(self.output, failure, self._correlation())

    async def _transcript(self, text: str, start: Duration, end: Duration, *, is_final: bool) -> None:
        await self.output.put(
            pb.ConverseResponse(
                user_transcript=pb.UserTranscript(
                    text=text, is_final=is_final, audio_start_offset=start, audio_end_offset=end
                ),
                correlation=self._correlation(),
            )
        )
