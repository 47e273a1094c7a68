"""The engine: each Generate call is one streamed chat completion (`POST {base_url}/chat/completions`
with `stream: true`) through the official openai SDK, whose deltas go out as they arrive.

The HTTP link to the backend is where the system we replace failed ("connection reset by peer"):
a server closes a kept-alive connection just as the client reuses it, and the request fails with
nothing sent. So idle connections are dropped sooner than llama.cpp's server drops them (5 s),
and a request that failed before any response byte arrived is sent again at once on a new
connection: nothing was generated, so nothing is repeated. Any other failure is the
orchestrator's to retry (the SDK's own retries are off: two layers would multiply)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, cast

import grpc
import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from llm_openai.capacity import Capacity, SlotQueue, TokenCounter, ask_llama_cpp, fit_context, server_root
from llm_openai.errors import backend_error
from voice.v1 import common_pb2
from voicepipe.audio_format import InvalidInput
from voicepipe.config import FlagParser
from voicepipe.stage import StageError
from voicepipe.stage.llm import Finished, Generation, LanguageEngine, Message

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
# Idle connections kept for reuse this long: under llama.cpp's keep-alive (5 s), so the client
# drops a connection before the server does (it still may close one early: see STALE_ATTEMPTS).
KEEPALIVE_EXPIRY_S = 2.0
# Sends of a request whose connection closed before any response byte (the first and two more).
STALE_ATTEMPTS = 3


@dataclass(frozen=True)
class Endpoint:
    """Where the backend is and how long to wait for it. The key is never printed."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    connect_timeout_s: float
    read_timeout_s: float
    health_interval_s: float
    # Overrides of what the backend says of itself (0: ask it; see llm_openai.capacity).
    slots: int = 0
    context_tokens: int = 0
    max_waiting: int = 16


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


def closed_before_responding(error: BaseException) -> bool:
    """The backend closed the connection before any response byte: safe to send again."""
    return isinstance(error, openai.APIConnectionError) and isinstance(
        error.__cause__, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError
    )


class OpenAIEngine(LanguageEngine):
    """A LanguageEngine backed by an OpenAI-compatible server; one HTTP client for every call."""

    def __init__(self, endpoint: Endpoint, replies: ReplySettings) -> None:
        self.endpoint = endpoint
        self.replies = replies
        timeout = httpx2.Timeout(endpoint.read_timeout_s, connect=endpoint.connect_timeout_s)
        self._http = httpx2.AsyncClient(
            timeout=timeout, limits=httpx2.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        )
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            max_retries=0,
            timeout=openai.Timeout(endpoint.read_timeout_s, connect=endpoint.connect_timeout_s),
            http_client=self._http,
        )
        self.capacity = Capacity(endpoint.slots, endpoint.context_tokens)
        self._slots = SlotQueue(endpoint.slots, endpoint.max_waiting)
        self._auth = {"Authorization": f"Bearer {endpoint.api_key}"}
        self._tokens = TokenCounter(self._http, endpoint.base_url, self._auth)

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
        flags.add(
            "--backend-slots",
            type=int,
            default=0,
            help="replies the backend generates at once (0: llama.cpp's /props says; else no bound)",
        )
        flags.add(
            "--max-waiting",
            type=int,
            default=16,
            help="requests that may wait for a busy backend's slot; more get RESOURCE_EXHAUSTED",
        )
        flags.add(
            "--context-tokens",
            type=int,
            default=0,
            help="context of one conversation on the backend (0: llama.cpp's /props says; else no"
            " trimming); the history is trimmed to fit, oldest turns first",
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
            slots=args.backend_slots,
            context_tokens=args.context_tokens,
            max_waiting=args.max_waiting,
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

    async def _learn_capacity(self) -> None:
        """What the flags leave at 0, from the backend (llama.cpp's /props), once it answers."""
        if self.endpoint.slots and self.endpoint.context_tokens:
            return
        said = await ask_llama_cpp(self._http, self.endpoint.base_url, self._auth)
        self.capacity = Capacity(
            self.endpoint.slots or said.slots, self.endpoint.context_tokens or said.context_tokens
        )
        if self._slots.slots != self.capacity.slots and self._slots.waiting == 0:
            self._slots = SlotQueue(self.capacity.slots, self.endpoint.max_waiting)
        log.info(
            "backend capacity",
            extra={"slots": self.capacity.slots, "context_tokens": self.capacity.context_tokens},
        )

    async def warm_up(self) -> str | None:
        """One request with the system prompt per backend slot, all at once, so that every slot
        has evaluated (and caches) the prefix every conversation starts with before the first
        callers speak, however many speak at once; it also proves the key and the model name.
        Returns why it failed, or None."""
        warm = Generation((Message("user", "Hello"),), 1, 0.0, common_pb2.Correlation())
        started = time.monotonic()
        try:
            messages = await self.messages(warm, 1)  # counts tokens: the key is used already
        except (StageError, InvalidInput) as error:
            return str(error)
        async with asyncio.TaskGroup() as group:
            requests = [
                group.create_task(self._warm_one(messages, warm), name=f"warm-up-slot-{slot}")
                for slot in range(max(self.capacity.slots, 1))  # 0: a backend that does not say
            ]
        if failed := next((reason for task in requests if (reason := task.result())), None):
            return failed
        log.info("warmed up", extra={"s": round(time.monotonic() - started, 3), "slots": len(requests)})
        return None

    async def _warm_one(self, messages: list[ChatCompletionMessageParam], warm: Generation) -> str | None:
        try:
            async with contextlib.aclosing(self._stream(messages, warm, 1)) as deltas:
                async for _ in deltas:
                    pass
        except StageError as error:
            return str(error)
        return None

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    async def messages(self, generation: Generation, max_tokens: int) -> list[ChatCompletionMessageParam]:
        """The conversation as the chat API takes it: the default system prompt first when the
        conversation brings no system message of its own, the oldest turns cut when it would not
        fit one slot's context with `max_tokens` of reply."""
        conversation = list(generation.messages)
        if self.replies.system_prompt and all(m.role != "system" for m in conversation):
            conversation.insert(0, Message("system", self.replies.system_prompt))
        kept = await fit_context(conversation, self.capacity.context_tokens, max_tokens, self._tokens)
        if len(kept) < len(conversation):
            log.info("history trimmed", extra={"messages": len(conversation), "kept": len(kept)})
        return [
            cast(ChatCompletionMessageParam, {"role": message.role, "content": message.content})
            for message in kept
        ]

    async def _open_stream(
        self, messages: list[ChatCompletionMessageParam], max_tokens: int, temperature: float
    ) -> openai.AsyncStream[Any]:
        """The streamed completion, sent again (at once, on a new connection) while the backend
        closes the connection before answering."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(closed_before_responding),
            stop=stop_after_attempt(STALE_ATTEMPTS),
            reraise=True,
            before_sleep=lambda state: log.info(
                "backend closed the connection before answering; sending again",
                extra={"attempt": state.attempt_number},
            ),
        )
        async for attempt in retrying:
            with attempt:
                return await self._client.chat.completions.create(
                    model=self.endpoint.model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stream=True,
                    stream_options={"include_usage": True},
                )
        raise AssertionError("unreachable: tenacity reraises the last failure")

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        max_tokens = generation.max_tokens
        if self.replies.max_tokens:
            max_tokens = min(max_tokens, self.replies.max_tokens)
        messages = await self.messages(generation, max_tokens)
        async with (
            self._slots.slot(),
            contextlib.aclosing(self._stream(messages, generation, max_tokens)) as parts,
        ):
            async for part in parts:
                yield part

    async def _stream(
        self, messages: list[ChatCompletionMessageParam], generation: Generation, max_tokens: int
    ) -> AsyncGenerator[str | Finished, None]:
        temperature = generation.temperature or self.replies.temperature
        try:
            stream = await self._open_stream(messages, max_tokens, temperature)
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
            # Some servers end the stream this way when generation fails (a conversation
            # longer than their context, for example): not a finished reply.
            raise StageError(
                grpc.StatusCode.UNAVAILABLE,
                f"the language model backend at {self.endpoint.base_url} ended the stream without"
                " finishing the reply (no finish_reason); its log says why",
            )
        yield Finished(finish, prompt_tokens, completion_tokens)

    async def unreachable(self) -> str | None:
        """Why the backend is not ready, or None when it is: its `GET {base_url}/health`
        (llama.cpp, vLLM: 503 while the model loads), or the model list for a server without
        one. The check waits as long as a reply may take to start: a backend that is down
        refuses at once."""
        try:
            response = await self._http.get(f"{self.endpoint.base_url.rstrip('/')}/health")
        except httpx2.HTTPError as error:
            return f"the language model backend at {self.endpoint.base_url} is unreachable: {error}"
        if response.status_code == 404:  # no health endpoint: does it list its models?
            return await models_unreachable(self._client, self.endpoint.base_url)
        if response.status_code != 200:
            return (
                f"the language model backend's {server_root(self.endpoint.base_url)} health check"
                f" answered HTTP {response.status_code}: {response.text[:200]}"
            )
        return None

    async def health(self) -> AsyncGenerator[bool, None]:
        """True while the backend answers, False while it does not: checked every interval,
        yielded when it changes. Each time it comes up (first at start, before the stage
        reports SERVING), the stage learns its capacity and warms it up first; it is ready only
        once a request with its key and model name succeeds."""
        last: bool | None = None
        while True:
            reason = await self.unreachable()
            if reason is None and last is not True:
                await self._learn_capacity()
                reason = await self.warm_up()  # a refused key or an unknown model shows here
            if (up := reason is None) != last:
                if reason is not None:
                    log.warning("backend not ready", extra={"reason": reason})
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
