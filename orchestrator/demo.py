"""`make demo`: the local stack with the realistic latency profile, and a spoken three-turn
conversation through it, in real time, including a barge-in. Prints the transcripts and the
latency table, writes the reply audio to out/demo/, then stops the stack."""

from __future__ import annotations

import asyncio
import sys

from orchestrator.stack import start_stack
from voicepipe_client.cli import converse, parse_args

SCRIPT = [
    "--say", "Hello, my name is Ada.",
    "--say", "Please tell me a story.",
    # Spoken over the story once the caller has heard a second of it: the agent stops.
    "--barge-in", "What is my name?",
]  # fmt: skip


async def demo() -> int:
    print("starting the local stack (realistic latency profile)...", file=sys.stderr, flush=True)
    stack = await start_stack("realistic", ephemeral=True)
    try:
        assert stack.orchestrator is not None
        args = parse_args(["--target", stack.orchestrator.target, "--out-dir", "out/demo", *SCRIPT])
        return await converse(args)
    finally:
        stack.stop()


def main() -> None:
    raise SystemExit(asyncio.run(demo()))


if __name__ == "__main__":
    main()
