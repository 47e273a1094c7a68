"""The engine: each Generate call is one streamed chat completion (`POST {base_url}/chat/completions`
with `stream: true`) through the official openai SDK, whose deltas go out as they arrive. The
SDK's own retries are off: the orchestrator retries a Generate call that failed before its
first token, and two layers of retries would multiply."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self, cast

import grpc
import openai
from openai.types.chat import ChatCompletionMessageParam

from llm_openai.errors import backend_error
from voicepipe.config import FlagParser
from voicepipe.stage import StageError
from voicepipe.stage.llm import Finished, Generation, LanguageEngine

log = logging.getLogger(__name__)
# The HTTP client logs every request at info: a line per health check. Its warnings stay.
logging.getLogger("httpx2").setLevel(logging.WARNING)

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the alias the local backend serves its model under
# Read from the environment only: a flag's value would show in `ps` and in --help.
API_KEY_VARIABLES = ("VOICEPIPE_LLM_API_KEY", "OPENAI_API_KEY")
# Servers without authentication (llama.cpp, vLLM, Ollama by default) accept any key.
NO_API_KEY = "none"

SPEECH_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Everything you write is read aloud by a speech"
    " synthesizer, so answer in short, plain spoken sentences, usually one to three. Never use"
    " markdown, lists, headings, code, emoji or symbols; write numbers and abbreviations the way"
    " they are said. Answer in English unless the user speaks another language; then answer in"
    " theirs."
)


@dataclass(frozen=True)
class Endpoint:
    """Where the backend is and how long to wait for it. The key is never printed."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    connect_timeout_s: float
    read_timeout_s: float
    health_interval_s: float


@dataclass(frozen=True)
class ReplySettings:
    """What the stage adds to every request: the system prompt used when the conversation has
    none, the temperature used when the request leaves it at 0 (proto3 cannot tell unset from
    0), and a cap on the reply's length (0: the request's budget)."""

    system_prompt: str
    temperature: float
    max_tokens: int


def read_api_key(key_file: str) -> str:
    """The API key: the file's content when a file is given, else the environment."""
    if key_file:
        return Path(key_file).read_text(encoding="utf-8").strip()
    for variable in API_KEY_VARIABLES:
        if key := os.environ.get(variable, ""):
            return key
    return NO_API_KEY


class OpenAIEngine(LanguageEngine):
    """A LanguageEngine backed by an OpenAI-compatible server; one HTTP client for every call."""

    def __init__(self, endpoint: Endpoint, replies: ReplySettings) -> None:
        self.endpoint = endpoint
        self.replies = replies
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            max_retries=0,
            timeout=openai.Timeout(endpoint.read_timeout_s, connect=endpoint.connect_timeout_s),
        )

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        flags.add("--base-url", type=str, default=DEFAULT_BASE_URL, help="the backend's OpenAI API root")
        flags.add("--model", type=str, default=DEFAULT_MODEL, help="model name sent to the backend")
        flags.add(
            "--api-key-file",
            type=str,
            default="",
            help=f"file holding the API key (else {' or '.join(API_KEY_VARIABLES)}; never logged)",
        )
        flags.add(
            "--system-prompt",
            type=str,
            default=SPEECH_SYSTEM_PROMPT,
            help="system message added when the conversation has none ('' for none)",
        )
        flags.add(
            "--temperature",
            type=float,
            default=0.0,
            help="temperature for requests that leave it at 0 (0: greedy, so a regenerated reply repeats)",
        )
        flags.add("--max-tokens", type=int, default=0, help="cap on a reply's tokens (0: the request's)")
        flags.add("--connect-timeout", type=float, default=2.0, help="seconds to connect to the backend")
        flags.add(
            "--read-timeout",
            type=float,
            default=30.0,
            help="seconds the backend may take to send the first token, or between two chunks",
        )
        flags.add(
            "--health-interval",
            type=float,
            default=1.0,
            help="seconds between backend checks",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        endpoint = Endpoint(
            base_url=args.base_url,
            model=args.model,
            api_key=read_api_key(args.api_key_file),
            connect_timeout_s=args.connect_timeout,
            read_timeout_s=args.read_timeout,
            health_interval_s=args.health_interval,
        )
        return cls(endpoint, ReplySettings(args.system_prompt, args.temperature, args.max_tokens))

    async def start(self) -> None:
        log.info(
            "language model backend",
            extra={
                "base_url": self.endpoint.base_url,
                "model": self.endpoint.model,
                "api_key_set": self.endpoint.api_key != NO_API_KEY,
            },
        )

    async def close(self) -> None:
        await self._client.close()

    def messages(self, generation: Generation) -> list[ChatCompletionMessageParam]:
        """The conversation as the chat API takes it, the default system prompt first when the
        conversation brings no system message of its own."""
        messages: list[ChatCompletionMessageParam] = []
        if self.replies.system_prompt and all(m.role != "system" for m in generation.messages):
            messages.append({"role": "system", "content": self.replies.system_prompt})
        for message in generation.messages:
            messages.append(
                cast(ChatCompletionMessageParam, {"role": message.role, "content": message.content})
            )
        return messages

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        max_tokens = generation.max_tokens
        if self.replies.max_tokens:
            max_tokens = min(max_tokens, self.replies.max_tokens)
        try:
            stream = await self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=self.messages(generation),
                max_tokens=max_tokens,
                temperature=generation.temperature or self.replies.temperature,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.OpenAIError as error:
            raise backend_error(error, self.endpoint.base_url) from None
        finish: Literal["stop", "length"] | None = None
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        try:
            async for chunk in stream:
                if chunk.usage is not None:  # the last chunk, when the server counts
                    prompt_tokens = chunk.usage.prompt_tokens
                    completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason is not None:
                        finish = "length" if choice.finish_reason == "length" else "stop"
        except openai.OpenAIError as error:
            raise backend_error(error, self.endpoint.base_url) from None
        finally:
            # Also when the caller went away: closing the response closes the HTTP stream,
            # which is how the backend learns to stop generating.
            await stream.close()
        if finish is None:
            # llama-cpp-python, for one, ends the stream this way when generation fails (a
            # conversation longer than its context, for example): not a finished reply.
            raise StageError(
                grpc.StatusCode.UNAVAILABLE,
                f"the language model backend at {self.endpoint.base_url} ended the stream without"
                " finishing the reply (no finish_reason); its log says why",
            )
        yield Finished(finish, prompt_tokens, completion_tokens)

    async def unreachable(self) -> str | None:
        """Why the backend does not answer, or None when it does. A backend busy generating may
        answer late (llama-cpp-python serves /models only between generations), so the check
        waits as long as a reply may take to start: a backend that is down refuses at once."""
        return await models_unreachable(self._client, self.endpoint.base_url)

    async def health(self) -> AsyncGenerator[bool, None]:
        """True while the backend answers, False while it does not: checked every interval,
        yielded when it changes."""
        last: bool | None = None
        while True:
            reason = await self.unreachable()
            if (up := reason is None) != last:
                if reason is not None:
                    log.warning("backend not answering", extra={"reason": reason})
                last = up
                yield up
            await asyncio.sleep(self.endpoint.health_interval_s)


async def models_unreachable(client: openai.AsyncOpenAI, base_url: str) -> str | None:
    """Why GET {base_url}/models fails within the client's timeouts (no key in the reason), or
    None when the backend answers."""
    try:
        await client.models.list()
    except openai.OpenAIError as error:
        return backend_error(error, base_url).message
    return None
