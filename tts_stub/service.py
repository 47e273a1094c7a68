"""TextToSpeechService.Synthesize: speaks text segments in the stub audio code and streams the
audio back in chunks tagged with the characters each chunk has spoken.

A segment is rendered without the code's end-of-utterance silence but followed by one word gap
(`audio_code.WORD_GAP_MS`), so consecutive segments play as one continuous reply: a listener
hears them as a single utterance with a word boundary between segments. A caller that needs
the utterance to end (to feed the audio to a recogniser, say) appends its own silence.

A reader task takes segments off the request stream and queues them as they become due (at a
flush, or at the end of the request stream); it keeps reading while the call's own task renders
and paces the audio, so a bad request is rejected at once even in the middle of a segment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from stubs import audio_code
from stubs.faults import FaultSettings
from stubs.latency import LatencyProfile, sleep_until
from voice.v1 import common_pb2, text_to_speech_pb2, text_to_speech_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import InvalidInput, PcmFormat, parse_audio_format
from voicepipe.config import ServerSettings
from voicepipe.server import GrpcService, Registration
from voicepipe.stage.tts import VoiceInfo, VoiceList
from voicepipe.stub_entry import open_stream, reject

log = logging.getLogger(__name__)

pb = text_to_speech_pb2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextToSpeechService"].full_name
SynthesizeContext = grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse]

# Limits from the contract (text_to_speech.proto).
CHUNK_DURATION_MS = (10, 1000)
DEFAULT_CHUNK_DURATION_MS = 20
MAX_SEGMENT_CHARS = 4096
# Silence after each segment: a word gap, so that segments join into one utterance.
SEGMENT_TRAILING_SILENCE_MS = audio_code.WORD_GAP_MS
# A sentence renders in well under a millisecond, the longest segment at 48 kHz in about 0.15 s:
# segments longer than this render on a worker thread so other calls' audio is not held up.
RENDER_IN_THREAD_CHARS = 512
# Every voice name is accepted and speaks the same audio code.
STUB_VOICES = VoiceList(
    voices=(VoiceInfo(name="default", description="any name: every voice speaks the stub audio code"),),
    accepts_any_name=True,
)


@dataclass(frozen=True)
class SynthesisSettings:
    """A validated SynthesisConfig."""

    fmt: PcmFormat
    chunk_duration_ms: int
    voice: str
    correlation: common_pb2.Correlation

    @property
    def chunk_samples(self) -> int:
        return max(1, audio_code.ms_to_samples(self.chunk_duration_ms, self.fmt.sample_rate))


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
        fmt=fmt, chunk_duration_ms=chunk_ms, voice=config.voice or "default", correlation=config.correlation
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


def original_char_ends(text: str, rendered: audio_code.RenderedSpeech) -> npt.NDArray[np.int64]:
    """For each code point of `text`, the sample position by which it has been spoken.

    The renderer speaks `normalize_text(text)`, which maps every non-space code point to one
    symbol and every whitespace run between words to one word gap. Whitespace counts as spoken
    with the word before it (leading whitespace at once), so text[:end] never stops inside a
    whitespace run."""
    ends = np.zeros(len(text), dtype=np.int64)
    symbol_ends = rendered.char_end_samples
    k = 0  # index into the normalized text
    spoken = 0
    after_space = False
    for i, char in enumerate(text):
        if char.isspace():
            after_space = True
        else:
            if after_space and k > 0:
                k += 1  # the normalized space between two words
            after_space = False
            spoken = int(symbol_ends[k])
            k += 1
        ends[i] = spoken
    return ends


@dataclass(frozen=True)
class Chunk:
    start: int  # samples into the segment
    end: int
    text_start: int
    text_end: int


@dataclass(frozen=True)
class SegmentAudio:
    """One segment's audio in the output encoding, and the characters spoken by each position."""

    audio: bytes
    sample_rate: int
    bytes_per_sample: int
    samples: int
    char_ends: npt.NDArray[np.int64]

    @classmethod
    def render(cls, text: str, fmt: PcmFormat) -> SegmentAudio:
        if not text.strip():
            # Nothing to say; a silence here could split the reply into two utterances.
            return cls(b"", fmt.sample_rate, fmt.bytes_per_sample, 0, np.zeros(len(text), dtype=np.int64))
        rendered = audio_code.render(text, fmt.sample_rate, trailing_silence_ms=SEGMENT_TRAILING_SILENCE_MS)
        return cls(
            audio=fmt.encode(rendered.samples),
            sample_rate=fmt.sample_rate,
            bytes_per_sample=fmt.bytes_per_sample,
            samples=int(rendered.samples.size),
            char_ends=original_char_ends(text, rendered),
        )

    def chunks(self, chunk_samples: int) -> list[Chunk]:
        if not self.samples:
            return []
        starts = np.arange(0, self.samples, chunk_samples, dtype=np.int64)
        ends = np.minimum(starts + chunk_samples, self.samples)
        text_ends = np.searchsorted(self.char_ends, ends, side="right").tolist()
        text_starts = [0, *text_ends[:-1]]
        return [
            Chunk(s0, s1, t0, t1)
            for s0, s1, t0, t1 in zip(starts.tolist(), ends.tolist(), text_starts, text_ends, strict=True)
        ]

    def message(self, chunk: Chunk, segment_id: int) -> pb.AudioChunk:
        return pb.AudioChunk(
            audio=self.audio[chunk.start * self.bytes_per_sample : chunk.end * self.bytes_per_sample],
            segment_id=segment_id,
            text_start=chunk.text_start,
            text_end=chunk.text_end,
            audio_offset=durations.from_samples(chunk.start, self.sample_rate),
        )


class Pacer:
    """When audio may be sent, per the latency profile: a segment's first chunk
    `tts_first_audio_ms` after it became due, then `tts_realtime_factor` x real time (0: as fast
    as the client reads). The next segment is prepared while one streams, but its audio never
    starts before the previous segment's has all been produced."""

    def __init__(self, profile: LatencyProfile) -> None:
        self._first_audio_s = profile.tts_first_audio_ms / 1000
        self._realtime_factor = profile.tts_realtime_factor
        self._engine_free = 0.0

    def start(self, due: float, duration_s: float) -> float:
        """When the segment's first chunk is ready; books the engine until its last."""
        start = max(due + self._first_audio_s, self._engine_free)
        self._engine_free = start + (duration_s / self._realtime_factor if self._realtime_factor else 0.0)
        return start

    async def wait(self, start: float, offset_s: float) -> None:
        """Until the audio at `offset_s` into a segment that starts at `start` has been produced."""
        ready = start + (offset_s / self._realtime_factor if self._realtime_factor else 0.0)
        await sleep_until(ready)


@dataclass(frozen=True)
class DueSegment:
    segment: pb.TextSegment
    due: float  # monotonic time it became due: its flush, or the end of the request stream


class SegmentReader:
    """Reads the requests after the config, queueing segments as they become due; None marks the
    end of the request stream. A bad request is recorded in `failure` (and wakes the queue)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[DueSegment | None] = asyncio.Queue()
        self.failure: Exception | None = None

    async def run(self, requests: AsyncIterator[pb.SynthesizeRequest]) -> None:
        checker = SegmentChecker()
        pending: list[pb.TextSegment] = []
        try:
            async for request in requests:
                segment = checker.check(request)
                pending.append(segment)
                if segment.flush:
                    self._release(pending)
            self._release(pending)
            self.queue.put_nowait(None)
        except Exception as exc:
            self.failure = exc
            self.queue.put_nowait(None)

    def _release(self, pending: list[pb.TextSegment]) -> None:
        due = time.monotonic()
        for segment in pending:
            self.queue.put_nowait(DueSegment(segment, due))
        pending.clear()


class TextToSpeechServicer(text_to_speech_pb2_grpc.TextToSpeechServiceServicer):
    def __init__(self, profile: LatencyProfile) -> None:
        self._profile = profile

    async def Synthesize(
        self, request_iterator: AsyncIterator[pb.SynthesizeRequest], context: SynthesizeContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        requests = aiter(request_iterator)
        settings = await open_stream(requests, context, "segment", "text segment", parse_config)
        log.info(
            "synthesis started",
            extra={
                "audio_format": settings.fmt.describe(),
                "voice": settings.voice,
                "chunk_duration_ms": settings.chunk_duration_ms,
            },
        )
        reader = SegmentReader()
        reader_task = asyncio.create_task(
            reader.run(requests), name=f"tts-read-segments:{settings.correlation.session_id}"
        )
        pacer = Pacer(self._profile)
        rate = settings.fmt.sample_rate
        segments = 0
        try:
            while (item := await reader.queue.get()) is not None:
                text = item.segment.text
                if len(text) > RENDER_IN_THREAD_CHARS:
                    audio = await asyncio.to_thread(SegmentAudio.render, text, settings.fmt)
                else:
                    audio = SegmentAudio.render(text, settings.fmt)
                start = pacer.start(item.due, audio.samples / rate)
                for index, chunk in enumerate(audio.chunks(settings.chunk_samples)):
                    await pacer.wait(start, chunk.start / rate)
                    await self._check(reader, context)
                    message = audio.message(chunk, item.segment.segment_id)
                    if index == 0:
                        ttfa_s = time.monotonic() - item.due
                        message.time_to_first_audio.CopyFrom(durations.from_seconds(ttfa_s))
                        log.debug(
                            "segment audio started",
                            extra={"segment_id": item.segment.segment_id, "ttfa_ms": round(ttfa_s * 1000, 1)},
                        )
                    yield pb.SynthesizeResponse(audio=message, correlation=settings.correlation)
                segments += 1
                yield pb.SynthesizeResponse(
                    segment_complete=pb.SegmentComplete(
                        segment_id=item.segment.segment_id,
                        audio_duration=durations.from_samples(audio.samples, rate),
                    ),
                    correlation=settings.correlation,
                )
            await self._check(reader, context)
        except (asyncio.CancelledError, GeneratorExit):
            log.info("synthesis cancelled", extra={"segments": segments})
            raise
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader_task
        log.info("synthesis ended", extra={"segments": segments})

    async def ListVoices(
        self,
        request: pb.ListVoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListVoicesRequest, pb.ListVoicesResponse],
    ) -> pb.ListVoicesResponse:
        return STUB_VOICES.to_proto()

    @staticmethod
    async def _check(reader: SegmentReader, context: SynthesizeContext) -> None:
        """Ends the call at once if the reader found a bad request."""
        if reader.failure is not None:
            await reject(reader.failure, context)


def build_service(settings: ServerSettings, profile: LatencyProfile, faults: FaultSettings) -> GrpcService:
    """The TTS stub server: TextToSpeechService plus the shared runtime."""
    registration = Registration(
        full_name=SERVICE_NAME,
        add_to_server=text_to_speech_pb2_grpc.add_TextToSpeechServiceServicer_to_server,
        servicer=TextToSpeechServicer(profile),
    )
    return GrpcService("tts_stub", settings, [registration], faults.interceptors())
