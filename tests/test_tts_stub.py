"""The TTS stub as its clients see it: audio in the stub code, chunked and tagged with the text it
has spoken, flush and half-close semantics, pacing, the longest segment, ListVoices. What every
stage server does (bad input, correlation ids, the session limit, health, cancellation, fault
knobs) is in test_stage_runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
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
)
from voice.v1 import common_pb2, text_to_speech_pb2, text_to_speech_pb2_grpc
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess

pb = text_to_speech_pb2
PCM16 = PcmFormat(LINEAR16, 16_000)


@pytest.fixture(scope="module")
def tts() -> Iterator[ServiceProcess]:
    """One TTS stub (instant profile) for the tests that need nothing special."""
    with running("tts_stub") as process:
        yield process


def config(
    fmt: PcmFormat = PCM16,
    *,
    chunk_duration_ms: int = 0,
    correlation: common_pb2.Correlation | None = None,
    audio_format: common_pb2.AudioFormat | None = None,
) -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(
        config=pb.SynthesisConfig(
            voice="any voice",
            audio_format=audio_format or fmt.to_proto(),
            chunk_duration_ms=chunk_duration_ms,
            correlation=correlation,
        )
    )


def segment(segment_id: int, text: str, *, flush: bool = False) -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(segment=pb.TextSegment(segment_id=segment_id, text=text, flush=flush))


async def synthesize(
    process: ServiceProcess, requests: Sequence[pb.SynthesizeRequest], *, half_close: bool = True
) -> CallOutcome[pb.SynthesizeResponse]:
    async with open_channel(process.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        return await exchange(stub.Synthesize, requests, half_close=half_close)


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


@dataclass
class SegmentOutput:
    segment_id: int
    chunks: list[pb.AudioChunk] = field(default_factory=list)
    complete: pb.SegmentComplete | None = None

    @property
    def audio(self) -> bytes:
        return b"".join(chunk.audio for chunk in self.chunks)


def by_segment(responses: Sequence[pb.SynthesizeResponse]) -> list[SegmentOutput]:
    """The responses grouped by segment, checking that segments do not interleave."""
    out: list[SegmentOutput] = []
    for response in responses:
        if response.HasField("audio"):
            if not out or out[-1].complete is not None:
                out.append(SegmentOutput(response.audio.segment_id))
            assert response.audio.segment_id == out[-1].segment_id, "audio of two segments interleaved"
            out[-1].chunks.append(response.audio)
        else:
            done = response.segment_complete
            if not out or out[-1].complete is not None:
                out.append(SegmentOutput(done.segment_id))  # a segment without audio
            assert done.segment_id == out[-1].segment_id
            out[-1].complete = done
    return out


def heard(audio: bytes, fmt: PcmFormat) -> str:
    """What a listener decodes from `audio` once it is followed by an utterance's silence."""
    samples = np.concatenate((fmt.decode(audio), np.zeros(fmt.sample_rate // 2, dtype=np.int16)))
    return " ".join(audio_code.decode_utterances(samples, fmt.sample_rate))


# --- audio and text ------------------------------------------------------------------------------------


async def test_chunks_say_which_text_they_have_spoken(tts: ServiceProcess) -> None:
    text = "  Hello,  wörld!\tHow's it going? ☕ "
    outcome = await synthesize(tts, [config(), segment(7, text, flush=True)])
    [output] = by_segment(outcome.assert_ok())
    assert output.segment_id == 7 and output.complete is not None
    chunks = output.chunks
    chunk_bytes = PCM16.bytes_for(20)
    assert all(len(c.audio) == chunk_bytes for c in chunks[:-1])
    assert 0 < len(chunks[-1].audio) <= chunk_bytes
    assert [seconds(c.audio_offset) for c in chunks] == pytest.approx([0.02 * i for i in range(len(chunks))])
    assert [c.HasField("time_to_first_audio") for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert seconds(output.complete.audio_duration) == pytest.approx(len(output.audio) / 2 / 16_000)

    assert [c.text_start for c in chunks] == [0] + [c.text_end for c in chunks[:-1]]
    assert [c.text_end for c in chunks] == sorted(c.text_end for c in chunks)
    assert chunks[-1].text_end == len(text)
    audio = b""
    for chunk in chunks:
        audio += chunk.audio
        spoken_text = audio_code.normalize_text(text[: chunk.text_end])
        assert heard(audio, PCM16).startswith(spoken_text), (chunk.text_end, spoken_text)
        # Whitespace is spoken with the word before it: text_end never stops in front of it.
        assert chunk.text_end == len(text) or not text[chunk.text_end].isspace()
    assert heard(audio, PCM16) == "Hello, w?rld! How's it going? ?"


@pytest.mark.parametrize(
    ("fmt", "chunk_duration_ms", "chunk_bytes"),
    [
        (PcmFormat(MULAW, 8_000), 10, 80),
        (PcmFormat(LINEAR16, 16_000), 0, 640),  # 0 means 20 ms
        (PcmFormat(MULAW, 44_100), 100, 4_410),
        (PcmFormat(LINEAR16, 48_000), 1_000, 96_000),
    ],
)
async def test_audio_comes_in_the_requested_format_and_chunk_size(
    tts: ServiceProcess, fmt: PcmFormat, chunk_duration_ms: int, chunk_bytes: int
) -> None:
    text = "Formats and sizes differ; the words do not."
    requests = [config(fmt, chunk_duration_ms=chunk_duration_ms), segment(1, text, flush=True)]
    [output] = by_segment((await synthesize(tts, requests)).assert_ok())
    assert all(len(c.audio) == chunk_bytes for c in output.chunks[:-1])
    assert 0 < len(output.chunks[-1].audio) <= chunk_bytes
    assert heard(output.audio, fmt) == text


async def test_segments_wait_for_a_flush_and_join_into_one_reply(tts: ServiceProcess) -> None:
    async with open_channel(tts.target) as channel:
        call = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize(timeout=CALL_TIMEOUT_S)
        await call.write(config())
        await call.write(segment(1, "Good morning."))
        await call.write(segment(2, "Lovely day,"))
        first = asyncio.create_task(call.read(), name="first-response")
        try:
            # Without a flush the service may wait for more text: nothing comes back yet.
            done, _ = await asyncio.wait({first}, timeout=0.2)
            assert not done, f"audio before any flush: {first.result()}"
            await call.write(segment(5, "isn't it?", flush=True))
            await call.write(segment(6, "Bye."))
            await call.done_writing()  # half-close makes segment 6 due, then the call ends
            head = await first
        finally:
            first.cancel()
        rest = await collect(call)
    assert isinstance(head, pb.SynthesizeResponse)
    outputs = by_segment([head, *rest.assert_ok()])
    assert [o.segment_id for o in outputs] == [1, 2, 5, 6]
    assert all(o.complete is not None for o in outputs)
    # Due at the flush, not when it arrived 0.2 s earlier.
    assert seconds(outputs[0].chunks[0].time_to_first_audio) < 0.15
    assert heard(b"".join(o.audio for o in outputs), PCM16) == "Good morning. Lovely day, isn't it? Bye."


async def test_whitespace_only_segment_completes_without_audio(tts: ServiceProcess) -> None:
    requests = [config(), segment(1, "One"), segment(2, " \t "), segment(3, "two.", flush=True)]
    outputs = by_segment((await synthesize(tts, requests)).assert_ok())
    assert [(o.segment_id, len(o.chunks)) for o in outputs][1] == (2, 0)
    assert outputs[1].complete is not None and seconds(outputs[1].complete.audio_duration) == 0
    assert heard(outputs[0].audio + outputs[2].audio, PCM16) == "One two."


# --- pacing ----------------------------------------------------------------------------------------------


async def test_realistic_profile_paces_first_audio_and_synthesis(start_service: StartService) -> None:
    process = start_service("tts_stub", "--latency-profile", "realistic", "--first-audio-ms", "80")
    text = "Pacing is measured in real time."
    async with open_channel(process.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        sent = time.monotonic()
        outcome = await exchange(stub.Synthesize, [config(), segment(1, text, flush=True)])
        elapsed = time.monotonic() - sent
    [output] = by_segment(outcome.assert_ok())
    assert seconds(output.chunks[0].time_to_first_audio) >= 0.08
    # 5x real time (the realistic profile): the last chunk is produced 1/5 of its offset later.
    assert elapsed >= 0.08 + seconds(output.chunks[-1].audio_offset) / 5


async def test_requests_are_read_while_audio_streams(start_service: StartService) -> None:
    process = start_service("tts_stub", "--realtime-factor", "2")
    text = "This sentence takes a few seconds to synthesise at twice real time."
    async with open_channel(process.target) as channel:
        call = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize(timeout=CALL_TIMEOUT_S)
        await call.write(config())
        await call.write(segment(3, text, flush=True))
        first = await read_message(call, pb.SynthesizeResponse)
        assert first.audio.segment_id == 3
        await call.write(segment(3, "again"))  # does not increase: rejected mid-segment
        outcome = await collect(call)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment_id 3 does not increase" in outcome.details
    [output] = by_segment([first, *outcome.responses])
    assert output.complete is None


async def test_accepts_the_longest_segment(tts: ServiceProcess) -> None:
    outcome = await synthesize(tts, [config(chunk_duration_ms=1000), segment(0, "ab " * 1365 + "a")])
    [output] = by_segment(outcome.assert_ok())
    assert output.chunks[-1].text_end == 4096


async def test_list_voices_says_any_name_is_accepted(tts: ServiceProcess) -> None:
    async with open_channel(tts.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        voices = await stub.ListVoices(pb.ListVoicesRequest(), timeout=CALL_TIMEOUT_S)
    assert voices.accepts_any_name
    assert [voice.name for voice in voices.voices] == ["default"]
