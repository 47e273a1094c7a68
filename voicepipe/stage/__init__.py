"""The stage SDK: everything a speech, language or voice engine needs to be served behind the
voice.v1 contracts. An engine implements one small interface (`stt.SpeechEngine`,
`llm.LanguageEngine`, `tts.VoiceEngine`); the base servicers own the stream protocol, validation,
correlation ids, metrics, ordering, cancellation and the stage's timing figures, and
`voicepipe.stage.main` serves it as `python -m <package>`."""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator
from typing import Self

import grpc

from voicepipe.config import FlagParser


class StageError(Exception):
    """A failure an engine reports to its caller as a gRPC status: raise it from engine code
    with the code a caller can act on (UNAVAILABLE, RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...)
    and a message that says what was wrong. Any other exception is a bug: INTERNAL."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Engine:
    """What every engine shares: its flags, its lifetime, and its health.

    `start()` runs once before the server reports SERVING (load a model there); `close()` once
    after the server has stopped. `health()` yields the engine's readiness whenever it changes
    (an engine that depends on a backend yields False while the backend is unreachable); the
    default is always ready."""

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        """Adds the engine's own flags (each gets a VOICEPIPE_<SERVICE>_<FLAG> variable)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls()

    async def start(self) -> None:
        """Loads what the engine needs; raising here stops the process with the error."""

    async def close(self) -> None:
        """Releases what start() acquired."""

    async def health(self) -> AsyncGenerator[bool, None]:
        """Readiness changes; the server's grpc.health.v1 status follows them."""
        yield True
