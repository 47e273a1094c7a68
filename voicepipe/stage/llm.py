"""The language-model side of the stage SDK: `LanguageEngine` is what an engine implements,
`LanguageModelServicer` serves it as voice.v1.LanguageModelService.Generate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Literal

import grpc

from voice.v1 import common_pb2, language_model_pb2, language_model_pb2_grpc
from voicepipe import durations
from voicepipe.audio_format import InvalidInput
from voicepipe.logs import bind_correlation
from voicepipe.stage import Engine
from voicepipe.stage.protocol import STAGE_FIGURE_SECONDS, SessionLimit, accept, reject

log = logging.getLogger(__name__)


Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Generation:
    """A validated GenerateRequest: the conversation (oldest first, ending with a user message),
    the token budget (the contract's default applied) and the temperature."""

    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float
    correlation: common_pb2.Correlation


@dataclass(frozen=True)
class Finished:
    """The engine's last word on a generation. `finish_reason` is "stop" or "length"; token
    counts the engine does not know are left None and the SDK counts words instead."""

    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class LanguageEngine(Engine):
    """A language model. One instance per process, shared by every call."""

    def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        """Yields text deltas as they are produced and may end with one `Finished`. Closing the
        iterator (the caller went away) must stop the generation. Raise StageError for failures
        a caller can act on."""
        raise NotImplementedError


# --- serving a LanguageEngine ----------------------------------------------------------------

pb = language_model_pb2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModelService"].full_name
GenerateContext = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]

# Limits from the contract (language_model.proto) and what keeps one request reasonable.
MAX_MESSAGES = 1000
MAX_MESSAGE_CHARS = 16_384
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 512
MAX_TEMPERATURE = 2.0

_ROLES: dict[int, Role] = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_KNOWN_ROLES = "ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"
_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def _role_name(role: int) -> str:
    known = role in pb.Role.values()
    return pb.Role.Name(role) if known else str(role)  # type: ignore[arg-type]


def parse_request(request: pb.GenerateRequest) -> Generation:
    """Validates a request; raises InvalidInput naming the problem: no messages, too many, an
    unknown role, an oversized message, a conversation not ending with the user, parameters out
    of range."""
    count = len(request.messages)
    if count == 0:
        raise InvalidInput("messages is empty; send at least one ROLE_USER message")
    if count > MAX_MESSAGES:
        raise InvalidInput(f"{count} messages exceed the limit of {MAX_MESSAGES} messages")
    messages = []
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidInput(
                f"messages[{index}].role {_role_name(message.role)} is not a valid role; use {_KNOWN_ROLES}"
            )
        if len(message.content) > MAX_MESSAGE_CHARS:
            raise InvalidInput(
                f"messages[{index}].content has {len(message.content)} characters, more than the"
                f" limit of {MAX_MESSAGE_CHARS}"
            )
        messages.append(Message(role, message.content))
    if messages[-1].role != "user":
        raise InvalidInput(
            f"the last message (messages[{count - 1}]) has role {_role_name(request.messages[-1].role)};"
            " the conversation must end with a ROLE_USER message"
        )
    parameters = request.parameters
    if parameters.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidInput(
            f"parameters.max_tokens {parameters.max_tokens} exceeds the limit of {MAX_TOKENS_LIMIT}"
        )
    temperature = parameters.temperature
    if math.isnan(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidInput(
            f"parameters.temperature {temperature:g} is out of range; use 0.0 to {MAX_TEMPERATURE:g}"
        )
    return Generation(
        messages=tuple(messages),
        max_tokens=parameters.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=temperature,
        correlation=request.correlation,
    )


def count_words(text: str) -> int:
    """Tokens counted as whitespace-separated words, for engines that do not count their own."""
    return len(text.split())


class LanguageModelServicer(language_model_pb2_grpc.LanguageModelServiceServicer):
    """Serves a LanguageEngine as LanguageModelService.Generate: stamps each delta with the time
    since the request arrived and closes the stream with GenerationComplete."""

    def __init__(self, engine: LanguageEngine, sessions: SessionLimit) -> None:
        self._engine = engine
        self._sessions = sessions

    async def Generate(
        self, request: pb.GenerateRequest, context: GenerateContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received = time.monotonic()
        # grpc.aio runs each call in its own task, so these ids stay with this call's log lines.
        bind_correlation(request.correlation.session_id, request.correlation.turn_id)
        try:
            generation = parse_request(request)
            with self._sessions.hold():
                await accept(context)
                async with contextlib.aclosing(self._generate(generation, received)) as responses:
                    async for response in responses:
                        yield response
        except Exception as error:
            await reject(error, context)

    async def _generate(
        self, generation: Generation, received: float
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        correlation = generation.correlation
        first_token_s = last_token_s = 0.0
        sent = 0
        text: list[str] = []
        # Like "transcription started" and "synthesis started": which replica took the turn.
        log.info("generation started", extra={"messages": len(generation.messages)})
        finished = Finished()
        try:
            deltas = self._engine.generate(generation)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if isinstance(delta, Finished):
                        finished = delta
                        continue
                    last_token_s = time.monotonic() - received
                    if sent == 0:
                        first_token_s = last_token_s
                        STAGE_FIGURE_SECONDS.labels("llm_time_to_first_token").observe(first_token_s)
                    yield pb.GenerateResponse(
                        delta=pb.TextDelta(text=delta, elapsed=durations.from_seconds(last_token_s)),
                        correlation=correlation,
                    )
                    text.append(delta)
                    sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: the engine's generator is closed, which stops the generation.
            log.info("generation cancelled", extra={"completion_tokens": sent})
            raise
        reply = "".join(text)
        completion_tokens = finished.completion_tokens if finished.completion_tokens is not None else sent
        prompt_tokens = (
            finished.prompt_tokens
            if finished.prompt_tokens is not None
            else sum(count_words(m.content) for m in generation.messages)
        )
        log.info(
            "generated",
            extra={
                "reply_chars": len(reply),
                "completion_tokens": completion_tokens,
                "finish_reason": finished.finish_reason,
                "ttft_ms": round(first_token_s * 1000, 1),
                "total_ms": round(last_token_s * 1000, 1),
            },
        )
        yield pb.GenerateResponse(
            complete=pb.GenerationComplete(
                finish_reason=_FINISH_REASONS[finished.finish_reason],
                usage=pb.TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                time_to_first_token=durations.from_seconds(first_token_s),
                total_time=durations.from_seconds(last_token_s),
            ),
            correlation=correlation,
        )
