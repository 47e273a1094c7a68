"""`python -m tts_piper` as its clients see it over gRPC: the bundled voice at the client's rate,
chunks tagged with the words they speak, an unknown voice refused, ListVoices through grpcurl."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from tests.helpers import exchange, open_channel, running
from tests.test_grpcurl import grpcurl
from tests.test_tts_espeak_grpc import TEXT, config, segment, synthesize
from voice.v1 import text_to_speech_pb2_grpc
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess


@pytest.fixture(scope="module")
def tts() -> Iterator[ServiceProcess]:
    with running("tts_piper") as process:
        yield process


@pytest.mark.parametrize(
    "fmt", [PcmFormat(LINEAR16, 16_000), PcmFormat(MULAW, 8_000)], ids=PcmFormat.describe
)
async def test_speaks_in_word_aligned_chunks_at_the_clients_rate(tts: ServiceProcess, fmt: PcmFormat) -> None:
    responses = await synthesize(tts, config(fmt), segment(TEXT))
    chunks = [r.audio for r in responses if r.HasField("audio")]
    [complete] = [r.segment_complete for r in responses if r.HasField("segment_complete")]
    assert all(len(c.audio) == fmt.bytes_for(20) for c in chunks[:-1])
    seconds = sum(len(c.audio) for c in chunks) / fmt.bytes_per_sample / fmt.sample_rate
    assert abs(seconds - complete.audio_duration.ToTimedelta().total_seconds()) < 0.001
    assert 1.5 < seconds < 6  # nine words of speech
    ends = [c.text_end for c in chunks]
    assert ends == sorted(ends) and ends[-1] == len(TEXT)
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


async def test_list_voices_names_the_bundled_voice(tts: ServiceProcess) -> None:
    listing = json.loads(grpcurl(tts, "voice.v1.TextToSpeechService/ListVoices"))
    assert [voice["name"] for voice in listing["voices"]] == ["en_US-joe-medium"]
    fmt = PcmFormat(LINEAR16, 16_000)
    responses = await synthesize(tts, config(fmt, voice="en_US-joe-medium"), segment("Hi."))
    assert responses[-1].HasField("segment_complete")
