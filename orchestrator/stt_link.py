"""A session's link to STT: one long-lived Transcribe call, resumed transparently on failure.

Audio not yet covered by a final transcript is kept (see replay.py); when the call breaks
(connection reset, GOAWAY past its grace, stage restart) a new call replays it from the end of
the last final transcript, so the transcripts come out exactly as if nothing had happened.

The link is an async generator: the conversation iterates `events()`, which holds the call and
yields what STT reports, in order, and ends after the link. The link reads on only when the
conversation asks for the next event, so a final transcript's turn (its Generate request) starts
before anything else is done, with no hand-over between tasks on the way."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from tenacity import RetryCallState

from orchestrator.breaker import BreakerOpen
from orchestrator.calls import DeadlinePassed, StageCall, call_metadata
from orchestrator.replay import MAX_REPLAY_S, ReplayBuffer
from orchestrator.retry import Resumption
from orchestrator.upstreams import Upstream
from voice.v1 import common_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe.audio_format import PcmFormat

# After the client ends its input, how long the link keeps trying to deliver the last transcript.
DRAIN_AFTER_INPUT_S = 5.0

# Client audio messages coalesced into one STT message at most (within the STT's size limit).
MAX_CHUNKS_PER_MESSAGE = 8

SPEECH_STARTED = speech_to_text_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED
SPECULATION_WITHDRAWN = speech_to_text_pb2.SPEECH_EVENT_TYPE_SPECULATION_WITHDRAWN


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    started_at: float  # monotonic arrival time of the audio in which speech began


@dataclass(frozen=True, slots=True)
class InterimTranscript:
    text: str
    start: Duration  # session audio offsets
    end: Duration


@dataclass(frozen=True, slots=True)
class SpeculativeTranscript:
    """What STT heard when the speech paused; the final confirms it or a withdrawal follows."""

    text: str
    finalization: Duration  # the stage's time on it
    speech_ended_at: float  # monotonic arrival time of the audio in which speech paused
    received_at: float


@dataclass(frozen=True, slots=True)
class SpeculationWithdrawn:
    """Speech resumed: the speculative transcript is withdrawn."""


@dataclass(frozen=True, slots=True)
class FinalTranscript:
    text: str
    start: Duration  # session audio offsets
    end: Duration
    finalization: Duration
    speech_ended_at: float  # monotonic arrival time of the audio in which speech ended
    received_at: float  # monotonic time the final result arrived from STT


@dataclass(frozen=True, slots=True)
class SttFailed:
    """STT is unavailable (the link keeps trying, once said) or failed for good (the link ends)."""

    code: str
    message: str


SpeechEvent = (
    SpeechStarted
    | InterimTranscript
    | SpeculativeTranscript
    | SpeculationWithdrawn
    | FinalTranscript
    | SttFailed
)


class SpeechRecognitionLink:
    """Runs the session's Transcribe call while `events()` is iterated, and reports events."""

    def __init__(
        self,
        upstream: Upstream,
        fmt: PcmFormat,
        correlation: common_pb2.Correlation,
        deadline: float,
        endpointing: speech_to_text_pb2.EndpointingConfig,
        audio_offset: Duration,
        *,
        speculative: bool = False,
    ) -> None:
        """`audio_offset`: where the session audio fed next starts (non-zero when resumed)."""
        self._upstream = upstream
        self._stub = speech_to_text_pb2_grpc.SpeechToTextServiceStub(upstream.channel)
        self._fmt = fmt
        self._config = speech_to_text_pb2.TranscribeRequest(
            config=speech_to_text_pb2.TranscriptionConfig(
                audio_format=fmt.to_proto(),
                interim_results=True,
                speculative_results=speculative,
                endpointing=endpointing,
                correlation=correlation,
            )
        )
        self._metadata = call_metadata(correlation)
        self._writer_name = f"session-{correlation.session_id}-stt-writer"
        self._deadline = deadline
        self._resumption = Resumption(
            "stt", stop=self._drained, initial_wait_s=0.05, max_wait_s=1.0, retry_breaker_open=True
        )
        self.buffer = ReplayBuffer(fmt, _samples(audio_offset, fmt.sample_rate))
        self._input_ended = False
        self._input_ended_at: float | None = None
        self._sent_seq = 0
        self._utterance_open = False
        self._unavailable_reported = False

    def feed(self, audio: bytes) -> None:
        now = time.monotonic()
        self.buffer.append(audio, now)
        self.buffer.bound(utterance_open=self._utterance_open, sent_seq=self._sent_seq, now=now)

    def end_input(self) -> None:
        self._input_ended = True
        self._input_ended_at = time.monotonic()
        self.buffer.changed.set()

    async def events(self) -> AsyncGenerator[SpeechEvent, None]:
        """What STT reports, in order, until the input has ended and every final transcript is
        out; broken calls are reopened. Close it (aclosing) to end the call early."""
        try:
            async for event in self._resumption.stream(
                self._transcribe_once, log_fields=lambda: {"replay_s": self.buffer.held_seconds}
            ):
                yield event
        except grpc.aio.AioRpcError as error:
            yield SttFailed(error.code().name, f"speech recognition failed: {error.details()}")
        except DeadlinePassed:
            yield SttFailed("DEADLINE_EXCEEDED", "speech recognition failed: Deadline Exceeded")
        except BreakerOpen as error:
            yield SttFailed("UNAVAILABLE", str(error))

    def _drained(self, _state: RetryCallState) -> bool:
        """While the caller talks, keep trying; once input has ended, give up after a while."""
        return (
            self._input_ended_at is not None and time.monotonic() - self._input_ended_at > DRAIN_AFTER_INPUT_S
        )

    def _start(self, timeout: float) -> Any:
        return self._stub.Transcribe(timeout=timeout, metadata=self._metadata, wait_for_ready=True)

    async def _transcribe_once(self) -> AsyncGenerator[SpeechEvent, None]:
        try:
            call = StageCall.open(self._upstream, self._deadline, self._start)
        except BreakerOpen as error:
            if not self._unavailable_reported:  # said once; the link keeps trying
                self._unavailable_reported = True
                yield SttFailed(
                    "UNAVAILABLE",
                    f"{error}; audio is kept (up to {MAX_REPLAY_S:g} s) and transcribed when it is back",
                )
            raise
        try:
            async with call:
                base_sample = self.buffer.start_sample
                self._sent_seq = self.buffer.first_seq
                writer = call.start_writer(self._write(call.rpc), name=self._writer_name)
                async for response in call.rpc:
                    if (event := self._event(response, base_sample)) is not None:
                        yield event
                await writer
        finally:
            self.buffer.forget_sent()
        self._unavailable_reported = False

    async def _write(self, rpc: Any) -> None:
        await rpc.write(self._config)
        buffer = self.buffer
        while True:
            while self._sent_seq < buffer.next_seq:
                # Audio that arrived while the previous write was in flight goes out as one
                # message: fewer messages under load, no added wait when idle.
                parts = [buffer.chunk(self._sent_seq).data]
                size = len(parts[0])
                end = self._sent_seq + 1
                while end < buffer.next_seq and len(parts) < MAX_CHUNKS_PER_MESSAGE:
                    data = buffer.chunk(end).data
                    if size + len(data) > self._fmt.max_message_bytes:
                        break
                    parts.append(data)
                    size += len(data)
                    end += 1
                await rpc.write(speech_to_text_pb2.TranscribeRequest(audio=b"".join(parts)))
                buffer.mark_sent(self._sent_seq, end, time.monotonic())
                self._sent_seq = end
            if self._input_ended:
                await rpc.done_writing()
                return
            buffer.changed.clear()
            await buffer.changed.wait()

    def _event(self, response: speech_to_text_pb2.TranscribeResponse, base_sample: int) -> SpeechEvent | None:
        rate = self._fmt.sample_rate
        if response.HasField("speech_event"):
            if response.speech_event.type == SPECULATION_WITHDRAWN:
                return SpeculationWithdrawn()
            if response.speech_event.type != SPEECH_STARTED:
                return None
            self._utterance_open = True
            start_sample = base_sample + _samples(response.speech_event.audio_offset, rate)
            return SpeechStarted(self.buffer.arrival_of(start_sample))
        result = response.result
        received_at = time.monotonic()
        end_sample = base_sample + _samples(result.audio_end_offset, rate)
        speech_ended_at = self.buffer.arrival_of(max(0, end_sample - 1))
        if result.speculative:
            return SpeculativeTranscript(
                result.transcript, result.finalization_time, speech_ended_at, received_at
            )
        start = _shift(result.audio_start_offset, base_sample, rate)
        end = _shift(result.audio_end_offset, base_sample, rate)
        if not result.is_final:
            return InterimTranscript(result.transcript, start, end)
        self.buffer.trim_before(end_sample, sent_seq=self._sent_seq)
        self._utterance_open = False
        return FinalTranscript(
            result.transcript, start, end, result.finalization_time, speech_ended_at, received_at
        )


def _samples(offset: Duration, rate: int) -> int:
    return offset.ToNanoseconds() * rate // 1_000_000_000


def _shift(offset: Duration, base_sample: int, rate: int) -> Duration:
    shifted = Duration()
    shifted.FromNanoseconds(offset.ToNanoseconds() + base_sample * 1_000_000_000 // rate)
    return shifted
