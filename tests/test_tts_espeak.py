"""The espeak-ng voice engine through its SDK interface, with real synthesis: plausible audio,
word-aligned character ranges, streaming, voices, and bad input."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from tts_espeak.engine import EspeakEngine
from voice.v1 import common_pb2
from voicepipe.audio_format import LINEAR16, InvalidInput, PcmFormat
from voicepipe.pcm import Samples
from voicepipe.stage.tts import Segment, SpeechAudio, SynthesisSettings, VoiceEngine

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away."
# About four minutes of speech: the contract's longest segment.
LONG_TEXT = ("Streaming speech arrives while the rest is still being made. " * 66)[:4096]


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[EspeakEngine]:
    started = EspeakEngine()
    await started.start()
    try:
        yield started
    finally:
        await started.close()


def settings(voice: str = "") -> SynthesisSettings:
    return SynthesisSettings(
        fmt=PcmFormat(LINEAR16, 16_000),
        voice=voice,
        chunk_duration_ms=20,
        correlation=common_pb2.Correlation(),
    )


async def speak(engine: VoiceEngine, text: str, voice: str = "") -> list[SpeechAudio]:
    return [piece async for piece in engine.synthesize(settings(voice), Segment(1, text, time.monotonic()))]


def audio_of(pieces: list[SpeechAudio]) -> Samples:
    return np.concatenate([piece.samples for piece in pieces])


def on_word_boundary(text: str, end: int) -> bool:
    return end in (0, len(text)) or (text[end - 1].isspace() and not text[end].isspace())


async def test_audio_is_native_rate_speech_of_plausible_length(engine: EspeakEngine) -> None:
    assert engine.sample_rate(settings()) == 22_050
    audio = audio_of(await speak(engine, SENTENCE))
    seconds = audio.size / 22_050
    words = len(SENTENCE.split())
    # espeak speaks at the configured 175 words per minute, give or take pauses.
    assert 0.6 * words / (175 / 60) < seconds < 1.6 * words / (175 / 60)
    assert np.abs(audio.astype(np.int32)).max() > 3000, "the audio is silent"


async def test_text_ends_advance_word_by_word_to_the_end(engine: EspeakEngine) -> None:
    pieces = await speak(engine, SENTENCE)
    ends = [piece.text_end for piece in pieces]
    assert ends == sorted(ends)
    assert ends[-1] == len(SENTENCE)
    assert all(on_word_boundary(SENTENCE, end) for end in ends)
    # Every word's end shows up: a listener who stops anywhere knows which words were heard.
    assert set(ends) >= {i + 1 for i, char in enumerate(SENTENCE) if char == " "}


async def test_a_word_counts_as_heard_only_after_its_audio(engine: EspeakEngine) -> None:
    text = "one two three four five six seven eight"
    pieces = await speak(engine, text)
    total = sum(piece.samples.size for piece in pieces)
    played = 0
    for piece in pieces:
        played += piece.samples.size
        heard_words = len(text[: piece.text_end].split())
        # Eight similar words: by the time k words count as heard, most of k/8 of the audio played.
        assert played >= 0.7 * total * heard_words / 8


async def test_text_ends_index_the_original_text_of_markdown_and_emoji(engine: EspeakEngine) -> None:
    text = "**Good** news 🎉: see [the docs](https://example.com/a/b) & call me."
    ends = [piece.text_end for piece in await speak(engine, text)]
    assert ends == sorted(ends) and ends[-1] == len(text)
    assert all(on_word_boundary(text, end) for end in ends)
    assert text.index("news") in ends  # "**Good** " heard, counted in the original's characters


async def test_first_audio_leaves_long_before_the_segment_is_synthesised(engine: EspeakEngine) -> None:
    started = time.monotonic()
    first = None
    async for _ in engine.synthesize(settings(), Segment(1, LONG_TEXT, started)):
        first = first or time.monotonic()
    assert first is not None
    assert first - started < (time.monotonic() - started) / 10


async def test_closing_the_stream_stops_synthesis(engine: EspeakEngine) -> None:
    started = time.monotonic()
    await speak(engine, LONG_TEXT)
    whole = time.monotonic() - started
    pieces = engine.synthesize(settings(), Segment(1, LONG_TEXT, time.monotonic()))
    await anext(pieces)
    await pieces.aclose()
    closed = time.monotonic()
    # The one worker thread is free again well before the long segment would have finished.
    assert (await speak(engine, "Next."))[-1].text_end == len("Next.")
    assert time.monotonic() - closed < whole / 2


async def test_nothing_to_say_is_one_empty_piece(engine: EspeakEngine) -> None:
    [piece] = await speak(engine, "🎉 **")
    assert piece.samples.size == 0 and piece.text_end == len("🎉 **")


@pytest.mark.parametrize("voice", ["en-us", "en-gb", "en-US", "en-us+f3", "English (America)", "gmw/en-US"])
def test_voices_by_name_and_variant_are_accepted(engine: EspeakEngine, voice: str) -> None:
    engine.check(settings(voice))


@pytest.mark.parametrize(("voice", "complaint"), [("xx-nowhere", "'xx-nowhere'"), ("en-us+nope", "'nope'")])
def test_unknown_voice_is_rejected_with_how_to_list_voices(
    engine: EspeakEngine, voice: str, complaint: str
) -> None:
    with pytest.raises(InvalidInput, match="ListVoices") as raised:
        engine.check(settings(voice))
    assert complaint in str(raised.value)


async def test_voices_and_variants_sound_different(engine: EspeakEngine) -> None:
    voices = ("", "en-gb", "en-us+f3")
    us, gb, female = [audio_of(await speak(engine, "Hello there.", voice)) for voice in voices]
    assert not np.array_equal(us, gb) and not np.array_equal(us, female)


async def test_list_voices_offers_the_english_voices_and_variants(engine: EspeakEngine) -> None:
    listing = await engine.list_voices()
    names = {voice.name for voice in listing.voices}
    assert {"en-us", "en-gb", "de", "fr-fr"} <= names
    assert {"f3", "m3", "klatt"} <= set(listing.variants)
    assert not listing.accepts_any_name
    for voice in listing.voices:
        engine.check(settings(voice.name))  # every listed name is accepted
