"""How long a compose stack takes from `docker-compose up` to an orchestrator that reports
SERVING, and `down` to nothing, for the stub stack, the stub stack with replicas and the real
stack (images built by `make images`; the Docker engine is started if none runs, and stopped
after). Each stack is started `--rounds` times under a project name of its own, the orchestrator
on an ephemeral loopback port.

    python -m bench.compose_up [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tests.docker_engine import ComposeStack, docker_engine
from voicepipe.healthcheck import wait_until_serving

SERVING_TIMEOUT_S = 300.0
STACKS = {
    "stubs": (("docker-compose.yml",), ()),
    "stubs, stt=3 llm=2 tts=2": (("docker-compose.yml",), ("stt=3", "llm=2", "tts=2")),
    "real engines": (("docker-compose.yml", "docker-compose.real.yml"), ()),
}


async def one_round(files: tuple[str, ...], scale: tuple[str, ...]) -> tuple[float, float]:
    """Seconds from `up` to SERVING, and for `down`."""
    stack = ComposeStack(files)
    try:
        started = time.monotonic()
        await asyncio.to_thread(stack.up, *scale)
        await wait_until_serving(stack.published("orchestrator", 50051), SERVING_TIMEOUT_S)
        up_s = time.monotonic() - started
    finally:
        stopping = time.monotonic()
        await asyncio.to_thread(stack.down)
        down_s = time.monotonic() - stopping
    return up_s, down_s


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| stack | `up` to SERVING, median (runs) | `down` |\n|---|---|---|")
    for name, (files, scale) in STACKS.items():
        runs = [await one_round(files, scale) for _ in range(args.rounds)]
        ups = ", ".join(f"{up:.1f}" for up, _ in runs)
        up_median = statistics.median(up for up, _ in runs)
        down_median = statistics.median(down for _, down in runs)
        print(f"| {name} | {up_median:.1f} s ({ups}) | {down_median:.1f} s |")


if __name__ == "__main__":
    with docker_engine():
        asyncio.run(main())
