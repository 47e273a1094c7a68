"""The Whisper stage as its clients see it, on real human speech (Debian's pocketsphinx-testdata)
with the bundled tiny.en model: `python -m stt_whisper` over gRPC."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest

from bench import recordings
from bench.recordings import Recording, normalise, padded
from stt_whisper import turn_model
from tests.helpers import CallOutcome, collect, open_channel, running
from tests.noise import room_noises
from tests.stack_fixtures import Caller
from tts_espeak.speaker import EspeakSpeaker
from voice.v1 import speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.engines import STUBS
from voicepipe.pcm import Resampler, Samples
from voicepipe.processes import ServiceProcess
from voicepipe_client import Utterance
from voicepipe_tools.stack import start_stack

pb = speech_to_text_pb2
pytestmark = pytest.mark.skipif(
    not recordings.available(), reason="needs Debian's pocketsphinx-testdata (apt-get install it)"
)

RATE = 16_000
PCM16 = PcmFormat(LINEAR16, RATE)
SPEECH_STARTED = pb.SPEECH_EVENT_TYPE_SPEECH_STARTED
END_OF_UTTERANCE = pb.SPEECH_EVENT_TYPE_END_OF_UTTERANCE
CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stt() -> Iterator[ServiceProcess]:
    with running(
        "stt_whisper",
        "--interim-interval-ms",
        "400",
        f"--turn-model={turn_model.DEFAULT_PATH}",
    ) as process:
        yield process


def config(
    fmt: PcmFormat = PCM16,
    *,
    interim_results: bool = False,
    silence_ms: int = 300,
    language: str = "",
    speculative: bool = False,
) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(
        config=pb.TranscriptionConfig(
            audio_format=fmt.to_proto(),
            language_code=language,
            interim_results=interim_results,
            speculative_results=speculative,
            endpointing=pb.EndpointingConfig(end_of_utterance_silence_ms=silence_ms),
        )
    )


def audio_requests(data: bytes, sizes: Iterator[int]) -> list[pb.TranscribeRequest]:
    pieces, position = [], 0
    for size in sizes:
        if position >= len(data):
            break
        pieces.append(pb.TranscribeRequest(audio=data[position : position + size]))
        position += size
    return pieces


def every(size: int) -> Iterator[int]:
    return itertools.repeat(size)


async def transcribe(
    stt: ServiceProcess, first: pb.TranscribeRequest, requests: Sequence[pb.TranscribeRequest]
) -> CallOutcome[pb.TranscribeResponse]:
    """One call; its deadline allows for decoding on a loaded 2-core machine."""
    async with open_channel(stt.target) as channel:
        call = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel).Transcribe(timeout=CALL_TIMEOUT_S)
        for request in (first, *requests):
            await call.write(request)
        await call.done_writing()
        return await collect(call)


async def hear(stt: ServiceProcess, audio: Samples, silence_ms: int = 300) -> list[pb.TranscribeResponse]:
    """Sends 16 kHz audio in 20 ms messages, as fast as the stage takes it."""
    data = PCM16.encode(audio)
    outcome = await transcribe(stt, config(silence_ms=silence_ms), audio_requests(data, every(640)))
    return outcome.assert_ok()


def finals(responses: Sequence[pb.TranscribeResponse]) -> list[pb.TranscriptionResult]:
    return [r.result for r in responses if r.HasField("result") and r.result.is_final]


def seconds(result: pb.TranscriptionResult) -> tuple[float, float]:
    return (
        durations.to_seconds(result.audio_start_offset),
        durations.to_seconds(result.audio_end_offset),
    )


@pytest.mark.parametrize(
    "recording",
    [recordings.goforward(), *recordings.librivox()[::4]],  # goforward, 0870, 0930
    ids=lambda r: r.name,
)
async def test_spoken_sentence_is_transcribed(stt: ServiceProcess, recording: Recording) -> None:
    responses = await hear(stt, padded(recording.audio))
    kinds = [r.speech_event.type if r.HasField("speech_event") else "final" for r in responses]
    assert kinds == [SPEECH_STARTED, "final", END_OF_UTTERANCE]
    [final] = finals(responses)
    assert normalise(final.transcript) == recording.reference
    # The speech lies between the padding before (0.5 s) and after the recording.
    start, end = seconds(final)
    assert 0.45 < start < end < 0.5 + recording.seconds
    assert end - start > 0.5 * recording.seconds
    assert 0 < final.confidence <= 1 and final.stability == 1.0
    # The stage's own time, from the audio holding the end of speech to the final (the audio was
    # sent faster than real time, so the endpointing silence took less than its length).
    assert 0 < durations.to_seconds(final.finalization_time) < 10


async def test_any_chunking_gives_the_same_finals(stt: ServiceProcess) -> None:
    gap = np.zeros(RATE, np.int16)
    audio = padded(np.concatenate([recordings.goforward().audio, gap, recordings.librivox()[4].audio]))
    data = PCM16.encode(audio)
    rng = np.random.default_rng(7)
    chunkings = [every(640), every(64_000), (2 * int(n) for n in rng.integers(1, 1500, 100_000))]
    results = []
    for sizes in chunkings:
        outcome = await transcribe(stt, config(), audio_requests(data, sizes))
        results.append([(f.transcript, seconds(f)) for f in finals(outcome.assert_ok())])
    assert [normalise(text) for text, _ in results[0]] == [
        "go forward ten meters",
        "he might even have been made amiable himself",
    ]
    assert results[0] == results[1] == results[2]


async def test_8khz_mulaw_is_transcribed(stt: ServiceProcess) -> None:
    """Telephone audio: the stage takes 8 kHz G.711 mu-law and hears it at 16 kHz."""
    down = Resampler(RATE, 8000)
    audio = padded(recordings.goforward().audio)
    telephone = PcmFormat(MULAW, 8000)
    data = telephone.encode(np.concatenate([down(audio), down.flush()]))
    outcome = await transcribe(stt, config(telephone), audio_requests(data, every(160)))
    [final] = finals(outcome.assert_ok())
    assert normalise(final.transcript) == "go forward ten meters"
    start, end = seconds(final)
    assert 0.45 < start < end < 0.5 + recordings.goforward().seconds


@pytest.fixture(scope="module")
def short_answers() -> list[Recording]:
    """A real caller's two-digit answer, and one-word answers spoken by espeak-ng."""
    speaker = EspeakSpeaker("en-gb")
    try:
        spoken = [
            Recording(word, speaker(word, RATE).samples, word) for word in ("yes", "no", "five", "okay")
        ]
    finally:
        speaker.close()
    return [recordings.cards()[3], *spoken]  # cards-004: "five five"


async def test_short_answers_are_heard(stt: ServiceProcess, short_answers: list[Recording]) -> None:
    """Each is an utterance of its own, endpointed with the stage's default silence (0)."""
    heard = []
    for answer in short_answers:
        said = finals(await hear(stt, padded(answer.audio), silence_ms=0))
        heard.append((answer.name, [normalise(f.transcript) for f in said]))
    assert heard == [(answer.name, [answer.reference]) for answer in short_answers]


async def test_noise_alone_gives_no_utterance_and_after_speech_no_second_one(stt: ServiceProcess) -> None:
    """No phantom turn: noise neither starts an utterance nor adds words to the one before it."""
    for noise in room_noises():
        assert await hear(stt, padded(noise), silence_ms=0) == []
    speech = recordings.goforward().audio
    for noise in room_noises():
        trailing = np.concatenate([speech, np.zeros(RATE // 2, np.int16), noise])
        said = finals(await hear(stt, padded(trailing), silence_ms=0))
        assert [normalise(f.transcript) for f in said] == ["go forward ten meters"]


async def test_the_turn_model_waits_out_a_pause_in_an_unfinished_sentence(stt: ServiceProcess) -> None:
    """With a turn model, the stage's default silence (a client's 0) is its choice at each pause:
    after "my account number is" (spoken as a clause that goes on) it waits out a 600 ms pause,
    which a fixed 400 ms cuts in two; after a finished sentence it ends the utterance within a
    900 ms pause (not after the unfinished 1200 ms). ("can you tell me about the" in this voice
    scores near the threshold and is judged either way from run to run: see BENCHMARKS.md.)"""
    speaker = EspeakSpeaker("en-gb")
    try:
        unfinished = ("my account number is,", "four five six")
        parts = [speaker(text, RATE) for text in (*unfinished, "Please cancel my order.", "Yes.")]
    finally:
        speaker.close()
    voiced = [part.samples[: part.speech_end_samples] for part in parts]
    # Shorter than the unfinished silence (1200 ms), long enough for a check on a busy machine.
    pauses = (np.zeros(RATE * ms // 1000, np.int16) for ms in (600, 900))
    account, finished = (
        padded(np.concatenate([first, pause, second]), after_s=1.5)
        for first, second, pause in zip(voiced[::2], voiced[1::2], pauses, strict=True)
    )
    whole = [
        normalise(f.transcript) for f in finals(await hear_in_real_time(stt, account, config(silence_ms=0)))
    ]
    # tiny.en mishears a word of espeak's now and then: the ends are what the pause separates.
    assert len(whole) == 1, whole
    assert whole[0].startswith("my account number")
    assert whole[0].replace(" ", "").endswith(("fourfivesix", "456")), whole
    fixed = finals(await hear_in_real_time(stt, account, config(silence_ms=400)))
    assert len(fixed) == 2, [f.transcript for f in fixed]
    two = finals(await hear_in_real_time(stt, finished, config(silence_ms=0)))
    assert [normalise(f.transcript) for f in two] == ["please cancel my order", "yes"]


def paused_phrase(first: str, second: str, pause_ms: int) -> Samples:
    """`first`, a pause, `second`, spoken by espeak-ng (en-gb), then silence."""
    speaker = EspeakSpeaker("en-gb")
    try:
        a, b = (speaker(text, RATE) for text in (first, second))
    finally:
        speaker.close()
    pause = np.zeros(RATE * pause_ms // 1000, np.int16)
    return padded(np.concatenate([a.samples[: a.speech_end_samples], pause, b.samples]), after_s=1.5)


async def test_words_that_leave_a_sentence_open_keep_the_pause_inside_it(stt: ServiceProcess) -> None:
    """ "the reason I am calling is that" spoken with a falling, final voice is judged finished by
    the turn model (0.89 in BENCHMARKS.md); its words cannot end a sentence, so the stage's default
    silence waits out a 700 ms pause after them. A client's explicit 400 ms cuts it in two."""
    audio = paused_phrase("the reason I am calling is that.", "my card was blocked", 700)
    whole = [
        normalise(f.transcript) for f in finals(await hear_in_real_time(stt, audio, config(silence_ms=0)))
    ]
    # tiny.en mishears a word of espeak's now and then: the ends are what the pause separates.
    assert len(whole) == 1, whole
    assert whole[0].startswith("the reason") and "card was" in whole[0], whole
    fixed = finals(await hear_in_real_time(stt, audio, config(silence_ms=400)))
    assert len(fixed) == 2, [f.transcript for f in fixed]


async def test_without_a_turn_model_the_words_keep_an_unfinished_sentence_whole() -> None:
    """The fixed silence (400 ms, no turn model) is held open by the pause's words alone: "my
    account number is … four five six" with a 700 ms pause is one utterance; a finished sentence
    still ends after the fixed silence."""
    with running("stt_whisper") as fixed:
        account = paused_phrase("my account number is", "four five six", 700)
        said = [
            normalise(f.transcript)
            for f in finals(await hear_in_real_time(fixed, account, config(silence_ms=0)))
        ]
        assert len(said) == 1, said
        assert said[0].startswith("my account number") and said[0].replace(" ", "").endswith(
            ("fourfivesix", "456")
        )
        two = paused_phrase("Please cancel my order.", "Yes.", 700)
        said = [
            normalise(f.transcript) for f in finals(await hear_in_real_time(fixed, two, config(silence_ms=0)))
        ]
        assert said == ["please cancel my order", "yes"]


def test_a_turn_model_that_is_not_installed_fails_clearly() -> None:
    refused = pytest.raises(RuntimeError, match=r"install it with python -m stt_whisper\.turn_model")
    with refused, running("stt_whisper", "--turn-model", "/nonexistent/smart-turn.onnx"):
        pass


async def test_silence_and_noise_give_no_transcript(stt: ServiceProcess) -> None:
    rng = np.random.default_rng(3)
    silence = np.zeros(2 * RATE, np.int16)
    hiss = rng.normal(0, 300, 3 * RATE).astype(np.int16)
    hum = (2000 * np.sin(2 * np.pi * 50 * np.arange(3 * RATE) / RATE)).astype(np.int16)
    responses = await hear(stt, np.concatenate([silence, hiss, silence, hum, silence]))
    assert [f.transcript for f in finals(responses) if f.transcript] == []


async def test_interims_arrive_before_the_final_and_stable_prefixes_hold(stt: ServiceProcess) -> None:
    """A caller speaking in real time (20 ms every 20 ms) sees the growing utterance."""
    recording = recordings.librivox()[0]  # 7 s
    responses = await hear_in_real_time(
        stt, padded(recording.audio, after_s=0.6), config(interim_results=True)
    )
    results = [r.result for r in responses if r.HasField("result")]
    assert results[-1].is_final and not any(r.is_final for r in results[:-1])
    interims = results[:-1]
    assert len(interims) >= 3, [r.transcript for r in interims]
    stable = ""
    for interim in interims:
        prefix = interim.transcript[: round(interim.stability * len(interim.transcript))]
        assert prefix.startswith(stable), (stable, interim.transcript)
        stable = prefix
    assert stable, "nothing was ever reported stable"
    assert normalise(results[-1].transcript) == recording.reference


async def test_a_speculative_result_comes_in_the_pause_and_the_final_confirms_it(
    stt: ServiceProcess,
) -> None:
    """The decode started at the pause goes out before the endpointing silence has held; the
    final is that same decode (same words, same end)."""
    recording = recordings.goforward()
    # A silence long enough for the decode on a busy machine.
    first = config(speculative=True, silence_ms=1500)
    responses = await hear_in_real_time(stt, padded(recording.audio, after_s=2.0), first)
    [speculative, final] = [r.result for r in responses if r.HasField("result")]
    assert speculative.speculative and not speculative.is_final
    assert final.is_final and not final.speculative
    assert (speculative.transcript, seconds(speculative)) == (final.transcript, seconds(final))
    assert normalise(final.transcript) == recording.reference
    # Decoded in the pause: it took less than the endpointing silence plus the decode.
    stage_s = durations.to_seconds(speculative.finalization_time)
    assert 0 < stage_s < durations.to_seconds(final.finalization_time)


async def test_speech_resuming_after_a_pause_withdraws_the_speculative_result(
    stt: ServiceProcess,
) -> None:
    """A pause long enough to decode in, shorter than the endpointing silence asked for."""
    pause = np.zeros(RATE * 6 // 5, np.int16)
    sentences = [recordings.goforward().audio, pause, recordings.cards()[0].audio]
    audio = padded(np.concatenate(sentences), after_s=3.0)  # the stream ends before the silence
    responses = await hear_in_real_time(stt, audio, config(speculative=True, silence_ms=5000))
    said = [
        ("withdrawn" if r.HasField("speech_event") else "speculative" if r.result.speculative else "final")
        for r in responses
        if r.HasField("result") or r.speech_event.type == pb.SPEECH_EVENT_TYPE_SPECULATION_WITHDRAWN
    ]
    # The second pause's speculative result comes if its decode ends before the stream does
    # (this machine may be busy).
    assert said in (
        ["speculative", "withdrawn", "final"],
        ["speculative", "withdrawn", "speculative", "final"],
    )
    texts = [normalise(r.result.transcript) for r in responses if r.HasField("result")]
    assert texts[0] == "go forward ten meters"
    assert texts[-1].startswith("go forward ten meters ten") and texts[1] == texts[-1]


async def hear_in_real_time(
    stt: ServiceProcess, audio: Samples, first: pb.TranscribeRequest
) -> list[pb.TranscribeResponse]:
    """A caller speaking in real time: 20 ms every 20 ms."""
    async with open_channel(stt.target) as channel:
        call = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel).Transcribe(timeout=CALL_TIMEOUT_S)
        writer = asyncio.create_task(
            _speak_in_real_time(call, PCM16.encode(audio), first), name="test-realtime-writer"
        )
        try:
            outcome = await collect(call)
            await writer
        finally:
            writer.cancel()
    return outcome.assert_ok()


async def _speak_in_real_time(
    call: grpc.aio.StreamStreamCall[pb.TranscribeRequest, pb.TranscribeResponse],
    data: bytes,
    first: pb.TranscribeRequest,
) -> None:
    await call.write(first)
    started = time.monotonic()
    for index, request in enumerate(audio_requests(data, every(640))):
        await asyncio.sleep(max(0.0, started + index * 0.02 - time.monotonic()))  # a real-time source
        await call.write(request)
    await call.done_writing()


async def test_long_speech_is_cut_into_finals_with_nothing_lost(stt: ServiceProcess) -> None:
    """Over 30 s of speech whose pauses are all shorter than the endpointing silence."""
    gap = np.zeros(RATE // 10, np.int16)
    sentences = [*recordings.librivox(), recordings.goforward(), recordings.librivox()[1]]
    audio = np.concatenate([part for r in sentences for part in (r.audio, gap)])
    assert len(audio) > 30 * RATE
    said = finals(await hear(stt, padded(audio), silence_ms=2000))
    assert len(said) >= 2
    for before, after in itertools.pairwise(said):
        # The next utterance starts where the last one was cut.
        assert seconds(before)[1] <= seconds(after)[0] < seconds(before)[1] + 0.1
    heard = normalise(" ".join(f.transcript for f in said)).split()
    reference = normalise(" ".join(r.reference for r in sentences)).split()
    assert len(set(reference) - set(heard)) <= 3, set(reference) - set(heard)
    assert abs(len(heard) - len(reference)) <= 3


async def test_unsupported_language_is_refused_naming_the_models_languages(stt: ServiceProcess) -> None:
    outcome = await transcribe(stt, config(language="fr-FR"), [])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'fr-FR'" in outcome.details and "recognises: en" in outcome.details
    ok = await transcribe(stt, config(language="en-GB"), audio_requests(bytes(6400), every(640)))
    assert ok.assert_ok() == []


def test_a_model_that_would_need_a_download_fails_clearly() -> None:
    """A hub name not in the local cache: the stage does not start, and says why (no fetch)."""
    refused = pytest.raises(RuntimeError, match="never downloads models")
    with refused, running("stt_whisper", "--model", "small.en"):
        pass


async def test_a_spoken_turn_through_the_orchestrator() -> None:
    """The orchestrator with the Whisper stage as its STT (the stub LLM and TTS): a caller's
    recorded sentence becomes the turn's user text, and the agent answers it."""
    stack = await start_stack("instant", ephemeral=True, engines={**STUBS, "stt": "whisper"})
    try:
        assert stack.orchestrator is not None
        async with open_channel(stack.orchestrator.target) as channel, Caller(channel) as caller:
            await caller.open()
            await caller.conversation.speak(
                Utterance.from_samples(padded(recordings.goforward().audio), PCM16)
            )
            turn = await caller.turn_ended("1", timeout_s=30)
            await caller.end_input()
            assert await caller.ended(timeout_s=30) == (grpc.StatusCode.OK, "")
        assert [normalise(text) for text in caller.final_transcripts()] == ["go forward ten meters"]
        assert normalise(turn.user_text) == "go forward ten meters"
        assert turn.completed is not None and turn.agent_text and turn.audio_bytes > 0
    finally:
        await asyncio.to_thread(stack.stop)
