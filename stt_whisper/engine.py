"""The Whisper speech engine: faster-whisper (CTranslate2) behind the stage SDK's SpeechEngine.
One model per process, shared by every call; decodes and VAD run on worker threads."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Self

import grpc

from stt_whisper.call import CallTranscriber, Shared
from stt_whisper.decoder import SAMPLE_RATE, ModelSettings, WhisperDecoder
from stt_whisper.scheduler import DecodeQueue
from stt_whisper.vad import SileroModel
from voicepipe.audio_format import InvalidInput
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples
from voicepipe.stage import StageError
from voicepipe.stage.blocking import BlockingWorker
from voicepipe.stage.stt import SpeechEngine, SpeechEvent, TranscriptionSettings

# Decodes one call can have admitted at once: an interim, a final started when speech paused
# (maybe stale), and a final.
_DECODES_PER_CALL = 3


class WhisperEngine(SpeechEngine):
    def __init__(self, model: ModelSettings, max_sessions: int, interim_interval_ms: int) -> None:
        self.model = model
        self.max_sessions = max_sessions
        self.interim_interval_ms = interim_interval_ms
        self._shared: Shared | None = None
        self._sessions = 0

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        ModelSettings.add_flags(flags)
        flags.add(
            "--max-sessions",
            type=int,
            default=16,
            help="concurrent Transcribe calls; more are refused with RESOURCE_EXHAUSTED",
        )
        flags.add(
            "--interim-interval-ms",
            type=int,
            default=500,
            help="audio between interim decodes of a growing utterance (when the decoder is idle)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(ModelSettings.from_args(args), args.max_sessions, args.interim_interval_ms)

    async def start(self) -> None:
        decoder = await asyncio.to_thread(WhisperDecoder, self.model)
        self._shared = Shared(
            decodes=DecodeQueue(decoder, self.model.workers, _DECODES_PER_CALL * self.max_sessions),
            vad=await asyncio.to_thread(SileroModel),
            vad_runs=BlockingWorker("silero", workers=1, max_queued=self.max_sessions),
        )

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.decodes.close()
            self._shared.vad_runs.close()

    @property
    def languages(self) -> list[str]:
        return self._loaded().decodes.decoder.languages

    def sample_rate(self, settings: TranscriptionSettings) -> int:
        return SAMPLE_RATE

    def check(self, settings: TranscriptionSettings) -> None:
        language = settings.language_code.split("-")[0].lower()
        if language not in self.languages:
            raise InvalidInput(
                f"language_code {settings.language_code!r} is not supported by model {self.model.model}"
                f"; it recognises: {', '.join(self.languages)}"
            )

    async def transcribe(
        self, settings: TranscriptionSettings, audio: AsyncIterator[Samples]
    ) -> AsyncIterator[SpeechEvent]:
        shared = self._loaded()
        if self._sessions >= self.max_sessions:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this speech stage is at its limit of {self.max_sessions} concurrent calls; retry later",
            )
        self._sessions += 1
        try:
            async for event in CallTranscriber(shared, settings, self.interim_interval_ms).events(audio):
                yield event
        finally:
            self._sessions -= 1

    def _loaded(self) -> Shared:
        if self._shared is None:
            raise RuntimeError("WhisperEngine.start() has not run")
        return self._shared
