"""`make demo`: a spoken three-turn conversation through the local stack, in real time, one turn
interrupted by a barge-in. Prints the transcripts, replies and the per-turn latency table, writes
the reply audio to out/demo/, then stops the stack.

By default the stack is real: Whisper hears, the local language model answers and the Piper
neural voice speaks; the caller is espeak-ng. `--stubs` (`make demo-stubs`) runs the
stub stack with the realistic latency profile instead: fast and deterministic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from voicepipe.engines import STUBS
from voicepipe_tools.client import converse, parse_args
from voicepipe_tools.stack import start_stack

REAL = {"stt": "whisper", "llm": "openai", "tts": "piper"}
# The caller speaks with a British voice (received pronunciation, which tiny.en hears best of
# espeak's English voices); the agent answers with the Piper voice (tts_piper).
REAL_SCRIPT = [
    "--speaker", "espeak:en-gb-x-rp",
    "--say", "Hello, my name is Sam.",
    "--say", "Please tell me a story about a robot.",
    # Spoken over the story once the caller has heard a second of it: the agent stops.
    "--barge-in", "What is my name?",
]  # fmt: skip
STUB_SCRIPT = [
    "--say", "Hello, my name is Ada.",
    "--say", "Please tell me a story.",
    "--barge-in", "What is my name?",
]  # fmt: skip


async def demo(stubs: bool) -> int:
    what = "stub stack (realistic latency profile)" if stubs else "real stack (Whisper, local LLM, Piper)"
    print(f"starting the {what}...", file=sys.stderr, flush=True)
    stack = await start_stack("realistic", ephemeral=True, engines=STUBS if stubs else REAL)
    try:
        assert stack.orchestrator is not None
        script = STUB_SCRIPT if stubs else REAL_SCRIPT
        args = parse_args(["--target", stack.orchestrator.target, "--out-dir", "out/demo", *script])
        return await converse(args)
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m voicepipe_tools.demo", description=__doc__)
    parser.add_argument("--stubs", action="store_true", help="the stub stack instead of the real engines")
    raise SystemExit(asyncio.run(demo(parser.parse_args().stubs)))


if __name__ == "__main__":
    main()
