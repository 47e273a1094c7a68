"""Mid-sentence pauses against the fixed silence and the turn model, in the Whisper engine (this
process, behind its SDK interface, audio paced in real time):

    python -m bench.turn_pauses [--pauses-ms 300,500,700]

- each phrase of SPLIT is spoken by espeak-ng with a pause after its first part ("can you tell me
  about the … opening hours"): how many are heard as one utterance, as two;
- each phrase of WHOLE, a finished sentence: the time from the end of its speech (the frame that
  holds it being fed) to its final.

Variants: the fixed 400 ms, and the turn model (its file installed by `python -m
stt_whisper.turn_model`) choosing 200 or 800 ms at each pause."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import numpy as np

from stt_whisper.decoder import ModelSettings
from stt_whisper.engine import FIXED_SILENCE_MS, WhisperEngine
from stt_whisper.turn_model import DEFAULT_PATH, TurnEnd
from tts_espeak.speaker import EspeakSpeaker
from voice.v1 import common_pb2
from voicepipe.audio_format import LINEAR16, PcmFormat
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples
from voicepipe.stage.stt import Transcript, TranscriptionSettings

RATE = 16_000
FRAME = RATE // 50
SPLIT = (
    ("can you tell me about the", "opening hours"),
    ("and then I went to the", "station"),
    ("my account number is", "four five six"),
    ("I would like to", "book a table for two"),
    ("the reason I am calling is that", "my card was blocked"),
    ("could you send me the", "invoice for March"),
)
WHOLE = (
    "What time do you open tomorrow?",
    "Please cancel my order.",
    "Thank you, that is all.",
    "I need a taxi to the airport.",
    "Yes.",
    "Can I speak to a person?",
)
VARIANTS = {"fixed 400 ms": False, "turn model": True}


def _settings(engine: WhisperEngine, turn_model: bool) -> TranscriptionSettings:
    """As the SDK makes them for a client that leaves the silence to the stage (the turn model's
    choice, the long silence until it has judged) or asks for the fixed one."""
    silence = engine.turn_end.incomplete_ms if turn_model else FIXED_SILENCE_MS
    return TranscriptionSettings(
        PcmFormat(LINEAR16, RATE), "en-US", False, False, silence, 20, common_pb2.Correlation(), turn_model
    )


async def _hear(
    engine: WhisperEngine, audio: Samples, speech_end: int, turn_model: bool
) -> tuple[int, float]:
    """The number of finals, and the seconds from feeding the end of speech to the last final."""
    ended_at = 0.0

    async def frames() -> AsyncIterator[Samples]:
        nonlocal ended_at
        started = time.monotonic()
        for index, start in enumerate(range(0, len(audio), FRAME)):
            await asyncio.sleep(max(0.0, started + index * 0.02 - time.monotonic()))
            if start <= speech_end < start + FRAME:
                ended_at = time.monotonic()
            yield audio[start : start + FRAME]

    finals, last = 0, 0.0
    async for event in engine.transcribe(_settings(engine, turn_model), frames()):
        if isinstance(event, Transcript) and event.is_final and event.text:
            finals, last = finals + 1, time.monotonic()
    return finals, last - ended_at


async def main(args: argparse.Namespace) -> None:
    speaker = EspeakSpeaker("en-gb")
    spoken = {text: speaker(text, RATE) for pair in SPLIT for text in pair} | {
        t: speaker(t, RATE) for t in WHOLE
    }
    speaker.close()
    flags = FlagParser("stt_whisper", "")
    WhisperEngine.add_flags(flags)
    engine_args = flags.parse([f"--turn-model={DEFAULT_PATH}"])
    engine = WhisperEngine(ModelSettings.from_args(engine_args), 0, 500, TurnEnd.from_args(engine_args))
    await engine.start()
    silence = np.zeros(RATE * 3 // 2, np.int16)
    try:
        for name, turn_model in VARIANTS.items():
            for pause_ms in (int(p) for p in args.pauses_ms.split(",")):
                whole = 0
                for first, second in SPLIT:
                    a, b = spoken[first], spoken[second]
                    gap = np.zeros(RATE * pause_ms // 1000, np.int16)
                    audio = np.concatenate([a.samples[: a.speech_end_samples], gap, b.samples, silence])
                    finals, _ = await _hear(engine, audio, len(audio) - len(silence), turn_model)
                    whole += finals == 1
                print(f"{name}: pause {pause_ms} ms: {whole} of {len(SPLIT)} phrases heard whole", flush=True)
            waits = []
            for text in WHOLE:
                phrase = spoken[text]
                audio = np.concatenate([phrase.samples, silence])
                _, wait = await _hear(engine, audio, phrase.speech_end_samples, turn_model)
                waits.append(wait)
            print(
                f"{name}: finished sentences: end of speech -> final {statistics.median(waits) * 1000:.0f} ms"
                f" median, {max(waits) * 1000:.0f} ms max",
                flush=True,
            )
    finally:
        await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.turn_pauses", description=__doc__)
    parser.add_argument("--pauses-ms", default="300,500,700", help="mid-sentence pauses, comma-separated")
    asyncio.run(main(parser.parse_args()))
