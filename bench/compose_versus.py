"""Voice to voice through containers against the same stack as processes, side by side: the
real engines (Whisper, the local LLM, espeak-ng) as local processes (`make up STT=whisper
LLM=openai TTS=espeak`) and as the compose stack (`docker-compose.real.yml`, images built by
`make images`; the Docker engine is started if none runs, and stopped after), with the same
settings (400 ms endpointing, first segment a clause). Conversations alternate between the two,
the same phrases in each, so that both meet the same load; the difference is what the bridge
network and the containers cost.

    python -m bench.compose_versus [--rounds 3] [--turns-per-conversation 4]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.voice_to_voice import (
    CALLER_VOICE,
    FMT,
    NO_CONNECTION_AGE,
    PHRASES,
    REAL,
    WARM_UP,
    Variant,
    converse,
    ms,
)
from tests.docker_engine import ComposeStack, docker_engine
from tts_espeak.speaker import EspeakSpeaker
from voicepipe.healthcheck import wait_until_serving
from voicepipe_client import Utterance
from voicepipe_tools.stack import start_stack

SERVING_TIMEOUT_S = 300.0


async def main(args: argparse.Namespace) -> None:
    speaker = EspeakSpeaker(CALLER_VOICE)
    per = args.turns_per_conversation
    phrases = [Utterance.spoken(speaker, PHRASES[i % len(PHRASES)], FMT) for i in range(args.rounds * per)]
    warm_up = Utterance.spoken(speaker, WARM_UP, FMT)
    speaker.close()
    # 0: the endpointing silence of the STT engine (Whisper's own default), as in both stacks.
    processes = Variant(0, "clause")
    containers = Variant(0, "clause")
    stack = await start_stack(
        "realistic", ephemeral=True, engines=REAL, stage_flags={role: NO_CONNECTION_AGE for role in REAL}
    )
    compose = ComposeStack(["docker-compose.yml", "docker-compose.real.yml"])
    try:
        assert stack.orchestrator is not None
        await asyncio.to_thread(compose.up)
        in_containers = compose.published("orchestrator", 50051)
        await wait_until_serving(in_containers, SERVING_TIMEOUT_S)
        targets = {
            "processes": (stack.orchestrator.target, processes),
            "containers": (in_containers, containers),
        }
        for target, _ in targets.values():
            await converse(target, Variant(0, "warm-up"), [warm_up])
        for index in range(args.rounds):
            # The order alternates from round to round, so neither always goes first.
            order = list(targets.values()) if index % 2 == 0 else list(reversed(targets.values()))
            for target, variant in order:
                await converse(target, variant, phrases[index * per : (index + 1) * per])
    finally:
        await asyncio.to_thread(compose.down)
        await asyncio.to_thread(stack.stop)
    print("| stack | turns | voice to voice p50 / p95 (ms) | failed turns |\n|---|---|---|---|")
    for name, variant in (("processes", processes), ("containers", containers)):
        print(f"| {name} | {len(variant.v2v)} | {ms(variant.v2v)} | {variant.failed} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.compose_versus", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="conversations with each stack")
    parser.add_argument("--turns-per-conversation", type=int, default=4)
    with docker_engine():
        asyncio.run(main(parser.parse_args()))
