"""Voice-to-voice latency with all three real engines local (Whisper tiny.en, the bundled
SmolLM2 behind the OpenAI-compatible stage, espeak-ng): from the end of the user's speech to the
first reply audio the client receives, split into STT finalisation, LLM time to first sentence,
TTS first audio and the orchestrator's part, with the stack's CPU per session.

    python -m bench.voice_to_voice [--turns 20] [--silence-ms 250,400,600] [--rounds 2]

Each round starts one stack per endpointing silence (the orchestrator's
--end-of-utterance-silence-ms) and speaks the same phrases to each in real time, one
conversation per stack, so that the variants meet the same machine. The caller speaks through
espeak-ng in another voice than the agent's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field

from bench import procstat
from orchestrator.stack import LocalStack, start_stack
from tts_espeak.speaker import EspeakSpeaker
from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe.durations import to_seconds
from voicepipe_client import Conversation, Microphone, SessionSettings, Utterance, connect

REAL = {"stt": "whisper", "llm": "openai", "tts": "espeak"}
FMT = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
CALLER_VOICE = "en-gb-x-rp"
# Short questions a voice agent gets; a pause after each lets the reply start before the next.
PHRASES = (
    "Hello, my name is Sam.",
    "What is the capital of France?",
    "How are you today?",
    "Can you tell me a joke?",
    "What time is it in London?",
    "What is two plus two?",
    "Tell me about the weather.",
    "Thank you very much.",
    "What is your name?",
    "Where do penguins live?",
)
TURN_TIMEOUT_S = 60.0
FIGURES = ("voice_to_voice", "stt_finalization", "llm_first_sentence", "tts_first_audio", "orchestrator")


@dataclass
class Variant:
    silence_ms: int
    figures: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in FIGURES})
    cpu_s: float = 0.0
    wall_s: float = 0.0
    failed: int = 0


async def converse(stack: LocalStack, phrases: list[Utterance], variant: Variant) -> None:
    assert stack.orchestrator is not None
    async with connect(stack.orchestrator.target) as channel:
        conversation = Conversation(
            channel, SessionSettings(FMT, FMT), microphone=Microphone(realtime=True), timeout_s=600
        )
        async with conversation:
            for phrase in phrases:
                turn = conversation.say(phrase)
                await asyncio.wait_for(turn.done.wait(), TURN_TIMEOUT_S)
                if turn.completed is None or turn.ttfa_s is None:
                    variant.failed += 1
                    continue
                lat = turn.completed.latency
                variant.figures["voice_to_voice"].append(turn.ttfa_s)
                variant.figures["stt_finalization"].append(to_seconds(lat.stt_finalization))
                variant.figures["llm_first_sentence"].append(to_seconds(lat.llm_time_to_first_sentence))
                variant.figures["tts_first_audio"].append(to_seconds(lat.tts_time_to_first_audio))
                variant.figures["orchestrator"].append(to_seconds(lat.orchestrator_added))
            await conversation.finish()


async def measure(variant: Variant, phrases: list[Utterance]) -> None:
    flags = ["--end-of-utterance-silence-ms", str(variant.silence_ms)]
    stack = await start_stack("realistic", ephemeral=True, engines=REAL, orchestrator_flags=flags)
    try:
        pids = [p.process.pid for p in stack.processes]
        cpu_before = sum(procstat.sample(pid).cpu_s for pid in pids)
        started = time.monotonic()
        await converse(stack, phrases, variant)
        variant.wall_s += time.monotonic() - started
        variant.cpu_s += sum(procstat.sample(pid).cpu_s for pid in pids) - cpu_before
    finally:
        await asyncio.to_thread(stack.stop)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(variants: list[Variant]) -> str:
    lines = [
        "| end-of-utterance silence | turns | voice-to-voice p50 / p95 | STT final p50 | LLM 1st sentence p50"
        " | TTS 1st audio p50 | orchestrator p50 | stack CPU (cores, one session) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        f = {name: values for name, values in v.figures.items()}
        if not f["voice_to_voice"]:
            lines.append(f"| {v.silence_ms} ms | 0 ({v.failed} failed) | | | | | | |")
            continue

        def ms(name: str, figures: dict[str, list[float]] = f) -> str:
            return f"{statistics.median(figures[name]) * 1000:.0f} ms"

        v2v = f["voice_to_voice"]
        lines.append(
            f"| {v.silence_ms} ms | {len(v2v)}{f' ({v.failed} failed)' if v.failed else ''}"
            f" | {statistics.median(v2v) * 1000:.0f} / {percentile(v2v, 0.95) * 1000:.0f} ms"
            f" | {ms('stt_finalization')} | {ms('llm_first_sentence')} | {ms('tts_first_audio')}"
            f" | {ms('orchestrator')} | {v.cpu_s / v.wall_s:.2f} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    speaker = EspeakSpeaker(CALLER_VOICE)
    per_round = max(1, args.turns // args.rounds)
    phrases = [Utterance.spoken(speaker, PHRASES[i % len(PHRASES)], FMT) for i in range(per_round)]
    speaker.close()
    variants = [Variant(int(ms)) for ms in args.silence_ms.split(",")]
    for round_index in range(args.rounds):
        for variant in variants if round_index % 2 == 0 else reversed(variants):
            print(f"round {round_index + 1}: {variant.silence_ms} ms endpointing", flush=True)
            await measure(variant, phrases)
    print(report(variants))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.voice_to_voice", description=__doc__)
    parser.add_argument("--turns", type=int, default=20, help="turns per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument(
        "--silence-ms", default="400", help="endpointing silences to compare, comma-separated"
    )
    asyncio.run(main(parser.parse_args()))
