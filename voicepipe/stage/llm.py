"""The language-model side of the stage SDK: `LanguageEngine` is what an engine implements,
`LanguageModelServicer` serves it as voice.v1.LanguageModelService.Generate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from voice.v1 import common_pb2
from voicepipe.stage import Engine

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

    def generate(self, generation: Generation) -> AsyncIterator[str | Finished]:
        """Yields text deltas as they are produced and may end with one `Finished`. Closing the
        iterator (the caller went away) must stop the generation. Raise StageError for failures
        a caller can act on."""
        raise NotImplementedError
