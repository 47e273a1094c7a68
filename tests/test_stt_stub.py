"""The STT stub as its clients see it: transcripts and speech events for audio spoken in the stub
audio code, endpointing, finalization time. What every stage server does (bad input, correlation
ids, the session limit, health, cancellation, fault knobs) is in test_stage_runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest
from google.protobuf import duration_pb2

from stubs import audio_code
from tests.conftest import StartService
from tests.helpers import (
    CALL_TIMEOUT_S,
    CallOutcome,
    collect,
    exchange,
    open_channel,
    read_message,
    running,
    silence,
    split,
    spoken,
)
from voice.v1 import common_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess

pb = speech_to_text_pb2
PCM16 = PcmFormat(LINEAR16, 16_000)
FRAME_S = 1 / 400  # the decoder's voice-activity frame: offsets are exact to one frame
SPEECH_STARTED = pb.SPEECH_EVENT_TYPE_SPEECH_STARTED
END_OF_UTTERANCE = pb.SPEECH_EVENT_TYPE_END_OF_UTTERANCE


@pytest.fixture(scope="module")
def stt() -> Iterator[ServiceProcess]:
    """One STT stub (instant profile) for the tests that need nothing special."""
    with running("stt_stub") as process:
        yield process


def config(
    fmt: PcmFormat = PCM16,
    *,
    interim_results: bool = True,
    end_of_utterance_silence_ms: int = 0,
    speech_start_ms: int = 0,
    correlation: common_pb2.Correlation | None = None,
    audio_format: common_pb2.AudioFormat | None = None,
) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(
        config=pb.TranscriptionConfig(
            audio_format=audio_format or fmt.to_proto(),
            interim_results=interim_results,
            endpointing=pb.EndpointingConfig(
                end_of_utterance_silence_ms=end_of_utterance_silence_ms, speech_start_ms=speech_start_ms
            ),
            correlation=correlation,
        )
    )


def audio(data: bytes, fmt: PcmFormat = PCM16, chunk_ms: int = 20) -> list[pb.TranscribeRequest]:
    return [pb.TranscribeRequest(audio=piece) for piece in split(data, fmt.bytes_for(chunk_ms))]


async def transcribe(
    process: ServiceProcess, requests: Sequence[pb.TranscribeRequest], *, half_close: bool = True
) -> CallOutcome[pb.TranscribeResponse]:
    async with open_channel(process.target) as channel:
        stub = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel)
        return await exchange(stub.Transcribe, requests, half_close=half_close)


def summary(responses: Sequence[pb.TranscribeResponse]) -> list[tuple[str, int | str]]:
    """The responses in a form a failing assertion shows readably."""
    out: list[tuple[str, int | str]] = []
    for response in responses:
        if response.HasField("speech_event"):
            event = response.speech_event
            name = "started" if event.type == SPEECH_STARTED else "ended"
            out.append((name, event.utterance_index))
        else:
            out.append(("final" if response.result.is_final else "interim", response.result.transcript))
    return out


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def finals(responses: Sequence[pb.TranscribeResponse]) -> list[pb.TranscriptionResult]:
    return [r.result for r in responses if r.HasField("result") and r.result.is_final]


# --- recognition -------------------------------------------------------------------------------------


async def test_transcribes_utterances_with_events_in_spoken_order(stt: ServiceProcess) -> None:
    first = spoken("Hello world", PCM16)
    second = spoken("How are you?", PCM16)
    outcome = await transcribe(stt, [config(), *audio(first + second)])

    responses = outcome.assert_ok()
    assert summary(responses) == [
        ("started", 0),
        ("interim", "Hello"),
        ("interim", "Hello world"),
        ("final", "Hello world"),
        ("ended", 0),
        ("started", 1),
        ("interim", "How"),
        ("interim", "How are"),
        ("interim", "How are you?"),
        ("final", "How are you?"),
        ("ended", 1),
    ]
    results = finals(responses)
    assert [r.utterance_index for r in results] == [0, 1]
    assert all(r.confidence == pytest.approx(0.99) and r.stability == 1.0 for r in results)
    # Offsets are measured from the first audio byte of the call.
    first_speech_end = audio_code.render("Hello world", 16_000).speech_end_samples / 16_000
    second_start = len(first) / 2 / 16_000
    assert results[0].audio_start_offset.ToTimedelta().total_seconds() == pytest.approx(0, abs=FRAME_S)
    assert results[0].audio_end_offset.ToTimedelta().total_seconds() == pytest.approx(
        first_speech_end, abs=FRAME_S
    )
    assert results[1].audio_start_offset.ToTimedelta().total_seconds() == pytest.approx(
        second_start, abs=FRAME_S
    )
    # Each event carries the offset of what it reports: start of speech, end of the last voiced audio.
    events = [r.speech_event for r in responses if r.HasField("speech_event")]
    assert events[0].audio_offset == results[0].audio_start_offset
    assert events[1].audio_offset == results[0].audio_end_offset
    assert events[2].audio_offset == results[1].audio_start_offset
    assert events[3].audio_offset == results[1].audio_end_offset


async def test_sends_no_interim_results_unless_asked(stt: ServiceProcess) -> None:
    outcome = await transcribe(stt, [config(interim_results=False), *audio(spoken("one two three", PCM16))])
    assert summary(outcome.assert_ok()) == [("started", 0), ("final", "one two three"), ("ended", 0)]


async def test_half_close_finalises_the_open_utterance(stt: ServiceProcess) -> None:
    speech = spoken("no silence after this", PCM16, trailing_silence_ms=0)
    outcome = await transcribe(stt, [config(interim_results=False), *audio(speech)])
    assert summary(outcome.assert_ok()) == [("started", 0), ("final", "no silence after this"), ("ended", 0)]


async def test_decodes_mulaw_at_8_khz_in_odd_sized_messages(stt: ServiceProcess) -> None:
    fmt = PcmFormat(MULAW, 8_000)
    outcome = await transcribe(
        stt, [config(fmt), *(pb.TranscribeRequest(audio=p) for p in split(spoken("G.711 ok", fmt), 77))]
    )
    assert [r.transcript for r in finals(outcome.assert_ok())] == ["G.711 ok"]


async def test_end_of_utterance_silence_is_configurable(stt: ServiceProcess) -> None:
    # The 250 ms between the phrases ends an utterance by default, but not with a 300 ms setting.
    speech = spoken("first part", PCM16) + spoken("second part", PCM16)
    outcome = await transcribe(stt, [config(end_of_utterance_silence_ms=300), *audio(speech)])
    assert [r.transcript for r in finals(outcome.assert_ok())] == ["first part second part"]


async def test_speech_shorter_than_speech_start_is_ignored_as_noise(stt: ServiceProcess) -> None:
    # One symbol is 30 ms of voiced audio: below a 50 ms speech start, so no events at all.
    speech = spoken("x", PCM16) + spoken("xy", PCM16)
    outcome = await transcribe(stt, [config(speech_start_ms=50), *audio(speech)])
    assert summary(outcome.assert_ok()) == [("started", 0), ("interim", "xy"), ("final", "xy"), ("ended", 0)]


async def test_finalization_time_counts_from_the_audio_in_which_speech_ended(stt: ServiceProcess) -> None:
    pause_s = 0.15
    async with open_channel(stt.target) as channel:
        call = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel).Transcribe(timeout=CALL_TIMEOUT_S)
        await call.write(config(interim_results=False))
        await call.write(pb.TranscribeRequest(audio=spoken("wait", PCM16, trailing_silence_ms=0)))
        started = await read_message(call, pb.TranscribeResponse)
        assert started.speech_event.type == SPEECH_STARTED
        # A real-time client: the endpointing silence arrives after the speech, not with it.
        await asyncio.sleep(pause_s)
        await call.write(pb.TranscribeRequest(audio=silence(PCM16, 200)))
        await call.done_writing()
        outcome = await collect(call)
    result = finals(outcome.assert_ok())[0]
    assert result.transcript == "wait"
    assert pause_s <= seconds(result.finalization_time) < CALL_TIMEOUT_S


async def test_processing_delay_holds_back_finals_but_keeps_order(start_service: StartService) -> None:
    process = start_service("stt_stub", "--latency-profile", "realistic", "--processing-ms", "60")
    speech = spoken("alpha", PCM16) + spoken("beta", PCM16)
    outcome = await transcribe(process, [config(interim_results=False), *audio(speech)])
    assert summary(outcome.assert_ok()) == [
        ("started", 0),
        ("final", "alpha"),
        ("ended", 0),
        ("started", 1),
        ("final", "beta"),
        ("ended", 1),
    ]
    for result in finals(outcome.responses):
        assert seconds(result.finalization_time) >= 0.06
