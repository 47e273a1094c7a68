"""The stub audio code end to end through the real stages: text -> tts_stub -> stt_stub gives back
exactly the text, at every rate and encoding and however the audio is cut into messages, with
speech events and offsets that match the audio sent."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from google.protobuf import duration_pb2

from stubs import audio_code
from tests.helpers import exchange, open_channel, running, silence, split
from voice.v1 import (
    common_pb2,
    speech_to_text_pb2,
    speech_to_text_pb2_grpc,
    text_to_speech_pb2,
    text_to_speech_pb2_grpc,
)
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess

stt_pb = speech_to_text_pb2
tts_pb = text_to_speech_pb2

# A reply as an LLM would stream it: several sentences, flushed as they complete.
REPLY = ("Hello there!", "The quick brown fox jumps over the lazy dog.", "It costs $42.50,", "right?")
FLUSHES = (True, False, False, True)
# What a listener hears: segments join into one utterance, with a word gap between segments.
HEARD = audio_code.normalize_text(" ".join(REPLY))
# The TTS stub leaves only a word gap after a reply; the listener needs an utterance's silence.
END_SILENCE_MS = 300
FRAME_S = 1 / 400  # the recogniser's offsets are exact to one voice-activity frame


@pytest.fixture(scope="module")
def stages() -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with running("tts_stub") as tts, running("stt_stub") as stt:
        yield tts, stt


def seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


async def speak(tts: ServiceProcess, fmt: PcmFormat, texts: Sequence[str], flushes: Sequence[bool]) -> bytes:
    """The reply's audio as the TTS stub streams it, checked to come in segment order."""
    requests = [tts_pb.SynthesizeRequest(config=tts_pb.SynthesisConfig(audio_format=fmt.to_proto()))]
    for segment_id, (text, flush) in enumerate(zip(texts, flushes, strict=True), start=1):
        segment = tts_pb.TextSegment(segment_id=segment_id, text=text, flush=flush)
        requests.append(tts_pb.SynthesizeRequest(segment=segment))
    async with open_channel(tts.target) as channel:
        outcome = await exchange(
            text_to_speech_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize, requests
        )
    responses = outcome.assert_ok()
    completed = [r.segment_complete.segment_id for r in responses if r.HasField("segment_complete")]
    assert completed == list(range(1, len(texts) + 1))
    return b"".join(r.audio.audio for r in responses if r.HasField("audio"))


async def hear(
    stt: ServiceProcess, fmt: PcmFormat, audio: bytes, message_ms: int
) -> list[stt_pb.TranscribeResponse]:
    """Everything the STT stub says about `audio`, sent in messages of `message_ms`."""
    config = stt_pb.TranscriptionConfig(audio_format=fmt.to_proto(), interim_results=True)
    requests = [stt_pb.TranscribeRequest(config=config)]
    requests += [stt_pb.TranscribeRequest(audio=piece) for piece in split(audio, fmt.bytes_for(message_ms))]
    async with open_channel(stt.target) as channel:
        stub = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel)
        return (await exchange(stub.Transcribe, requests)).assert_ok()


def check_utterance(responses: Sequence[stt_pb.TranscribeResponse], index: int, text: str) -> None:
    """The responses of one utterance: SPEECH_STARTED, interim results that grow towards the
    final, the final, END_OF_UTTERANCE; offsets consistent with each other."""
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[0] == kinds[-1] == "speech_event"
    assert set(kinds[1:-1]) == {"result"}
    started, ended = responses[0].speech_event, responses[-1].speech_event
    assert started.type == stt_pb.SPEECH_EVENT_TYPE_SPEECH_STARTED
    assert ended.type == stt_pb.SPEECH_EVENT_TYPE_END_OF_UTTERANCE
    *interims, final = (r.result for r in responses[1:-1])
    assert final.is_final and final.transcript == text
    assert interims, "no interim results before the final"
    assert not any(r.is_final for r in interims)
    transcripts = [r.transcript for r in interims]
    assert all(text.startswith(t) for t in transcripts), transcripts
    assert [len(t) for t in transcripts] == sorted({len(t) for t in transcripts})
    ends = [seconds(r.audio_end_offset) for r in [*interims, final]]
    assert ends == sorted(ends)
    assert all(r.audio_start_offset == final.audio_start_offset for r in interims)
    assert {started.utterance_index, ended.utterance_index, final.utterance_index} == {index}
    assert started.audio_offset == final.audio_start_offset
    assert ended.audio_offset == final.audio_end_offset


@pytest.mark.parametrize("encoding", [LINEAR16, MULAW], ids=["LINEAR16", "MULAW"])
@pytest.mark.parametrize("rate", [8_000, 16_000, 48_000])
async def test_text_survives_tts_then_stt(
    stages: tuple[ServiceProcess, ServiceProcess], rate: int, encoding: common_pb2.AudioEncoding.ValueType
) -> None:
    tts, stt = stages
    fmt = PcmFormat(encoding, rate)
    reply = await speak(tts, fmt, REPLY, FLUSHES)
    audio = reply + silence(fmt, END_SILENCE_MS)
    reply_samples = len(reply) // fmt.bytes_per_sample
    speech_end_s = (reply_samples - audio_code.ms_to_samples(audio_code.WORD_GAP_MS, rate)) / rate
    for message_ms in (10, 20, 100, 1000):
        responses = await hear(stt, fmt, audio, message_ms)
        check_utterance(responses, 0, HEARD)
        final = responses[-2].result
        assert seconds(final.audio_start_offset) == pytest.approx(0, abs=FRAME_S), message_ms
        assert seconds(final.audio_end_offset) == pytest.approx(speech_end_s, abs=FRAME_S), message_ms


async def test_separate_replies_are_separate_utterances_at_their_offsets(
    stages: tuple[ServiceProcess, ServiceProcess],
) -> None:
    tts, stt = stages
    fmt = PcmFormat(LINEAR16, 16_000)
    first = await speak(tts, fmt, ["First reply,", "in two parts."], [False, True])
    second = await speak(tts, fmt, ["Second reply."], [True])
    pause = silence(fmt, END_SILENCE_MS)
    responses = await hear(stt, fmt, first + pause + second + pause, 20)
    boundary = next(i for i, r in enumerate(responses) if r.speech_event.utterance_index == 1)
    check_utterance(responses[:boundary], 0, "First reply, in two parts.")
    check_utterance(responses[boundary:], 1, "Second reply.")
    second_start_s = (len(first) + len(pause)) / 2 / 16_000
    assert seconds(responses[boundary].speech_event.audio_offset) == pytest.approx(
        second_start_s, abs=FRAME_S
    )
