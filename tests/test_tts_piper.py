"""The Piper voice engine through its SDK interface, with real synthesis: the bundled neural
voice speaks at its own rate, sentence by sentence as it is synthesised, in pieces that end on
the words the model's phoneme durations say have been spoken; voices come from any model path."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from tests.test_tts_espeak import audio_of, on_word_boundary, settings, speak
from tts_piper.engine import BUNDLED_VOICE, PiperEngine
from voicepipe.audio_format import InvalidInput
from voicepipe.stage.tts import Segment

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away."
SENTENCES = " ".join(f"This is sentence number {n} of a longer answer." for n in range(1, 7))


@pytest.fixture(scope="module")
def second_voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled voice again under another name, as a user's own voice files would be."""
    folder = tmp_path_factory.mktemp("voices")
    model = folder / "en_US-other-medium.onnx"
    model.symlink_to(BUNDLED_VOICE)
    model.with_name(model.name + ".json").symlink_to(BUNDLED_VOICE.with_name(BUNDLED_VOICE.name + ".json"))
    return model


@pytest_asyncio.fixture(scope="module")
async def engine(second_voice: Path) -> AsyncIterator[PiperEngine]:
    started = PiperEngine(models=(BUNDLED_VOICE, second_voice))
    await started.start()
    try:
        yield started
    finally:
        await started.close()


async def test_audio_is_native_rate_speech_of_plausible_length(engine: PiperEngine) -> None:
    assert engine.sample_rate(settings()) == 22_050
    audio = audio_of(await speak(engine, SENTENCE))
    seconds = audio.size / 22_050
    words = len(SENTENCE.split())
    # Conversational speech is 120 to 220 words per minute.
    assert words / (220 / 60) < seconds < words / (120 / 60) + 1
    assert np.abs(audio.astype(np.int32)).max() > 3000, "the audio is silent"


async def test_text_ends_advance_word_by_word_to_the_end(engine: PiperEngine) -> None:
    text = "**Good** news 🎉: see [the docs](https://example.com/a/b) & call me at 3.14, on the hour."
    ends = [piece.text_end for piece in await speak(engine, text)]
    assert ends == sorted(ends) and ends[-1] == len(text)
    assert all(on_word_boundary(text, end) for end in ends)
    assert text.index("news") in ends  # "**Good** " heard, counted in the original's characters
    assert len(set(ends)) >= 8  # word by word ("on the" may end together), not all at the end


async def test_audio_streams_sentence_by_sentence(engine: PiperEngine) -> None:
    started = time.monotonic()
    first = None
    async for _ in engine.synthesize(settings(), Segment(1, SENTENCES, started)):
        first = first or time.monotonic()
    assert first is not None
    # Six sentences: the first leaves once its own synthesis is done, not the whole segment's.
    assert first - started < (time.monotonic() - started) / 3


async def test_closing_the_stream_stops_synthesis(engine: PiperEngine) -> None:
    started = time.monotonic()
    await speak(engine, SENTENCES)
    whole = time.monotonic() - started
    pieces = engine.synthesize(settings(), Segment(1, SENTENCES, time.monotonic()))
    await anext(pieces)
    await pieces.aclose()
    closed = time.monotonic()
    assert (await speak(engine, "Next."))[-1].text_end == len("Next.")
    assert time.monotonic() - closed < whole / 2


async def test_nothing_to_say_is_one_empty_piece(engine: PiperEngine) -> None:
    [piece] = await speak(engine, "🎉 **")
    assert piece.samples.size == 0 and piece.text_end == len("🎉 **")


async def test_voices_from_model_paths_are_listed_and_accepted(engine: PiperEngine) -> None:
    listing = await engine.list_voices()
    assert [voice.name for voice in listing.voices] == ["en_US-joe-medium", "en_US-other-medium"]
    assert listing.voices[0].language_codes == ("en-US",)
    assert not listing.accepts_any_name
    for voice in listing.voices:
        engine.check(settings(voice.name))
    assert (await speak(engine, "Hi.", "en_US-other-medium"))[-1].text_end == len("Hi.")


def test_unknown_voice_is_rejected_with_how_to_list_voices(engine: PiperEngine) -> None:
    with pytest.raises(InvalidInput, match="ListVoices") as raised:
        engine.check(settings("xx-nowhere"))
    assert "'xx-nowhere'" in str(raised.value)


async def test_a_missing_model_stops_the_engine_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.onnx"
    engine = PiperEngine(models=(missing,))
    try:
        with pytest.raises(FileNotFoundError, match=str(missing)):
            await engine.start()
    finally:
        await engine.close()
