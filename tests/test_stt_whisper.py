"""The Whisper stage on real human speech with the bundled tiny.en model, through its engine."""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
import pytest

from bench import recordings
from bench.recordings import Recording, normalise
from stt_whisper.decoder import ModelSettings
from stt_whisper.engine import WhisperEngine
from voice.v1 import common_pb2
from voicepipe.audio_format import LINEAR16, MULAW, InvalidInput, PcmFormat
from voicepipe.config import FlagParser
from voicepipe.pcm import Resampler, Samples, mulaw_decode, mulaw_encode
from voicepipe.stage import StageError
from voicepipe.stage.stt import SpeechEvent, SpeechStarted, Transcript, TranscriptionSettings

pytestmark = pytest.mark.skipif(
    not recordings.available(), reason="needs Debian's pocketsphinx-testdata (apt-get install it)"
)

RATE = 16_000
FRAME = RATE // 50  # 20 ms


def settings(
    *, interim_results: bool = False, silence_ms: int = 300, language: str = "en-US"
) -> TranscriptionSettings:
    return TranscriptionSettings(
        fmt=PcmFormat(LINEAR16, RATE),
        language_code=language,
        interim_results=interim_results,
        end_of_utterance_silence_ms=silence_ms,
        speech_start_ms=20,
        correlation=common_pb2.Correlation(session_id="test"),
    )


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[WhisperEngine]:
    flags = ModelSettings.from_args(_default_args())
    whisper = WhisperEngine(flags, max_sessions=2, interim_interval_ms=400)
    await whisper.start()
    try:
        yield whisper
    finally:
        await whisper.close()


def _default_args() -> argparse.Namespace:
    flags = FlagParser("stt", "test")
    WhisperEngine.add_flags(flags)
    return flags.parse([])


def padded(audio: Samples, before_s: float = 0.5, after_s: float = 1.0) -> Samples:
    return np.concatenate(
        [np.zeros(int(before_s * RATE), np.int16), audio, np.zeros(int(after_s * RATE), np.int16)]
    )


async def chunks(audio: Samples, sizes: Iterable[int], realtime: bool = False) -> AsyncIterator[Samples]:
    position = 0
    for size in sizes:
        if position >= len(audio):
            return
        chunk = audio[position : position + size]
        position += size
        if realtime:
            await asyncio.sleep(len(chunk) / RATE)
        yield chunk


def frames(size: int = FRAME) -> Iterable[int]:
    while True:
        yield size


async def run(
    engine: WhisperEngine, audio: Samples, config: TranscriptionSettings | None = None, **kwargs: bool
) -> list[SpeechEvent]:
    return [
        event
        async for event in engine.transcribe(
            config or settings(), chunks(audio, frames(), realtime=kwargs.get("realtime", False))
        )
    ]


def finals(events: list[SpeechEvent]) -> list[Transcript]:
    return [e for e in events if isinstance(e, Transcript) and e.is_final]


@pytest.mark.parametrize(
    "recording",
    [recordings.goforward(), *recordings.librivox()[::4]],  # goforward, 0870, 0930
    ids=lambda r: r.name,
)
async def test_spoken_sentence_is_transcribed(engine: WhisperEngine, recording: Recording) -> None:
    events = await run(engine, padded(recording.audio))
    assert isinstance(events[0], SpeechStarted)
    [final] = finals(events)
    assert normalise(final.text) == recording.reference
    # Offsets are samples at 16 kHz from the start of the call: the speech lies between the
    # padding before (0.5 s) and after the recording.
    assert 0.45 * RATE < final.start < final.end < 0.5 * RATE + len(recording.audio)
    assert final.end - final.start > 0.5 * len(recording.audio)
    assert 0 < final.confidence <= 1


async def test_any_chunking_gives_the_same_finals(engine: WhisperEngine) -> None:
    audio = padded(np.concatenate([recordings.goforward().audio, np.zeros(RATE, np.int16), _short().audio]))
    rng = np.random.default_rng(7)
    chunkings: list[Iterable[int]] = [
        frames(),
        frames(RATE * 2),
        (int(n) for n in rng.integers(1, 3000, 10_000)),
    ]
    results = []
    for sizes in chunkings:
        events = [e async for e in engine.transcribe(settings(), chunks(audio, sizes))]
        results.append([(f.text, f.start, f.end) for f in finals(events)])
    assert len(results[0]) == 2
    assert results[0] == results[1] == results[2]


async def test_8khz_mulaw_input_is_transcribed(engine: WhisperEngine) -> None:
    """Telephone audio: 8 kHz G.711 mu-law, decoded and resampled to the engine's 16 kHz."""
    down, up = Resampler(RATE, 8000), Resampler(8000, RATE)
    telephone = mulaw_encode(np.concatenate([down(padded(recordings.goforward().audio)), down.flush()]))
    heard = mulaw_decode(telephone)
    audio = np.concatenate([up(heard), up.flush()])
    config = settings()
    config = TranscriptionSettings(PcmFormat(MULAW, 8000), "en-US", False, 300, 20, config.correlation)
    [final] = finals(await run(engine, audio, config))
    assert normalise(final.text) == "go forward ten meters"


async def test_silence_and_noise_give_no_transcript(engine: WhisperEngine) -> None:
    rng = np.random.default_rng(3)
    silence = np.zeros(3 * RATE, np.int16)
    hiss = (rng.normal(0, 300, 3 * RATE)).astype(np.int16)
    hum = (2000 * np.sin(2 * np.pi * 50 * np.arange(3 * RATE) / RATE)).astype(np.int16)
    events = await run(engine, np.concatenate([silence, hiss, hum]))
    assert [f.text for f in finals(events) if f.text] == []


async def test_interims_arrive_before_the_final_and_stable_prefixes_hold(engine: WhisperEngine) -> None:
    recording = recordings.librivox()[0]  # 7 s
    events = await run(
        engine, padded(recording.audio, after_s=0.5), settings(interim_results=True), realtime=True
    )
    transcripts = [e for e in events if isinstance(e, Transcript)]
    assert transcripts[-1].is_final and not any(t.is_final for t in transcripts[:-1])
    interims = transcripts[:-1]
    assert len(interims) >= 2
    stable = ""
    for interim in interims:
        prefix = interim.text[: round(interim.stability * len(interim.text))]
        assert prefix.startswith(stable), (stable, interim.text)
        stable = prefix
    assert stable, "nothing was ever reported stable"
    assert normalise(transcripts[-1].text) == recording.reference


async def test_long_speech_is_cut_into_finals_with_nothing_lost(engine: WhisperEngine) -> None:
    """Over 30 s of speech whose pauses are all shorter than the endpointing silence."""
    gap = np.zeros(RATE // 10, np.int16)
    sentences = [*recordings.librivox(), recordings.goforward(), *recordings.librivox()[1:2]]
    audio = np.concatenate([part for r in sentences for part in (r.audio, gap)])
    assert len(audio) > 30 * RATE
    events = await run(engine, padded(audio), settings(silence_ms=2000))
    said = finals(events)
    assert len(said) >= 2
    for before, after in itertools.pairwise(said):
        assert before.end <= after.start < before.end + RATE // 10
    heard = normalise(" ".join(f.text for f in said)).split()
    reference = normalise(" ".join(r.reference for r in sentences)).split()
    missing = set(reference) - set(heard)
    assert len(missing) <= 3, missing
    assert abs(len(heard) - len(reference)) <= 3


async def test_unsupported_language_is_refused_naming_the_models_languages(engine: WhisperEngine) -> None:
    with pytest.raises(InvalidInput, match=r"'fr-FR'.*recognises: en"):
        engine.check(settings(language="fr-FR"))
    engine.check(settings(language="en-GB"))


async def test_calls_beyond_the_session_limit_are_refused(engine: WhisperEngine) -> None:
    gate, both_open = asyncio.Event(), asyncio.Event()
    opened = 0

    async def held() -> AsyncIterator[Samples]:
        nonlocal opened
        opened += 1  # the engine reads a call's audio once it has admitted the call
        if opened == 2:
            both_open.set()
        await gate.wait()
        yield np.zeros(FRAME, np.int16)

    open_calls = [engine.transcribe(settings(), held()) for _ in range(2)]
    tasks = [asyncio.create_task(anext(call, None), name="held-call") for call in open_calls]
    try:
        await asyncio.wait_for(both_open.wait(), 10)
        with pytest.raises(StageError) as refused:
            await anext(engine.transcribe(settings(), held()))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2" in refused.value.message
    finally:
        gate.set()
        # Each held call then ends on its own, with nothing heard.
        assert await asyncio.gather(*tasks) == [None, None]


def _short() -> Recording:
    return recordings.librivox()[4]
