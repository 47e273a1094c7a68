"""A language engine of a few lines that proves the stage SDK: it answers with the user's last
message, word by word, `--word-delay` seconds apart. `python -m tests.echo_engine` serves it with
every runtime behaviour (the runtime suite and grpcurl tests run against it), the stubs' fault
knobs given from outside."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncGenerator
from typing import Self

from stubs.faults import FAULT_KNOBS
from voicepipe.config import FlagParser
from voicepipe.stage.llm import Finished, Generation, LanguageEngine
from voicepipe.stage.main import StageSpec


class EchoEngine(LanguageEngine):
    def __init__(self, word_delay_s: float) -> None:
        self.word_delay_s = word_delay_s

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        flags.add("--word-delay", type=float, default=0.0, help="seconds before each word")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(args.word_delay)

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        words = generation.messages[-1].content.split()
        for word in words[: generation.max_tokens]:
            await asyncio.sleep(self.word_delay_s)
            yield word + " "
        yield Finished("length" if len(words) > generation.max_tokens else "stop")


SPEC = StageSpec(
    EchoEngine, module="tests.echo_engine", role="llm", description="Echo.", extensions=(FAULT_KNOBS,)
)

if __name__ == "__main__":
    SPEC.run()
