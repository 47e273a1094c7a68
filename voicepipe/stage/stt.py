"""The speech-to-text side of the stage SDK: `SpeechEngine` is what an engine implements,
`SpeechToTextServicer` serves it as voice.v1.SpeechToTextService.Transcribe."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc

from voice.v1 import common_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import InvalidInput, PcmFormat, parse_audio_format
from voicepipe.pcm import Resampler, Samples
from voicepipe.stage import Engine
from voicepipe.stage.protocol import STAGE_FIGURE_SECONDS, CallOutbox, Failure, SessionLimit, serve_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TranscriptionSettings:
    """A validated TranscriptionConfig, as the engine sees it."""

    fmt: PcmFormat  # what the client sends
    language_code: str  # BCP-47, "en-US" when the client left it empty
    interim_results: bool
    speculative_results: bool
    end_of_utterance_silence_ms: int
    speech_start_ms: int
    correlation: common_pb2.Correlation
    # The client left the silence to the engine (0): an engine may then choose it per pause.
    engine_silence: bool = False


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began at `offset` (samples at the engine's rate, from the start of the call)."""

    offset: int


@dataclass(frozen=True)
class Transcript:
    """An interim, speculative or final transcript of the current utterance, with its span in
    samples at the engine's rate. After a final the SDK sends END_OF_UTTERANCE at `end` and the
    next utterance begins. `stability` applies to interims (the SDK sends 1.0 on finals),
    `confidence` to finals. A speculative one (not final) is what the engine heard when speech
    paused at `end`: the engine follows it with the final or with SpeculationWithdrawn (see
    TranscriptionResult.speculative); the SDK passes both on only to clients that asked."""

    text: str
    is_final: bool
    start: int
    end: int
    stability: float = 0.0
    confidence: float = 0.0
    speculative: bool = False


@dataclass(frozen=True)
class SpeculationWithdrawn:
    """Speech resumed: the speculative transcript that ended at `end` is withdrawn."""

    end: int


SpeechEvent = SpeechStarted | Transcript | SpeculationWithdrawn


@dataclass(frozen=True)
class Endpointing:
    """The endpointing an engine is made for: what a client's 0 ("the stage's default") means."""

    end_of_utterance_silence_ms: int
    speech_start_ms: int


class SpeechEngine(Engine):
    """A speech recogniser. One instance per process, shared by every call. Every engine
    declares the endpointing that suits what it hears (`default_endpointing`)."""

    default_endpointing: Endpointing

    def sample_rate(self, settings: TranscriptionSettings) -> int:
        """The rate the engine wants its audio at; the SDK resamples to it. The default is the
        client's own rate (no resampling)."""
        return settings.fmt.sample_rate

    def check(self, settings: TranscriptionSettings) -> None:
        """Rejects settings the engine cannot do (raise voicepipe.audio_format.InvalidInput)."""

    def transcribe(
        self, settings: TranscriptionSettings, audio: AsyncIterator[Samples]
    ) -> AsyncGenerator[SpeechEvent, None]:
        """One call: consumes int16 mono audio at `sample_rate(settings)` (the iterator ends when
        the client half-closes) and yields events in the order the audio was spoken, ending after
        the last utterance is finalised. Every task it starts must be done when it returns or
        is closed."""
        raise NotImplementedError


# --- serving a SpeechEngine ------------------------------------------------------------------

pb = speech_to_text_pb2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeechToTextService"].full_name
TranscribeContext = grpc.aio.ServicerContext[pb.TranscribeRequest, pb.TranscribeResponse]

# Endpointing limits from the contract (speech_to_text.proto); 0 is the engine's default.
END_OF_UTTERANCE_SILENCE_MS = (80, 5000)
SPEECH_START_MS = (5, 1000)
DEFAULT_LANGUAGE = "en-US"
# Audio messages read ahead of the engine; beyond this the client is slowed by flow control.
AUDIO_READ_AHEAD = 256
# How long arrival times are kept beyond the endpointing silence (finalization_time starts at the
# arrival of the audio in which speech ended), and at most how many messages.
ARRIVAL_MARGIN_MS = 3000
MAX_ARRIVALS = 4096


def _in_range(value: int, field: str, limits: tuple[int, int], default: int) -> int:
    if value == 0:
        return default
    low, high = limits
    if not low <= value <= high:
        raise InvalidInput(f"{field} {value} is out of range; use {low} to {high} (0 means {default})")
    return value


def parse_config(config: pb.TranscriptionConfig, defaults: Endpointing) -> TranscriptionSettings:
    """Validates the config (0s become the engine's `defaults`); raises InvalidInput naming the
    offending field."""
    fmt = parse_audio_format(config.audio_format, "config.audio_format")
    endpointing = config.endpointing
    return TranscriptionSettings(
        fmt=fmt,
        language_code=config.language_code or DEFAULT_LANGUAGE,
        interim_results=config.interim_results,
        speculative_results=config.speculative_results,
        end_of_utterance_silence_ms=_in_range(
            endpointing.end_of_utterance_silence_ms,
            "config.endpointing.end_of_utterance_silence_ms",
            END_OF_UTTERANCE_SILENCE_MS,
            defaults.end_of_utterance_silence_ms,
        ),
        speech_start_ms=_in_range(
            endpointing.speech_start_ms,
            "config.endpointing.speech_start_ms",
            SPEECH_START_MS,
            defaults.speech_start_ms,
        ),
        correlation=config.correlation,
        engine_silence=endpointing.end_of_utterance_silence_ms == 0,
    )


class ArrivalLog:
    """When recent audio messages arrived, keyed by the stream position (engine samples) where
    each ends, to find when the audio holding a given sample was received."""

    def __init__(self, keep_samples: int) -> None:
        self._keep = keep_samples
        self._entries: collections.deque[tuple[int, float]] = collections.deque(maxlen=MAX_ARRIVALS)

    def add(self, start: int, end: int, arrived: float) -> None:
        self._entries.append((end, arrived))
        while len(self._entries) > 1 and self._entries[0][0] <= start - self._keep:
            self._entries.popleft()

    def arrival_of(self, sample_end: int, default: float) -> float:
        """Arrival time of the message holding the samples just before position `sample_end`."""
        found = default
        for end, arrived in reversed(self._entries):
            if end < sample_end:
                break
            found = arrived
        return found


@dataclass(frozen=True)
class _Final:
    """A final (or speculative) transcript and when the audio in which its speech ended (or
    paused) arrived."""

    transcript: Transcript
    speech_ended_at: float


class _AudioChannel:
    """Audio read off the request stream, handed to the engine in order. A bad request is
    queued behind the audio before it: when the engine reaches it, everything the engine made of
    the earlier audio is already in the outbox, and the failure goes after it."""

    def __init__(self, outbox: CallOutbox[pb.TranscribeResponse]) -> None:
        self._queue: asyncio.Queue[Samples | Failure | None] = asyncio.Queue(AUDIO_READ_AHEAD)
        self._outbox = outbox

    async def put(self, item: Samples | Failure | None) -> None:
        await self._queue.put(item)

    async def __aiter__(self) -> AsyncIterator[Samples]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, Failure):
                self._outbox.fail(item.error)
                await asyncio.Event().wait()  # the call ends, cancelling this
                return
            yield item


class _Call:
    """One Transcribe call: the reader feeding the engine, the engine's events, the responses."""

    def __init__(self, engine: SpeechEngine, settings: TranscriptionSettings) -> None:
        self.settings = settings
        self.engine = engine
        self.rate = engine.sample_rate(settings)
        self.outbox: CallOutbox[pb.TranscribeResponse] = CallOutbox(settings.correlation.session_id)
        self.audio = _AudioChannel(self.outbox)
        self.arrivals = ArrivalLog(
            (settings.end_of_utterance_silence_ms + ARRIVAL_MARGIN_MS) * self.rate // 1000
        )
        self.samples_fed = 0
        self.utterance_index = 0

    async def read(self, requests: AsyncIterator[pb.TranscribeRequest]) -> None:
        fmt = self.settings.fmt
        resample = Resampler(fmt.sample_rate, self.rate)
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "config":
                    raise InvalidInput("config was sent twice; send it once, in the first request only")
                if kind != "audio":
                    raise InvalidInput("request has neither config nor audio set")
                fmt.check_message(request.audio)
                await self._feed(resample(fmt.decode(request.audio)), time.monotonic())
            await self._feed(resample.flush(), time.monotonic())
            await self.audio.put(None)
        except Exception as exc:
            await self.audio.put(Failure(exc))

    async def _feed(self, samples: Samples, arrived: float) -> None:
        if not samples.size:
            return
        start = self.samples_fed
        self.samples_fed += samples.size
        self.arrivals.add(start, self.samples_fed, arrived)
        await self.audio.put(samples)

    async def recognise(self) -> None:
        async with contextlib.aclosing(self.engine.transcribe(self.settings, aiter(self.audio))) as events:
            async for event in events:
                if isinstance(event, Transcript) and (event.is_final or event.speculative):
                    ended = self.arrivals.arrival_of(event.end, time.monotonic())
                    responses = self.responses(_Final(event, ended))
                else:
                    responses = self.responses(event)
                for response in responses:
                    await self.outbox.send(response)
        self.outbox.end()

    def responses(
        self, item: SpeechStarted | Transcript | SpeculationWithdrawn | _Final
    ) -> list[pb.TranscribeResponse]:
        correlation = self.settings.correlation
        if isinstance(item, SpeechStarted):
            return [self._speech_event(pb.SPEECH_EVENT_TYPE_SPEECH_STARTED, item.offset)]
        if isinstance(item, SpeculationWithdrawn):
            if not self.settings.speculative_results:
                return []
            return [self._speech_event(pb.SPEECH_EVENT_TYPE_SPECULATION_WITHDRAWN, item.end)]
        if isinstance(item, Transcript):  # an interim
            if not self.settings.interim_results:
                return []
            result = self._result(item, stability=item.stability)
            return [pb.TranscribeResponse(result=result, correlation=correlation)]
        finalization_s = time.monotonic() - item.speech_ended_at
        if item.transcript.speculative:
            if not self.settings.speculative_results:
                return []
            speculative = self._result(item.transcript, stability=item.transcript.stability)
            speculative.speculative = True
            speculative.finalization_time.CopyFrom(durations.from_seconds(finalization_s))
            return [pb.TranscribeResponse(result=speculative, correlation=correlation)]
        final = self._result(item.transcript, stability=1.0)
        final.is_final = True
        final.confidence = item.transcript.confidence
        final.finalization_time.CopyFrom(durations.from_seconds(finalization_s))
        STAGE_FIGURE_SECONDS.labels("stt_finalization").observe(finalization_s)
        end_of_utterance = self._speech_event(pb.SPEECH_EVENT_TYPE_END_OF_UTTERANCE, item.transcript.end)
        self.utterance_index += 1
        return [pb.TranscribeResponse(result=final, correlation=correlation), end_of_utterance]

    def _result(self, transcript: Transcript, *, stability: float) -> pb.TranscriptionResult:
        return pb.TranscriptionResult(
            transcript=transcript.text,
            stability=stability,
            audio_start_offset=durations.from_samples(transcript.start, self.rate),
            audio_end_offset=durations.from_samples(transcript.end, self.rate),
            utterance_index=self.utterance_index,
        )

    def _speech_event(self, kind: pb.SpeechEventType.ValueType, offset: int) -> pb.TranscribeResponse:
        event = pb.SpeechEvent(
            type=kind,
            audio_offset=durations.from_samples(offset, self.rate),
            utterance_index=self.utterance_index,
        )
        return pb.TranscribeResponse(speech_event=event, correlation=self.settings.correlation)


class SpeechToTextServicer(speech_to_text_pb2_grpc.SpeechToTextServiceServicer):
    """Serves a SpeechEngine as SpeechToTextService.Transcribe."""

    def __init__(self, engine: SpeechEngine, sessions: SessionLimit) -> None:
        self._engine = engine
        self._sessions = sessions

    def _parse(self, config: pb.TranscriptionConfig) -> TranscriptionSettings:
        settings = parse_config(config, self._engine.default_endpointing)
        self._engine.check(settings)
        return settings

    async def Transcribe(
        self, request_iterator: AsyncIterator[pb.TranscribeRequest], context: TranscribeContext
    ) -> AsyncIterator[pb.TranscribeResponse]:
        call = serve_stream(
            request_iterator,
            context,
            data=("audio", "audio"),
            parse=self._parse,
            sessions=self._sessions,
            body=self._transcribe,
        )
        async with contextlib.aclosing(call) as responses:  # a cancelled call stops its tasks now
            async for response in responses:
                yield response

    async def _transcribe(
        self, settings: TranscriptionSettings, requests: AsyncIterator[pb.TranscribeRequest]
    ) -> AsyncGenerator[pb.TranscribeResponse, None]:
        log.info(
            "transcription started",
            extra={
                "audio_format": settings.fmt.describe(),
                "language_code": settings.language_code,
                "interim_results": settings.interim_results,
                "speculative_results": settings.speculative_results,
                "end_of_utterance_silence_ms": settings.end_of_utterance_silence_ms,
            },
        )
        call = _Call(self._engine, settings)
        call.outbox.start(call.read(requests), "stt-read-audio")
        call.outbox.start(call.recognise(), "stt-engine")
        try:
            async with contextlib.aclosing(call.outbox.responses()) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            log.info("transcription cancelled", extra={"utterances": call.utterance_index})
            raise
        log.info(
            "transcription ended",
            extra={"utterances": call.utterance_index, "audio_s": round(call.samples_fed / call.rate, 3)},
        )
