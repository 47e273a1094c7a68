"""Checks a GenerateRequest against the contract; every problem is named in the message that
goes back to the client with INVALID_ARGUMENT."""

from __future__ import annotations

import math

from stubs.replies import Message, Speaker
from voice.v1 import language_model_pb2

MAX_MESSAGES = 1000
MAX_MESSAGE_CHARS = 16_384
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 512
MAX_TEMPERATURE = 2.0

_SPEAKERS = {
    language_model_pb2.ROLE_SYSTEM: Speaker.SYSTEM,
    language_model_pb2.ROLE_USER: Speaker.USER,
    language_model_pb2.ROLE_ASSISTANT: Speaker.ASSISTANT,
}
_KNOWN_ROLES = "ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"


class InvalidRequest(ValueError):
    """A request that breaks the contract; answered with INVALID_ARGUMENT."""


def _role_name(role: int) -> str:
    known = role in language_model_pb2.Role.values()
    return language_model_pb2.Role.Name(role) if known else str(role)  # type: ignore[arg-type]


def conversation(request: language_model_pb2.GenerateRequest) -> list[Message]:
    """The request's messages, checked: at least one, at most MAX_MESSAGES, each with a known
    role and at most MAX_MESSAGE_CHARS characters, the last one from the user."""
    count = len(request.messages)
    if count == 0:
        raise InvalidRequest("messages is empty; send at least one ROLE_USER message")
    if count > MAX_MESSAGES:
        raise InvalidRequest(f"{count} messages exceed the limit of {MAX_MESSAGES} messages")
    messages = []
    for index, message in enumerate(request.messages):
        speaker = _SPEAKERS.get(message.role)
        if speaker is None:
            raise InvalidRequest(
                f"messages[{index}].role {_role_name(message.role)} is not a valid role; use {_KNOWN_ROLES}"
            )
        if len(message.content) > MAX_MESSAGE_CHARS:
            raise InvalidRequest(
                f"messages[{index}].content has {len(message.content)} characters, more than the"
                f" limit of {MAX_MESSAGE_CHARS}"
            )
        messages.append(Message(speaker, message.content))
    if messages[-1].speaker is not Speaker.USER:
        last = request.messages[-1]
        raise InvalidRequest(
            f"the last message (messages[{count - 1}]) has role {_role_name(last.role)};"
            " the conversation must end with a ROLE_USER message"
        )
    return messages


def max_tokens(parameters: language_model_pb2.GenerationParameters) -> int:
    """The token budget: max_tokens, 0 meaning DEFAULT_MAX_TOKENS, at most MAX_TOKENS_LIMIT."""
    if parameters.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidRequest(
            f"parameters.max_tokens {parameters.max_tokens} exceeds the limit of {MAX_TOKENS_LIMIT}"
        )
    return parameters.max_tokens or DEFAULT_MAX_TOKENS


def check_temperature(parameters: language_model_pb2.GenerationParameters) -> None:
    """Replies are deterministic whatever the temperature, but it must be in range."""
    temperature = parameters.temperature
    if math.isnan(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"parameters.temperature {temperature:g} is out of range; use 0.0 to {MAX_TEMPERATURE:g}"
        )
