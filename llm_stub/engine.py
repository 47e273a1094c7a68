"""The LLM stub's engine: the deterministic reply of `stubs.replies`, token by token, paced by
the latency profile."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from stubs import replies
from stubs.latency import LatencyProfile, ProfiledEngine, sleep_until
from voicepipe.stage.llm import Finished, Generation, LanguageEngine


class TokenPacer:
    """When each token is due: the first after `first_token_ms`, then `tokens_per_second`.
    Due times are measured from the request so that sleeping late never accumulates drift."""

    def __init__(self, profile: LatencyProfile, received: float) -> None:
        self._first = received + profile.llm_first_token_ms / 1000
        self._interval = 1 / profile.llm_tokens_per_second if profile.llm_tokens_per_second > 0 else 0.0

    async def wait_for(self, index: int) -> None:
        await sleep_until(self._first + index * self._interval)


class StubLanguageEngine(ProfiledEngine, LanguageEngine):
    role = "llm"

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        pacer = TokenPacer(self.profile, time.monotonic())
        tokens = replies.tokenize(replies.reply(generation.messages))
        for index, token in enumerate(tokens[: generation.max_tokens]):
            await pacer.wait_for(index)
            yield token
        yield Finished("length" if len(tokens) > generation.max_tokens else "stop")
