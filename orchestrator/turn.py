"""One agent turn: Generate -> sentences -> Synthesize -> reply audio, all overlapped.

The LLM task streams text deltas to the client and cuts them into sentences; the TTS task
speaks each sentence as soon as it is complete, while the LLM writes the next. A stage stream
that breaks is resumed so the client hears every word once: TTS resends the segments whose audio
was not fully received and skips the audio already forwarded; the LLM regenerates and continues
only if the new text starts with exactly what was already delivered (deterministic decoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration

from orchestrator.breaker import BreakerOpen
from orchestrator.calls import DeadlinePassed, StageCall, call_metadata
from orchestrator.metrics import (
    ORCHESTRATOR_ADDED_PARTS_SECONDS,
    ORCHESTRATOR_ADDED_SECONDS,
    STAGE_LATENCY_SECONDS,
    TTFA_SECONDS,
)
from orchestrator.output import Deferred, SessionOutput
from orchestrator.retry import StageFailed, resume_turn_stream
from orchestrator.sentences import SentenceChunker
from orchestrator.upstreams import Upstreams
from voice.v1 import (
    common_pb2,
    language_model_pb2,
    language_model_pb2_grpc,
    text_to_speech_pb2,
    text_to_speech_pb2_grpc,
)
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.durations import from_seconds, to_seconds

log = logging.getLogger(__name__)

# TTS waits on the LLM for text; its deadline is a little later than the LLM's so a stalled LLM
# is reported as the LLM, not as a TTS that ran out of time waiting for it.
TTS_DEADLINE_GRACE_S = 1.0


@dataclass(slots=True)
class _Segment:
    segment_id: int
    text: str
    reply_start: int  # where the segment's text starts in the reply
    forwarded_bytes: int = 0  # reply audio of this segment already handed to the client
    complete: bool = False


@dataclass
class TurnSettings:
    output_format: PcmFormat
    voice: str
    # Reply audio is released in real time, at most this far ahead of playback, so that on
    # barge-in the caller has not been sent much more than it heard, and the history is honest.
    audio_lead_s: float


@dataclass
class Turn:
    """State of one turn; `run()` is the turn's task."""

    turn_id: str
    messages: list[language_model_pb2.ChatMessage]
    correlation: common_pb2.Correlation
    settings: TurnSettings
    upstreams: Upstreams
    output: SessionOutput
    speech_ended_at: float
    stt_finalization: Duration
    transcript_received_at: float
    deadline: float
    reply_text: str = ""
    heard_chars: int = 0
    interrupted: bool = False
    first_audio_at: float | None = None
    llm_ttft: Duration = field(default_factory=Duration)
    llm_first_sentence: Duration | None = None
    tts_first_audio: Duration | None = None
    reply_audio_bytes: int = 0
    playback_started_at: float | None = None
    last_llm_elapsed: Duration = field(default_factory=Duration)
    _segments: list[_Segment] = field(default_factory=list)
    _segment_queue: asyncio.Queue[_Segment | None] = field(default_factory=lambda: asyncio.Queue(256))
    _opened_llm_call: StageCall | None = None  # see open_generation()
    # Moments on the critical path (monotonic), for the round trips in the latency breakdown.
    _llm_call_started_at: float = 0.0
    _last_delta_at: float = 0.0
    _first_sentence_at: float | None = None
    _first_segment_sent_at: float | None = None
    _first_audio_received_at: float | None = None

    @property
    def heard_text(self) -> str:
        return self.reply_text[: self.heard_chars]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.correlation)

    def open_generation(self) -> None:
        """Sends the Generate request now, before the turn's task runs, so that it leaves ahead
        of the events the conversation queues for the client (the LLM is on the critical path,
        they are not). The turn's first attempt takes the call; close() cancels it if none did."""
        # If the breaker is open or time is up, the first attempt meets it again and reports it.
        with contextlib.suppress(BreakerOpen, DeadlinePassed):
            self._opened_llm_call = self._llm_call()

    def close(self) -> None:
        """Cancels a Generate call opened for a turn whose first attempt never took it (the turn
        was never run, or was cancelled before its LLM task started); the turn's owner calls it."""
        call, self._opened_llm_call = self._opened_llm_call, None
        if call is not None:
            call.close()

    async def run(self) -> None:
        """Raises StageFailed when a stage fails for good; cancelled on barge-in."""
        llm = asyncio.create_task(self._generate(), name=f"turn-{self.turn_id}-llm")
        tts = asyncio.create_task(self._speak(), name=f"turn-{self.turn_id}-tts")
        try:
            await asyncio.gather(llm, tts)
        finally:
            for task in (llm, tts):
                task.cancel()
            await asyncio.gather(llm, tts, return_exceptions=True)

    # --- LLM -------------------------------------------------------------------------------

    def _llm_call(self) -> StageCall:
        def start(timeout: float) -> Any:
            self._llm_call_started_at = time.monotonic()
            stub = language_model_pb2_grpc.LanguageModelServiceStub(self.upstreams.llm.channel)
            return stub.Generate(
                language_model_pb2.GenerateRequest(messages=self.messages, correlation=self.correlation),
                timeout=timeout,
                metadata=self.metadata,
                wait_for_ready=True,
            )

        return StageCall.open(self.upstreams.llm, self.deadline, start)

    async def _generate(self) -> None:
        delivered = ""  # text already handed to the client and to TTS
        chunker = SentenceChunker()
        started = time.monotonic()

        async def attempt_once() -> None:
            nonlocal delivered
            received = ""
            opened, self._opened_llm_call = self._opened_llm_call, None
            async with opened or self._llm_call() as call:
                async for response in call.rpc:
                    if response.HasField("complete"):
                        self.llm_ttft = response.complete.time_to_first_token
                        # No more text: the last sentence goes to TTS now, not after the call's
                        # status arrives (for a one-sentence reply that is the first audio).
                        await self._flush_text(chunker)
                        continue
                    received += response.delta.text
                    if len(received) <= len(delivered):
                        if not delivered.startswith(received):
                            raise StageFailed(
                                pb.STAGE_LLM,
                                "DATA_LOSS",
                                "regenerated reply differs from the one being spoken",
                            )
                        continue
                    if not received.startswith(delivered):
                        raise StageFailed(
                            pb.STAGE_LLM, "DATA_LOSS", "regenerated reply differs from the one being spoken"
                        )
                    self.last_llm_elapsed = response.delta.elapsed
                    new_text = received[len(delivered) :]
                    delivered = received
                    await self._deliver_text(new_text, chunker, response.delta.elapsed)

        await resume_turn_stream(pb.STAGE_LLM, attempt_once)
        await self._flush_text(chunker)  # a stream that ended without GenerationComplete
        await self._segment_queue.put(None)
        log.debug("llm done", extra={"chars": len(self.reply_text), "s": time.monotonic() - started})

    async def _deliver_text(self, text: str, chunker: SentenceChunker, elapsed: Duration) -> None:
        self._last_delta_at = time.monotonic()
        self.reply_text += text
        # TTS first: its first audio is on the critical path, the text event to the client is not.
        for sentence in chunker.push(text):
            if self.llm_first_sentence is None:
                self.llm_first_sentence = elapsed
            await self._queue_segment(sentence)
        await self.output.put(
            pb.ConverseResponse(agent_text=pb.AgentText(text=text), correlation=self.correlation)
        )

    async def _flush_text(self, chunker: SentenceChunker) -> None:
        rest = chunker.flush()
        if rest.strip():
            await self._queue_segment(rest)

    async def _queue_segment(self, text: str) -> None:
        if self.llm_first_sentence is None:  # the reply is one unterminated sentence
            self.llm_first_sentence = self.last_llm_elapsed
        if self._first_sentence_at is None:
            self._first_sentence_at = self._last_delta_at
        reply_start = sum(len(s.text) for s in self._segments)
        segment = _Segment(len(self._segments) + 1, text, reply_start)
        self._segments.append(segment)
        await self._segment_queue.put(segment)

    # --- TTS -------------------------------------------------------------------------------

    async def _speak(self) -> None:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(self.upstreams.tts.channel)
        config = text_to_speech_pb2.SynthesizeRequest(
            config=text_to_speech_pb2.SynthesisConfig(
                voice=self.settings.voice,
                audio_format=self.settings.output_format.to_proto(),
                correlation=self.correlation,
            )
        )
        text_done = False
        taken_segments: list[_Segment] = []

        def start(timeout: float) -> Any:
            return stub.Synthesize(timeout=timeout, metadata=self.metadata, wait_for_ready=True)

        async def attempt_once() -> None:
            async def write(call: Any) -> None:
                nonlocal text_done
                await call.write(config)
                # After a resumption: resend what an earlier call took but did not finish speaking.
                for taken in taken_segments:
                    if not taken.complete:
                        await call.write(self._segment_request(taken))
                while not text_done:
                    segment = await self._segment_queue.get()
                    if segment is None:
                        text_done = True
                        break
                    taken_segments.append(segment)
                    if self._first_segment_sent_at is None:
                        self._first_segment_sent_at = time.monotonic()
                    await call.write(self._segment_request(segment))
                await call.done_writing()

            deadline = self.deadline + TTS_DEADLINE_GRACE_S
            async with StageCall.open(self.upstreams.tts, deadline, start) as call:
                writer = call.start_writer(write(call.rpc), name=f"turn-{self.turn_id}-tts-writer")
                async for response in call.rpc:
                    await self._handle_audio(response)
                await writer

        await resume_turn_stream(pb.STAGE_TTS, attempt_once)

    @staticmethod
    def _segment_request(segment: _Segment) -> text_to_speech_pb2.SynthesizeRequest:
        return text_to_speech_pb2.SynthesizeRequest(
            segment=text_to_speech_pb2.TextSegment(
                segment_id=segment.segment_id, text=segment.text, flush=True
            )
        )

    async def _handle_audio(self, response: text_to_speech_pb2.SynthesizeResponse) -> None:
        if response.HasField("segment_complete"):
            self._segments[response.segment_complete.segment_id - 1].complete = True
            return
        chunk = response.audio
        segment = self._segments[chunk.segment_id - 1]
        fmt = self.settings.output_format
        chunk_start = round(chunk.audio_offset.ToNanoseconds() * fmt.sample_rate / 1e9) * fmt.bytes_per_sample
        audio = chunk.audio
        # After a resumption the TTS speaks the segment again from its start: skip what was sent.
        skip = segment.forwarded_bytes - chunk_start
        if skip >= len(audio):
            return
        if skip > 0:
            audio = audio[skip:]
        if self.tts_first_audio is None and chunk.HasField("time_to_first_audio"):
            self.tts_first_audio = chunk.time_to_first_audio
            self._first_audio_received_at = time.monotonic()
        segment.forwarded_bytes += len(audio)
        heard_until = segment.reply_start + chunk.text_end
        offset_s = self.reply_audio_bytes / (fmt.bytes_per_sample * fmt.sample_rate)
        now = time.monotonic()
        if self.playback_started_at is None:
            self.playback_started_at = now
        elif (wait := self.playback_started_at + offset_s - self.settings.audio_lead_s - now) > 0:
            await asyncio.sleep(wait)
        offset = from_seconds(offset_s)
        self.reply_audio_bytes += len(audio)
        event = pb.ConverseResponse(
            reply_audio=pb.ReplyAudio(audio=audio, audio_offset=offset), correlation=self.correlation
        )
        await self.output.put(Deferred(self._sent_audio(event, heard_until)))

    def _sent_audio(
        self, event: pb.ConverseResponse, heard_until: int
    ) -> Callable[[], pb.ConverseResponse | None]:
        def build() -> pb.ConverseResponse | None:
            if self.interrupted:
                return None
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            self.heard_chars = max(self.heard_chars, heard_until)
            return event

        return build

    # --- results ---------------------------------------------------------------------------

    def completed_event(self) -> Deferred:
        """TurnCompleted, built when it leaves: by then the first audio has left too."""

        def build() -> pb.ConverseResponse:
            latency = self._latency()
            return pb.ConverseResponse(
                turn_completed=pb.TurnCompleted(
                    agent_text=self.reply_text,
                    latency=latency,
                    reply_audio_duration=from_seconds(
                        self.reply_audio_bytes
                        / (
                            self.settings.output_format.bytes_per_sample
                            * self.settings.output_format.sample_rate
                        )
                    ),
                ),
                correlation=self.correlation,
            )

        return Deferred(build)

    def _latency(self) -> pb.LatencyBreakdown:
        stt = to_seconds(self.stt_finalization)
        first_sentence = to_seconds(self.llm_first_sentence) if self.llm_first_sentence else 0.0
        tts = to_seconds(self.tts_first_audio) if self.tts_first_audio else 0.0
        latency = pb.LatencyBreakdown(
            stt_finalization=self.stt_finalization,
            llm_time_to_first_token=self.llm_ttft,
            llm_time_to_first_sentence=from_seconds(first_sentence),
            tts_time_to_first_audio=from_seconds(tts),
        )
        STAGE_LATENCY_SECONDS.labels("stt", "finalization").observe(stt)
        STAGE_LATENCY_SECONDS.labels("llm", "first_token").observe(to_seconds(self.llm_ttft))
        STAGE_LATENCY_SECONDS.labels("llm", "first_sentence").observe(first_sentence)
        STAGE_LATENCY_SECONDS.labels("tts", "first_audio").observe(tts)
        if self.first_audio_at is not None:
            ttfa = self.first_audio_at - self.speech_ended_at
            added = ttfa - stt - first_sentence - tts
            latency.time_to_first_audio.CopyFrom(from_seconds(ttfa))
            latency.orchestrator_added.CopyFrom(from_seconds(added))
            TTFA_SECONDS.observe(ttfa)
            ORCHESTRATOR_ADDED_SECONDS.observe(added)
            self._split_added(latency, added, stt, first_sentence, tts)
        return latency

    def _split_added(
        self, latency: pb.LatencyBreakdown, added: float, stt: float, first_sentence: float, tts: float
    ) -> None:
        """Fills in where orchestrator_added went: each stage's round trip and the rest."""
        parts = {
            "stt_round_trip": self.transcript_received_at - self.speech_ended_at - stt,
            "llm_round_trip": (
                self._first_sentence_at - self._llm_call_started_at - first_sentence
                if self._first_sentence_at is not None
                else 0.0
            ),
            "tts_round_trip": (
                self._first_audio_received_at - self._first_segment_sent_at - tts
                if self._first_audio_received_at is not None and self._first_segment_sent_at is not None
                else 0.0
            ),
        }
        parts["orchestrator_processing"] = added - sum(parts.values())
        for name, seconds in parts.items():
            getattr(latency, name).CopyFrom(from_seconds(seconds))
            ORCHESTRATOR_ADDED_PARTS_SECONDS.labels(name).observe(seconds)
