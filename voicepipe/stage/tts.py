"""The text-to-speech side of the stage SDK: `VoiceEngine` is what an engine implements,
`TextToSpeechServicer` serves it as voice.v1.TextToSpeechService.Synthesize."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from voice.v1 import common_pb2, text_to_speech_pb2, text_to_speech_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import InvalidInput, PcmFormat, parse_audio_format
from voicepipe.pcm import Resampler, Samples
from voicepipe.stage import Engine
from voicepipe.stage.protocol import STAGE_FIGURE_SECONDS, CallOutbox, SessionLimit, serve_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesisSettings:
    """A validated SynthesisConfig, as the engine sees it."""

    fmt: PcmFormat  # what the client wants back
    voice: str  # as the client named it; "" means the engine's default
    chunk_duration_ms: int
    correlation: common_pb2.Correlation


@dataclass(frozen=True)
class Segment:
    """One text segment to speak. `due` (time.monotonic()) is when it became due for synthesis:
    its flush, or the end of the request stream; time to first audio is measured from there."""

    segment_id: int
    text: str
    due: float


@dataclass(frozen=True)
class SpeechAudio:
    """Audio as the engine produces it, at `VoiceEngine.sample_rate(settings)`: once these samples
    have played, `segment.text[:text_end]` has been spoken (text_end never decreases within a
    segment and must reach len(text) with the last piece). Pieces may be any length; the SDK
    cuts them into the client's chunks."""

    samples: Samples
    text_end: int


@dataclass(frozen=True)
class VoiceInfo:
    """A voice SynthesisConfig.voice may name."""

    name: str  # what to put in SynthesisConfig.voice
    description: str
    language_codes: tuple[str, ...] = ()  # BCP-47, most suitable first
    gender: str = ""  # "male", "female" or "" when unspecified


@dataclass(frozen=True)
class VoiceList:
    """What ListVoices answers: the voices, the variants any of them may take as "+variant", and
    whether any name at all is accepted (an engine with a single voice)."""

    voices: tuple[VoiceInfo, ...]
    variants: tuple[str, ...] = ()
    accepts_any_name: bool = False

    def to_proto(self) -> text_to_speech_pb2.ListVoicesResponse:
        return text_to_speech_pb2.ListVoicesResponse(
            voices=[
                text_to_speech_pb2.Voice(
                    name=voice.name,
                    description=voice.description,
                    language_codes=voice.language_codes,
                    gender=voice.gender,
                )
                for voice in self.voices
            ],
            variants=self.variants,
            accepts_any_name=self.accepts_any_name,
        )


class VoiceEngine(Engine):
    """A speech synthesiser. One instance per process, shared by every call."""

    def sample_rate(self, settings: SynthesisSettings) -> int:
        """The rate the engine produces; the SDK resamples to the client's. The default is the
        client's own rate."""
        return settings.fmt.sample_rate

    def check(self, settings: SynthesisSettings) -> None:
        """Rejects settings the engine cannot do, such as an unknown voice (raise InvalidInput)."""

    async def list_voices(self) -> VoiceList:
        """The voices `check` accepts, for ListVoices. The default: one voice, under any name."""
        return VoiceList(
            voices=(VoiceInfo(name="default", description="the only voice; any name selects it"),),
            accepts_any_name=True,
        )

    def synthesize(self, settings: SynthesisSettings, segment: Segment) -> AsyncGenerator[SpeechAudio, None]:
        """Speaks one segment, yielding audio as it is produced (the first piece should leave
        before the whole segment is synthesised). Closing the iterator must stop the synthesis."""
        raise NotImplementedError


# --- serving a VoiceEngine -------------------------------------------------------------------

pb = text_to_speech_pb2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextToSpeechService"].full_name
SynthesizeContext = grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse]

# Limits from the contract (text_to_speech.proto).
CHUNK_DURATION_MS = (10, 1000)
DEFAULT_CHUNK_DURATION_MS = 20
MAX_SEGMENT_CHARS = 4096


def parse_config(config: pb.SynthesisConfig) -> SynthesisSettings:
    """Validates the config; raises InvalidInput naming the offending field."""
    fmt = parse_audio_format(config.audio_format, "config.audio_format")
    chunk_ms = config.chunk_duration_ms or DEFAULT_CHUNK_DURATION_MS
    low, high = CHUNK_DURATION_MS
    if not low <= chunk_ms <= high:
        raise InvalidInput(
            f"config.chunk_duration_ms {chunk_ms} is out of range;"
            f" use {low} to {high} (0 means {DEFAULT_CHUNK_DURATION_MS})"
        )
    return SynthesisSettings(
        fmt=fmt, voice=config.voice, chunk_duration_ms=chunk_ms, correlation=config.correlation
    )


class SegmentChecker:
    """Validates the requests that follow the config."""

    def __init__(self) -> None:
        self._last_id: int | None = None

    def check(self, request: pb.SynthesizeRequest) -> pb.TextSegment:
        kind = request.WhichOneof("request")
        if kind == "config":
            raise InvalidInput("config was sent twice; send it once, in the first request only")
        if kind is None:
            raise InvalidInput("request has neither config nor segment set")
        segment = request.segment
        if not segment.text:
            raise InvalidInput(
                f"segment {segment.segment_id}: segment.text is empty;"
                f" send 1 to {MAX_SEGMENT_CHARS} characters"
            )
        if len(segment.text) > MAX_SEGMENT_CHARS:
            raise InvalidInput(
                f"segment {segment.segment_id}: segment.text has {len(segment.text)} characters,"
                f" over the limit of {MAX_SEGMENT_CHARS}"
            )
        if self._last_id is not None and segment.segment_id <= self._last_id:
            raise InvalidInput(
                f"segment.segment_id {segment.segment_id} does not increase (the previous segment was"
                f" {self._last_id}); segment ids must be strictly increasing"
            )
        self._last_id = segment.segment_id
        return segment


class SegmentReader:
    """Reads the requests after the config, queueing segments as they become due (at a flush,
    or at the end of the request stream); None marks the end. A bad request raises, which ends
    the call (see CallOutbox) even in the middle of a segment."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Segment | None] = asyncio.Queue()

    async def run(self, requests: AsyncIterator[pb.SynthesizeRequest]) -> None:
        checker = SegmentChecker()
        pending: list[pb.TextSegment] = []
        async for request in requests:
            segment = checker.check(request)
            pending.append(segment)
            if segment.flush:
                self._release(pending)
        self._release(pending)
        self.queue.put_nowait(None)

    def _release(self, pending: list[pb.TextSegment]) -> None:
        due = time.monotonic()
        for segment in pending:
            self.queue.put_nowait(Segment(segment.segment_id, segment.text, due))
        pending.clear()


class SegmentChunker:
    """Cuts one segment's audio, as the engine produces it, into the client's chunks: resampled
    to the client's rate and encoded, each tagged with the characters it speaks. A chunk speaks
    the text of every engine piece whose audio has all been played by its end."""

    def __init__(self, settings: SynthesisSettings, engine_rate: int, segment: Segment) -> None:
        self._fmt = settings.fmt
        self._rate = settings.fmt.sample_rate
        self._engine_rate = engine_rate
        self._chunk = max(1, (settings.chunk_duration_ms * self._rate + 500) // 1000)  # rounded
        self._segment = segment
        self._resample = Resampler(engine_rate, self._rate)
        self._buffer: Samples = np.zeros(0, dtype=np.int16)
        self._sent = 0  # client-rate samples sent
        self._engine_samples = 0
        # (engine samples so far, text_end) of each piece, in order
        self._marks: collections.deque[tuple[int, int]] = collections.deque()
        self._text_end = 0
        self.chunks = 0

    def add(self, piece: SpeechAudio) -> list[pb.AudioChunk]:
        self._engine_samples += piece.samples.size
        self._marks.append((self._engine_samples, piece.text_end))
        return self._cut(self._resample(piece.samples), last=False)

    def finish(self) -> list[pb.AudioChunk]:
        return self._cut(self._resample.flush(), last=True)

    @property
    def samples(self) -> int:
        return self._sent

    def _cut(self, samples: Samples, *, last: bool) -> list[pb.AudioChunk]:
        if samples.size:
            self._buffer = np.concatenate((self._buffer, samples)) if self._buffer.size else samples
        out = []
        while self._buffer.size >= self._chunk or (last and self._buffer.size):
            take = min(self._chunk, self._buffer.size)
            out.append(self._message(self._buffer[:take], last=last and take == self._buffer.size))
            self._buffer = self._buffer[take:]
        return out

    def _message(self, samples: Samples, *, last: bool) -> pb.AudioChunk:
        start = self._sent
        self._sent += samples.size
        text_start = self._text_end
        # The text of every piece whose audio ends by this chunk's end (compared in engine samples).
        while self._marks and self._marks[0][0] * self._rate <= self._sent * self._engine_rate:
            self._text_end = max(self._text_end, self._marks.popleft()[1])
        if last and self._marks:
            self._text_end = max(self._text_end, self._marks[-1][1])
            self._marks.clear()
        message = pb.AudioChunk(
            audio=self._fmt.encode(samples),
            segment_id=self._segment.segment_id,
            text_start=text_start,
            text_end=self._text_end,
            audio_offset=durations.from_samples(start, self._rate),
        )
        if self.chunks == 0:
            ttfa_s = time.monotonic() - self._segment.due
            message.time_to_first_audio.CopyFrom(durations.from_seconds(ttfa_s))
            STAGE_FIGURE_SECONDS.labels("tts_time_to_first_audio").observe(ttfa_s)
            log.debug(
                "segment audio started",
                extra={"segment_id": self._segment.segment_id, "ttfa_ms": round(ttfa_s * 1000, 1)},
            )
        self.chunks += 1
        return message


@dataclass
class _SegmentCount:
    """Segments a call has spoken in full (for its log lines)."""

    segments: int = 0


class TextToSpeechServicer(text_to_speech_pb2_grpc.TextToSpeechServiceServicer):
    """Serves a VoiceEngine as TextToSpeechService.Synthesize: segments in order, one at a time,
    each streamed as the engine produces it."""

    def __init__(self, engine: VoiceEngine, sessions: SessionLimit) -> None:
        self._engine = engine
        self._sessions = sessions

    def _parse(self, config: pb.SynthesisConfig) -> SynthesisSettings:
        settings = parse_config(config)
        self._engine.check(settings)
        return settings

    async def Synthesize(
        self, request_iterator: AsyncIterator[pb.SynthesizeRequest], context: SynthesizeContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        call = serve_stream(
            request_iterator,
            context,
            data=("segment", "text segment"),
            parse=self._parse,
            sessions=self._sessions,
            body=self._synthesize,
        )
        async with contextlib.aclosing(call) as responses:  # a cancelled call stops its tasks now
            async for response in responses:
                yield response

    async def _synthesize(
        self, settings: SynthesisSettings, requests: AsyncIterator[pb.SynthesizeRequest]
    ) -> AsyncGenerator[pb.SynthesizeResponse, None]:
        log.info(
            "synthesis started",
            extra={
                "audio_format": settings.fmt.describe(),
                "voice": settings.voice,
                "chunk_duration_ms": settings.chunk_duration_ms,
            },
        )
        reader = SegmentReader()
        outbox: CallOutbox[pb.SynthesizeResponse] = CallOutbox(settings.correlation.session_id)
        spoken = _SegmentCount()
        outbox.start(reader.run(requests), "tts-read-segments")
        outbox.start(self._speak(settings, reader, outbox, spoken), "tts-synthesize")
        try:
            async with contextlib.aclosing(outbox.responses()) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            log.info("synthesis cancelled", extra={"segments": spoken.segments})
            raise
        log.info("synthesis ended", extra={"segments": spoken.segments})

    async def _speak(
        self,
        settings: SynthesisSettings,
        reader: SegmentReader,
        outbox: CallOutbox[pb.SynthesizeResponse],
        spoken: _SegmentCount,
    ) -> None:
        """Speaks the segments as they become due, each streamed as the engine produces it."""
        engine_rate = self._engine.sample_rate(settings)
        correlation = settings.correlation
        while (segment := await reader.queue.get()) is not None:
            chunker = SegmentChunker(settings, engine_rate, segment)
            async with contextlib.aclosing(self._engine.synthesize(settings, segment)) as pieces:
                async for piece in pieces:
                    for chunk in chunker.add(piece):
                        await outbox.send(pb.SynthesizeResponse(audio=chunk, correlation=correlation))
            for chunk in chunker.finish():
                await outbox.send(pb.SynthesizeResponse(audio=chunk, correlation=correlation))
            spoken.segments += 1
            await outbox.send(
                pb.SynthesizeResponse(
                    segment_complete=pb.SegmentComplete(
                        segment_id=segment.segment_id,
                        audio_duration=durations.from_samples(chunker.samples, settings.fmt.sample_rate),
                    ),
                    correlation=correlation,
                )
            )
        outbox.end()

    async def ListVoices(
        self,
        request: pb.ListVoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListVoicesRequest, pb.ListVoicesResponse],
    ) -> pb.ListVoicesResponse:
        return (await self._engine.list_voices()).to_proto()
