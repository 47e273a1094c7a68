"""SpeechToTextService.Transcribe: hears the stub audio code as it arrives and streams speech
events, interim results and final results back.

A reader task takes requests off the stream and runs the decoder, so audio keeps being read
while a final result waits out the latency profile's processing time; the call's own task sends
what the reader queued, in order, so a delayed final only delays what comes after it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from stubs import audio_code
from stubs.faults import FaultSettings
from stubs.latency import LatencyProfile, sleep_until
from voice.v1 import common_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import InvalidInput, PcmFormat, parse_audio_format
from voicepipe.config import ServerSettings
from voicepipe.server import GrpcService, Registration
from voicepipe.stub_entry import open_stream, reject

log = logging.getLogger(__name__)

pb = speech_to_text_pb2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeechToTextService"].full_name
TranscribeContext = grpc.aio.ServicerContext[pb.TranscribeRequest, pb.TranscribeResponse]

# The stub's "model" is exact, but clients should not see certainty where a real engine has none.
INTERIM_STABILITY = 0.9
FINAL_CONFIDENCE = 0.99

# Endpointing limits from the contract (speech_to_text.proto).
END_OF_UTTERANCE_SILENCE_MS = (80, 5000)
SPEECH_START_MS = (5, 1000)

# How far back (beyond the endpointing silence) arrival times are kept, and at most how many
# messages: a client sending tiny messages only makes finalization_time slightly smaller.
ARRIVAL_MARGIN_MS = 100
MAX_ARRIVALS = 4096


@dataclass(frozen=True)
class StreamSettings:
    """A validated TranscriptionConfig."""

    fmt: PcmFormat
    interim_results: bool
    end_of_utterance_silence_ms: int
    speech_start_ms: int
    language_code: str
    correlation: common_pb2.Correlation


def _in_range(value: int, field: str, limits: tuple[int, int], default: int) -> int:
    if value == 0:
        return default
    low, high = limits
    if not low <= value <= high:
        raise InvalidInput(f"{field} {value} is out of range; use {low} to {high} (0 means {default})")
    return value


def parse_config(config: pb.TranscriptionConfig) -> StreamSettings:
    """Validates the config; raises InvalidInput naming the offending field."""
    fmt = parse_audio_format(config.audio_format, "config.audio_format")
    endpointing = config.endpointing
    return StreamSettings(
        fmt=fmt,
        interim_results=config.interim_results,
        end_of_utterance_silence_ms=_in_range(
            endpointing.end_of_utterance_silence_ms,
            "config.endpointing.end_of_utterance_silence_ms",
            END_OF_UTTERANCE_SILENCE_MS,
            audio_code.DEFAULT_END_OF_UTTERANCE_SILENCE_MS,
        ),
        speech_start_ms=_in_range(
            endpointing.speech_start_ms,
            "config.endpointing.speech_start_ms",
            SPEECH_START_MS,
            audio_code.DEFAULT_SPEECH_START_MS,
        ),
        language_code=config.language_code or "en-US",
        correlation=config.correlation,
    )


class ArrivalLog:
    """When recent audio messages arrived, keyed by the stream position where each ends, to find
    when the audio holding a given sample was received (finalization_time starts there)."""

    def __init__(self, keep_samples: int) -> None:
        self._keep = keep_samples
        self._entries: collections.deque[tuple[int, float]] = collections.deque(maxlen=MAX_ARRIVALS)

    def add(self, start: int, end: int, arrived: float) -> None:
        self._entries.append((end, arrived))
        # An utterance that ends later ends at most an endpointing silence before `start`.
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


@dataclass
class PendingFinal:
    """A final result and its END_OF_UTTERANCE event, to be sent once `due` (monotonic)."""

    final: pb.TranscribeResponse
    end_of_utterance: pb.TranscribeResponse
    speech_ended_at: float  # arrival of the audio holding the utterance's last voiced frame
    due: float

    async def wait_until_due(self) -> None:
        """Waits out the simulated processing, then stamps the finalization time."""
        await sleep_until(self.due)
        finalization_s = time.monotonic() - self.speech_ended_at
        self.final.result.finalization_time.CopyFrom(durations.from_seconds(finalization_s))
        log.debug(
            "final result",
            extra={
                "utterance_index": self.final.result.utterance_index,
                "finalization_ms": round(finalization_s * 1000, 1),
            },
        )


Outgoing = pb.TranscribeResponse | PendingFinal


class ResponseMapper:
    """Turns decoder events into responses, numbering the utterances of the call."""

    def __init__(self, settings: StreamSettings, processing_s: float) -> None:
        self._settings = settings
        self._rate = settings.fmt.sample_rate
        self._processing_s = processing_s
        self.utterance_index = 0

    def _result(self, result: pb.TranscriptionResult) -> pb.TranscribeResponse:
        return pb.TranscribeResponse(result=result, correlation=self._settings.correlation)

    def _speech_event(self, kind: pb.SpeechEventType.ValueType, samples: int) -> pb.TranscribeResponse:
        event = pb.SpeechEvent(
            type=kind,
            audio_offset=durations.from_samples(samples, self._rate),
            utterance_index=self.utterance_index,
        )
        return pb.TranscribeResponse(speech_event=event, correlation=self._settings.correlation)

    def map(
        self, events: Sequence[audio_code.DecoderEvent], arrivals: ArrivalLog, now: float
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        for event in events:
            if isinstance(event, audio_code.SpeechStarted):
                out.append(self._speech_event(pb.SPEECH_EVENT_TYPE_SPEECH_STARTED, event.offset_samples))
            elif isinstance(event, audio_code.WordDecoded):
                if self._settings.interim_results:
                    interim = pb.TranscriptionResult(
                        transcript=event.text_so_far,
                        stability=INTERIM_STABILITY,
                        audio_start_offset=durations.from_samples(event.start_samples, self._rate),
                        audio_end_offset=durations.from_samples(event.end_samples, self._rate),
                        utterance_index=self.utterance_index,
                    )
                    out.append(self._result(interim))
            else:
                out.append(self._final(event, arrivals, now))
                self.utterance_index += 1
        return out

    def _final(self, event: audio_code.UtteranceEnded, arrivals: ArrivalLog, now: float) -> PendingFinal:
        final = pb.TranscriptionResult(
            transcript=event.text,
            is_final=True,
            stability=1.0,
            confidence=FINAL_CONFIDENCE,
            audio_start_offset=durations.from_samples(event.start_samples, self._rate),
            audio_end_offset=durations.from_samples(event.end_samples, self._rate),
            utterance_index=self.utterance_index,
        )
        return PendingFinal(
            final=self._result(final),
            end_of_utterance=self._speech_event(pb.SPEECH_EVENT_TYPE_END_OF_UTTERANCE, event.end_samples),
            speech_ended_at=arrivals.arrival_of(event.end_samples, now),
            due=now + self._processing_s,
        )


class TranscriptionStream:
    """One call's recognition state: audio in, responses out."""

    def __init__(self, settings: StreamSettings, processing_s: float) -> None:
        self.settings = settings
        rate = settings.fmt.sample_rate
        self.decoder = audio_code.SpeechDecoder(
            rate,
            end_of_utterance_silence_ms=settings.end_of_utterance_silence_ms,
            speech_start_ms=settings.speech_start_ms,
        )
        self.arrivals = ArrivalLog(
            audio_code.ms_to_samples(settings.end_of_utterance_silence_ms + ARRIVAL_MARGIN_MS, rate)
        )
        self.mapper = ResponseMapper(settings, processing_s)

    def accept(self, data: bytes, arrived: float) -> list[Outgoing]:
        """One audio message; raises InvalidInput for a malformed one."""
        fmt = self.settings.fmt
        fmt.check_message(data)
        samples = fmt.decode(data)
        start = self.decoder.samples_consumed
        self.arrivals.add(start, start + samples.size, arrived)
        events = self.decoder.feed(samples)
        return self.mapper.map(events, self.arrivals, time.monotonic()) if events else []

    def finish(self) -> list[Outgoing]:
        """The client half-closed: the open utterance, if any, ends here."""
        return self.mapper.map(self.decoder.finish(), self.arrivals, time.monotonic())


@dataclass(frozen=True)
class _Failure:
    error: Exception


# What the reader hands the call's task; None marks the end of the request stream.
_Item = Outgoing | _Failure | None


async def _read_audio(
    requests: AsyncIterator[pb.TranscribeRequest],
    stream: TranscriptionStream,
    outbox: asyncio.Queue[_Item],
) -> None:
    """Feeds the rest of the request stream to the decoder and queues the responses."""
    try:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "audio":
                items = stream.accept(request.audio, time.monotonic())
            elif kind == "config":
                raise InvalidInput("config was sent twice; send it once, in the first request only")
            else:
                raise InvalidInput("request has neither config nor audio set")
            for item in items:
                outbox.put_nowait(item)
        for item in stream.finish():
            outbox.put_nowait(item)
        outbox.put_nowait(None)
    except Exception as exc:
        # Reported by the call's task, after the responses queued before it.
        outbox.put_nowait(_Failure(exc))


class SpeechToTextServicer(speech_to_text_pb2_grpc.SpeechToTextServiceServicer):
    def __init__(self, profile: LatencyProfile) -> None:
        self._processing_s = profile.stt_processing_ms / 1000

    async def Transcribe(
        self, request_iterator: AsyncIterator[pb.TranscribeRequest], context: TranscribeContext
    ) -> AsyncIterator[pb.TranscribeResponse]:
        requests = aiter(request_iterator)
        settings = await open_stream(requests, context, "audio", "audio", parse_config)
        log.info(
            "transcription started",
            extra={
                "audio_format": settings.fmt.describe(),
                "language_code": settings.language_code,
                "interim_results": settings.interim_results,
                "end_of_utterance_silence_ms": settings.end_of_utterance_silence_ms,
            },
        )
        stream = TranscriptionStream(settings, self._processing_s)
        outbox: asyncio.Queue[_Item] = asyncio.Queue()
        reader = asyncio.create_task(
            _read_audio(requests, stream, outbox), name=f"stt-read-audio:{settings.correlation.session_id}"
        )
        try:
            while (item := await outbox.get()) is not None:
                if isinstance(item, _Failure):
                    await reject(item.error, context)
                elif isinstance(item, PendingFinal):
                    await item.wait_until_due()
                    yield item.final
                    yield item.end_of_utterance
                else:
                    yield item
        except (asyncio.CancelledError, GeneratorExit):
            log.info("transcription cancelled", extra={"utterances": stream.mapper.utterance_index})
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        log.info(
            "transcription ended",
            extra={
                "utterances": stream.mapper.utterance_index,
                "audio_s": round(stream.decoder.to_seconds(stream.decoder.samples_consumed), 3),
            },
        )


def build_service(settings: ServerSettings, profile: LatencyProfile, faults: FaultSettings) -> GrpcService:
    """The STT stub server: SpeechToTextService plus the shared runtime."""
    registration = Registration(
        full_name=SERVICE_NAME,
        add_to_server=speech_to_text_pb2_grpc.add_SpeechToTextServiceServicer_to_server,
        servicer=SpeechToTextServicer(profile),
    )
    return GrpcService("stt_stub", settings, [registration], faults.interceptors())
