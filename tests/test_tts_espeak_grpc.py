"""`python -m tts_espeak` as its clients see it over gRPC: real speech at every sample rate and in
MULAW, chunks tagged with the words they speak, an unknown voice refused, and ListVoices through
grpcurl. What every stage server does is in test_stage_runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from tests.helpers import CALL_TIMEOUT_S, exchange, open_channel, running
from tests.test_grpcurl import grpcurl
from voice.v1 import common_pb2, text_to_speech_pb2, text_to_speech_pb2_grpc
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess

pb = text_to_speech_pb2
TEXT = "Hello there, **friend**! The meeting is at ten 🎉."


@pytest.fixture(scope="module")
def tts() -> Iterator[ServiceProcess]:
    with running("tts_espeak") as process:
        yield process


def config(fmt: PcmFormat, voice: str = "") -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(
        config=pb.SynthesisConfig(voice=voice, audio_format=fmt.to_proto(), chunk_duration_ms=20)
    )


def segment(text: str) -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(segment=pb.TextSegment(segment_id=1, text=text, flush=True))


async def synthesize(tts: ServiceProcess, *requests: pb.SynthesizeRequest) -> list[pb.SynthesizeResponse]:
    async with open_channel(tts.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        return (await exchange(stub.Synthesize, requests)).assert_ok()


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 24_000, 44_100, 48_000])
@pytest.mark.parametrize("encoding", [LINEAR16, MULAW])
async def test_every_rate_and_encoding_speaks_in_word_aligned_chunks(
    tts: ServiceProcess, rate: int, encoding: common_pb2.AudioEncoding.ValueType
) -> None:
    fmt = PcmFormat(encoding, rate)
    responses = await synthesize(tts, config(fmt), segment(TEXT))
    chunks = [r.audio for r in responses if r.HasField("audio")]
    [complete] = [r.segment_complete for r in responses if r.HasField("segment_complete")]
    assert all(len(c.audio) == fmt.bytes_for(20) for c in chunks[:-1])
    seconds = sum(len(c.audio) for c in chunks) / fmt.bytes_per_sample / rate
    assert abs(seconds - complete.audio_duration.ToTimedelta().total_seconds()) < 0.001
    assert 1.5 < seconds < 6  # nine words of speech
    ends = [c.text_end for c in chunks]
    assert ends == sorted(ends) and ends[-1] == len(TEXT)
    assert [c.text_start for c in chunks] == [0, *ends[:-1]]
    assert all(e in (0, len(TEXT)) or (TEXT[e - 1] == " " and TEXT[e] != " ") for e in ends)
    assert len(set(ends)) > 5  # word by word, not all at the end


async def test_an_unknown_voice_is_invalid_argument(tts: ServiceProcess) -> None:
    async with open_channel(tts.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        outcome = await exchange(
            stub.Synthesize, [config(PcmFormat(LINEAR16, 16_000), voice="xx-nowhere")], half_close=False
        )
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'xx-nowhere'" in outcome.details and "ListVoices" in outcome.details


async def test_list_voices_names_voices_the_stage_accepts(tts: ServiceProcess) -> None:
    listing = json.loads(grpcurl(tts, "voice.v1.TextToSpeechService/ListVoices"))
    names = {voice["name"] for voice in listing["voices"]}
    assert {"en-us", "en-gb"} <= names and "f3" in listing["variants"]
    async with open_channel(tts.target) as channel:
        stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel)
        await stub.ListVoices(pb.ListVoicesRequest(), timeout=CALL_TIMEOUT_S)
    responses = await synthesize(tts, config(PcmFormat(LINEAR16, 16_000), voice="en-gb+f3"), segment("Hi."))
    assert responses[-1].HasField("segment_complete")
