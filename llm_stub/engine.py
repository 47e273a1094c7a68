"""The LLM stub's engine: the deterministic reply of `stubs.replies`, token by token, paced by
the latency profile; with a temperature above 0 it varies its reply by attempt, as a sampling
model's regeneration would (see `stubs.replies`)."""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import AsyncGenerator
from typing import Self

from stubs import replies
from stubs.latency import LatencyProfile, ProfiledEngine, sleep_until
from stubs.latency import from_args as profile_from_args
from voicepipe.config import FlagParser
from voicepipe.stage.llm import Finished, Generation, LanguageEngine, Message

# Requests whose calls are counted for sampling, most recent kept: more than the turns in flight.
MAX_COUNTED_REQUESTS = 4096

RequestKey = tuple[str, str, tuple[Message, ...]]


class TokenPacer:
    """When each token is due: the first after `first_token_ms`, then `tokens_per_second`.
    Due times are measured from the request so that sleeping late never accumulates drift."""

    def __init__(self, profile: LatencyProfile, received: float) -> None:
        self._first = received + profile.llm_first_token_ms / 1000
        self._interval = 1 / profile.llm_tokens_per_second if profile.llm_tokens_per_second > 0 else 0.0

    async def wait_for(self, index: int) -> None:
        await sleep_until(self._first + index * self._interval)


class CallCounter:
    """How many times each request has been made (the attempt a call is), for the most recent
    MAX_COUNTED_REQUESTS requests."""

    def __init__(self) -> None:
        self._counts: collections.OrderedDict[RequestKey, int] = collections.OrderedDict()

    def attempt(self, generation: Generation) -> int:
        correlation = generation.correlation
        key = (correlation.session_id, correlation.turn_id, generation.messages)
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        if len(self._counts) > MAX_COUNTED_REQUESTS:
            self._counts.popitem(last=False)
        return count


class StubLanguageEngine(ProfiledEngine, LanguageEngine):
    role = "llm"

    def __init__(self, profile: LatencyProfile, temperature: float = 0.0) -> None:
        super().__init__(profile)
        self.temperature = temperature
        self._calls = CallCounter()

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        super().add_flags(flags)
        flags.add(
            "--temperature",
            type=float,
            default=0.0,
            help="temperature for requests that leave it at 0 (above 0: a regeneration differs)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(profile_from_args(args, cls.role), args.temperature)

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        pacer = TokenPacer(self.profile, time.monotonic())
        reply = replies.reply(generation.messages)
        if (generation.temperature or self.temperature) > 0:
            reply = replies.sampled(reply, self._calls.attempt(generation))
        tokens = replies.tokenize(reply)
        for index, token in enumerate(tokens[: generation.max_tokens]):
            await pacer.wait_for(index)
            yield token
        yield Finished("length" if len(tokens) > generation.max_tokens else "stop")
