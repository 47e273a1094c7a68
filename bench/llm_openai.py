"""The LLM stage against its backend, side by side: time to first token and tokens per second
of the same requests sent straight to the backend (the openai SDK, streamed) and through the
stage (gRPC Generate, which adds one process hop and the SDK's stamping).

    python -m bench.llm_openai [--rounds 3] [--max-tokens 64] [--base-url URL --model NAME]

Without --base-url it starts the local backend (llama.cpp with SmolLM2-135M) on a free port.
The stage runs as `python -m llm_openai` on a free port in front of the same backend. Requests
are greedy (temperature 0), so both paths generate the same tokens; one at a time, the paths
taking turns, so that both see the same machine. Each figure is the median over every prompt and
round; the stage's added TTFT is the median difference of the same prompt in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import openai

from llm_openai import backend
from llm_openai.engine import DEFAULT_MODEL, NO_API_KEY, SPEECH_SYSTEM_PROMPT
from voice.v1 import language_model_pb2 as pb
from voice.v1 import language_model_pb2_grpc
from voicepipe.healthcheck import wait_until_serving
from voicepipe.keepalive import client_options
from voicepipe.processes import ServiceProcess, stage_args

if TYPE_CHECKING:
    from voice.v1.language_model_pb2_grpc import LanguageModelServiceAsyncStub as Stub

PROMPTS = (
    "What is the capital of France?",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "What is the weather usually like in London?",
    "How far away is the moon?",
)


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tokens: int
    stream_s: float  # first token to last
    reported_ttft_s: float = 0.0  # the stage's own figure (GenerationComplete), from its receipt

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.stream_s if self.tokens > 1 and self.stream_s > 0 else 0.0


class Clock:
    """Times one streamed reply: the first piece of text and the last."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first = self.last = 0.0
        self.tokens = 0

    def token(self) -> None:
        self.last = time.monotonic()
        if self.tokens == 0:
            self.first = self.last
        self.tokens += 1

    def sample(self, reported_ttft_s: float = 0.0) -> Sample:
        return Sample(self.first - self.start, self.tokens, self.last - self.first, reported_ttft_s)


async def direct(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    clock = Clock()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SPEECH_SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    async with stream:
        async for chunk in stream:
            if any(choice.delta.content for choice in chunk.choices):
                clock.token()
    return clock.sample()


async def through_stage(stub: Stub, prompt: str, max_tokens: int) -> Sample:
    clock = Clock()
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=prompt)],
        parameters=pb.GenerationParameters(max_tokens=max_tokens),
    )
    reported = 0.0
    async for response in stub.Generate(request, timeout=120):
        if response.HasField("delta"):
            clock.token()
        else:
            reported = response.complete.time_to_first_token.ToTimedelta().total_seconds()
    return clock.sample(reported)


@contextlib.contextmanager
def local_backend(base_url: str) -> Iterator[str]:
    """The given backend, or the local one started for the run."""
    if base_url:
        yield base_url
        return
    process = backend.start(0)
    try:
        yield backend.base_url(process)
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def stage(base_url: str, model: str) -> AsyncIterator[Stub]:
    process = await asyncio.to_thread(
        ServiceProcess, "llm_openai", stage_args(0, -1, "--base-url", base_url, "--model", model)
    )
    try:
        await wait_until_serving(process.target, 60)
        async with grpc.aio.insecure_channel(process.target, options=client_options()) as channel:
            stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
            yield stub
    finally:
        await asyncio.to_thread(process.stop)


def row(name: str, samples: list[Sample]) -> str:
    ttft = statistics.median(s.ttft_s for s in samples) * 1000
    p90 = statistics.quantiles([s.ttft_s for s in samples], n=10)[-1] * 1000 if len(samples) > 1 else ttft
    rate = statistics.median(s.tokens_per_s for s in samples)
    tokens = statistics.median(s.tokens for s in samples)
    return f"| {name} | {ttft:.0f} | {p90:.0f} | {rate:.1f} | {tokens:.0f} | {len(samples)} |"


async def run(args: argparse.Namespace) -> None:
    with local_backend(args.base_url) as url:
        client = openai.AsyncOpenAI(base_url=url, api_key=NO_API_KEY, max_retries=0)
        try:
            async with stage(url, args.model) as stub:
                await direct(client, args.model, PROMPTS[0], 4)  # warm-up: both paths connected
                await through_stage(stub, PROMPTS[0], 4)
                direct_samples: list[Sample] = []
                stage_samples: list[Sample] = []
                for round_index in range(args.rounds):
                    # Each path sends every prompt in turn, the paths alternating which goes first:
                    # no request follows one with the same prompt, whose prefix the backend would
                    # still hold in its cache.
                    for use_direct in (round_index % 2 == 0, round_index % 2 == 1):
                        for prompt in PROMPTS:
                            if use_direct:
                                direct_samples.append(
                                    await direct(client, args.model, prompt, args.max_tokens)
                                )
                            else:
                                stage_samples.append(await through_stage(stub, prompt, args.max_tokens))
        finally:
            await client.close()
    added = [s.ttft_s - d.ttft_s for s, d in zip(stage_samples, direct_samples, strict=True)]
    print(f"backend {url}, model {args.model}, max_tokens {args.max_tokens}, {args.rounds} rounds")
    print("| path | TTFT p50 ms | TTFT p90 ms | tokens/s p50 | tokens p50 | replies |")
    print("|---|---|---|---|---|---|")
    print(row("direct to the backend (openai SDK)", direct_samples))
    print(row("through the stage (gRPC Generate)", stage_samples))
    hop = [s.ttft_s - s.reported_ttft_s for s in stage_samples]
    print(f"TTFT added by the stage, median of paired differences: {statistics.median(added) * 1000:.1f} ms")
    print(f"  of which the gRPC hop (client TTFT - the stage's own): {statistics.median(hop) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_openai", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="times each prompt is sent by each path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--base-url", default="", help="an OpenAI-compatible backend (default: start the local one)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
