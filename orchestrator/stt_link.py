"""A session's link to STT: one long-lived Transcribe call, resumed transparently on failure.

Audio not yet covered by a final transcript is kept (bounded); when the call breaks (connection
reset, GOAWAY past its grace, stage restart) a new call replays it from the end of the last
final transcript, so the transcripts come out exactly as if nothing had happened."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from orchestrator.breaker import BreakerOpen
from orchestrator.metrics import RESUMPTIONS, STAGE_ERRORS
from orchestrator.upstreams import Upstream
from voice.v1 import common_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe.audio_format import PcmFormat

log = logging.getLogger(__name__)

# Audio kept for replay while no utterance is open; speech that STT has not reported yet is
# never older than this.
IDLE_REPLAY_S = 2.0
# Upper bound on audio kept for replay (an utterance, or audio buffered while STT is down).
MAX_REPLAY_S = 60.0

# After the client ends its input, how long the link keeps trying to deliver the last transcript.
DRAIN_AFTER_INPUT_S = 5.0

# Client audio messages coalesced into one STT message at most (within the STT's size limit).
MAX_CHUNKS_PER_MESSAGE = 8

SPEECH_STARTED = speech_to_text_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED


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


@dataclass(frozen=True, slots=True)
class FinalTranscript:
    text: str
    start: Duration  # session audio offsets
    end: Duration
    finalization: Duration
    speech_ended_at: float  # monotonic arrival time of the audio in which speech ended
    received_at: float  # monotonic time the final result arrived from STT


@dataclass(slots=True)
class _Chunk:
    seq: int
    start_sample: int
    data: bytes
    arrived_at: float


class ReplayBuffer:
    """Session audio since the end of the last final transcript, numbered for the writer."""

    def __init__(self, fmt: PcmFormat) -> None:
        self.fmt = fmt
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self.next_seq = 0
        self.end_sample = 0
        self.changed = asyncio.Event()

    def append(self, data: bytes, arrived_at: float) -> None:
        self._chunks.append(_Chunk(self.next_seq, self.end_sample, data, arrived_at))
        self.next_seq += 1
        self.end_sample += len(data) // self.fmt.bytes_per_sample
        self.changed.set()

    @property
    def first_seq(self) -> int:
        return self._chunks[0].seq if self._chunks else self.next_seq

    @property
    def start_sample(self) -> int:
        return self._chunks[0].start_sample if self._chunks else self.end_sample

    def chunk(self, seq: int) -> _Chunk:
        return self._chunks[seq - self.first_seq]

    def arrival_of(self, sample: int) -> float:
        """When the audio holding `sample` arrived (the latest arrival if it is not held)."""
        for chunk in reversed(self._chunks):
            if chunk.start_sample <= sample:
                return chunk.arrived_at
        return self._chunks[0].arrived_at if self._chunks else time.monotonic()

    def trim_before(self, sample: int, *, sent_seq: int) -> None:
        """Forgets audio before `sample`, cutting a chunk in two where needed, so that a replay
        starts exactly there. Chunks not yet sent (seq >= sent_seq) are kept whole."""
        bps = self.fmt.bytes_per_sample
        while self._chunks and self._chunks[0].seq < sent_seq:
            head = self._chunks[0]
            head_end = head.start_sample + len(head.data) // bps
            if head_end <= sample:
                self._chunks.popleft()
            else:
                if head.start_sample < sample:
                    cut = (sample - head.start_sample) * bps
                    head.data = head.data[cut:]
                    head.start_sample = sample
                break

    def bound(self, *, utterance_open: bool, sent_seq: int) -> None:
        keep_s = MAX_REPLAY_S if utterance_open else IDLE_REPLAY_S
        self.trim_before(self.end_sample - int(keep_s * self.fmt.sample_rate), sent_seq=sent_seq)
        if self.end_sample - self.start_sample > MAX_REPLAY_S * self.fmt.sample_rate:
            # STT has been unreachable for over a minute: drop the oldest audio, and say so.
            log.error("stt replay buffer full; dropping audio", extra={"limit_s": MAX_REPLAY_S})
            self.trim_before(
                self.end_sample - int(MAX_REPLAY_S * self.fmt.sample_rate), sent_seq=self.next_seq
            )


class SpeechRecognitionLink:
    """Runs the session's Transcribe call (as `run()`, the link's task) and reports events."""

    def __init__(
        self,
        upstream: Upstream,
        fmt: PcmFormat,
        correlation: common_pb2.Correlation,
        deadline: Callable[[], float],
        on_speech_started: Callable[[], Awaitable[None]],
        on_transcript: Callable[[str, Duration, Duration], Awaitable[None]],
        on_final: Callable[[FinalTranscript], Awaitable[None]],
        on_error: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._stub = speech_to_text_pb2_grpc.SpeechToTextServiceStub(upstream.channel)
        self._fmt = fmt
        self._config = speech_to_text_pb2.TranscribeRequest(
            config=speech_to_text_pb2.TranscriptionConfig(
                audio_format=fmt.to_proto(), interim_results=True, correlation=correlation
            )
        )
        self._metadata = (("x-session-id", correlation.session_id),)
        self._deadline = deadline
        self._on_speech_started = on_speech_started
        self._on_transcript = on_transcript
        self._on_final = on_final
        self._on_error = on_error
        self.buffer = ReplayBuffer(fmt)
        self._input_ended = False
        self._input_ended_at: float | None = None
        self._sent_seq = 0
        self._utterance_open = False
        self._error_reported = False

    def feed(self, audio: bytes) -> None:
        self.buffer.append(audio, time.monotonic())
        self.buffer.bound(utterance_open=self._utterance_open, sent_seq=self._sent_seq)

    def end_input(self) -> None:
        self._input_ended = True
        self._input_ended_at = time.monotonic()
        self.buffer.changed.set()

    async def run(self) -> None:
        """Until the input has ended and every final transcript is out; reopens broken calls."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            # While the caller talks, keep trying; once input has ended, give up after a while.
            stop=lambda _: (
                self._input_ended_at is not None
                and time.monotonic() - self._input_ended_at > DRAIN_AFTER_INPUT_S
            ),
            wait=wait_exponential_jitter(initial=0.05, max=1.0),
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._transcribe_once()
        except grpc.aio.AioRpcError as error:
            await self._on_error(error.code().name, f"speech recognition failed: {error.details()}")
        except BreakerOpen as error:
            await self._on_error("UNAVAILABLE", str(error))

    async def _before_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = (
            type(error).__name__
            if error is None or not isinstance(error, grpc.aio.AioRpcError)
            else error.code().name
        )
        RESUMPTIONS.labels("stt", reason).inc()
        log.warning(
            "stt stream broken; resuming",
            extra={"reason": str(error), "replay_s": self._replay_seconds(), "attempt": state.attempt_number},
        )
        if isinstance(error, BreakerOpen) and not self._error_reported:
            self._error_reported = True
            await self._on_error(
                "UNAVAILABLE",
                f"{error}; audio is kept (up to {MAX_REPLAY_S:g} s) and transcribed when it is back",
            )

    def _replay_seconds(self) -> float:
        return (self.buffer.end_sample - self.buffer.start_sample) / self._fmt.sample_rate

    async def _transcribe_once(self) -> None:
        self._upstream.breaker.check()
        base_sample = self.buffer.start_sample
        self._sent_seq = self.buffer.first_seq
        timeout = max(0.001, self._deadline() - time.monotonic())
        call: Any = self._stub.Transcribe(timeout=timeout, metadata=self._metadata, wait_for_ready=True)
        self._upstream.calls_in_flight.inc()
        writer = asyncio.create_task(self._write(call), name="stt-writer")
        try:
            async for response in call:
                await self._handle(response, base_sample)
            await writer
            self._upstream.breaker.record_success()
            self._error_reported = False
        except grpc.aio.AioRpcError as error:
            STAGE_ERRORS.labels("stt", error.code().name).inc()
            self._upstream.breaker.record_failure(error.code())
            raise
        finally:
            writer.cancel()
            call.cancel()
            self._upstream.calls_in_flight.dec()
            await asyncio.gather(writer, return_exceptions=True)

    async def _write(self, call: Any) -> None:
        await call.write(self._config)
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
                await call.write(speech_to_text_pb2.TranscribeRequest(audio=b"".join(parts)))
                self._sent_seq = end
            if self._input_ended:
                await call.done_writing()
                return
            buffer.changed.clear()
            await buffer.changed.wait()

    async def _handle(self, response: speech_to_text_pb2.TranscribeResponse, base_sample: int) -> None:
        rate = self._fmt.sample_rate
        if response.HasField("speech_event"):
            if response.speech_event.type == SPEECH_STARTED:
                self._utterance_open = True
                await self._on_speech_started()
            return
        result = response.result
        start = _shift(result.audio_start_offset, base_sample, rate)
        end = _shift(result.audio_end_offset, base_sample, rate)
        if not result.is_final:
            await self._on_transcript(result.transcript, start, end)
            return
        received_at = time.monotonic()
        end_sample = base_sample + _samples(result.audio_end_offset, rate)
        speech_ended_at = self.buffer.arrival_of(max(0, end_sample - 1))
        self.buffer.trim_before(end_sample, sent_seq=self._sent_seq)
        self._utterance_open = False
        await self._on_final(
            FinalTranscript(
                result.transcript, start, end, result.finalization_time, speech_ended_at, received_at
            )
        )


def _samples(offset: Duration, rate: int) -> int:
    return offset.ToNanoseconds() * rate // 1_000_000_000


def _shift(offset: Duration, base_sample: int, rate: int) -> Duration:
    shifted = Duration()
    shifted.FromNanoseconds(offset.ToNanoseconds() + base_sample * 1_000_000_000 // rate)
    return shifted
