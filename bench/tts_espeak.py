"""The espeak-ng voice engine's own figures, in one process (the engine behind its SDK interface,
without the gRPC hop): time to first audio per segment, the synthesis real-time factor, and how
many sessions speaking at once in real time one process carries with no late audio.

    python -m bench.tts_espeak [--short]

Time to first audio is from the segment becoming due to its first piece of audio reaching the
event loop; the real-time factor is synthesis time over audio duration (below 1: faster than
real time). For capacity, N sessions each speak a reply of several sentences, starting at
random moments within `STAGGER_S`; each session plays its reply from the moment the first audio
arrives, and a piece is late if it arrives after the moment it should start playing. Capacity is
the largest N tried with no late piece and no refused segment. Every loop is bounded."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import uvloop

from tts_espeak.engine import EspeakEngine
from voice.v1 import common_pb2
from voicepipe.audio_format import LINEAR16, PcmFormat
from voicepipe.stage import StageError
from voicepipe.stage.tts import Segment, SynthesisSettings, VoiceEngine

REPLY = (
    "Sure, I can help with that.",
    "The nearest pharmacy is on Main Street, about five minutes from here.",
    "It opens at nine in the morning and closes at eight in the evening.",
)
LONG_SEGMENT = ("Streaming speech arrives while the rest is still being made. " * 66)[:4096]
SAMPLES = 20
SESSIONS = (1, 8, 16, 32, 48, 64, 96, 128)
STAGGER_S = 2.0
SETTINGS = SynthesisSettings(PcmFormat(LINEAR16, 16_000), "", 20, common_pb2.Correlation())


@dataclass(frozen=True)
class Spoken:
    ttfa_s: float
    synthesis_s: float
    audio_s: float


async def speak(engine: VoiceEngine, text: str) -> Spoken:
    due = time.monotonic()
    first: float | None = None
    samples = 0
    async for piece in engine.synthesize(SETTINGS, Segment(1, text, due)):
        first = first or time.monotonic()
        samples += piece.samples.size
    assert first is not None
    return Spoken(first - due, time.monotonic() - due, samples / engine.sample_rate(SETTINGS))


async def single_session(engine: VoiceEngine, samples: int) -> None:
    print("| segment | chars | audio | TTFA p50 | synthesis p50 | real-time factor p50 |")
    print("|---|---|---|---|---|---|")
    for name, text in (("sentence", REPLY[1]), ("longest (4096 chars)", LONG_SEGMENT)):
        runs = [await speak(engine, text) for _ in range(samples)]
        ttfa = statistics.median(r.ttfa_s for r in runs)
        synthesis = statistics.median(r.synthesis_s for r in runs)
        rtf = statistics.median(r.synthesis_s / r.audio_s for r in runs)
        print(
            f"| {name} | {len(text)} | {runs[0].audio_s:.2f} s | {ttfa * 1000:.1f} ms"
            f" | {synthesis * 1000:.1f} ms | {rtf:.4f} |",
            flush=True,
        )


@dataclass
class SessionOutcome:
    ttfa_s: float = 0.0
    late: int = 0
    worst_lateness_s: float = 0.0
    refused: bool = False


async def session(engine: VoiceEngine, delay_s: float) -> SessionOutcome:
    """One reply, played in real time from its first audio."""
    await asyncio.sleep(delay_s)
    outcome = SessionOutcome()
    due = time.monotonic()
    play_start: float | None = None
    offset_s = 0.0  # where the next piece starts in the reply's audio
    rate = engine.sample_rate(SETTINGS)
    try:
        for index, text in enumerate(REPLY):
            async for piece in engine.synthesize(SETTINGS, Segment(index, text, due)):
                now = time.monotonic()
                if play_start is None:
                    play_start, outcome.ttfa_s = now, now - due
                lateness = now - (play_start + offset_s)
                if lateness > 0:
                    outcome.late += 1
                    outcome.worst_lateness_s = max(outcome.worst_lateness_s, lateness)
                offset_s += piece.samples.size / rate
    except StageError:
        outcome.refused = True
    return outcome


async def capacity(engine: VoiceEngine, levels: tuple[int, ...]) -> int:
    """Prints a row per level tried; returns the most sessions carried with no late piece."""
    print("\n| sessions | TTFA p50 | TTFA max | late pieces | worst lateness | refused |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(1)
    carried = 0
    for count in levels:
        tasks = [
            asyncio.create_task(session(engine, rng.uniform(0, STAGGER_S)), name=f"bench-session-{i}")
            for i in range(count)
        ]
        try:
            outcomes = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ttfas = [o.ttfa_s for o in outcomes if not o.refused]
        late = sum(o.late for o in outcomes)
        refused = sum(o.refused for o in outcomes)
        worst = max(o.worst_lateness_s for o in outcomes)
        print(
            f"| {count} | {statistics.median(ttfas) * 1000:.1f} ms | {max(ttfas) * 1000:.1f} ms | {late}"
            f" | {worst * 1000:.1f} ms | {refused} |",
            flush=True,
        )
        if late or refused:
            break
        carried = count
    tried = ", ".join(map(str, levels))
    print(f"\nreal-time sessions carried with no late piece: {carried} (tried: {tried})")
    return carried


async def run(short: bool) -> None:
    engine = EspeakEngine()
    await engine.start()
    try:
        await speak(engine, REPLY[0])  # warm-up: voice and dictionary loaded
        await single_session(engine, 3 if short else SAMPLES)
        await capacity(engine, SESSIONS[:3] if short else SESSIONS)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="fewer samples and session counts (a smoke run)")
    uvloop.run(run(parser.parse_args().short))


if __name__ == "__main__":
    main()
