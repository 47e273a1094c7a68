"""The Whisper speech engine: faster-whisper (CTranslate2) behind the stage SDK's SpeechEngine.
One model per process, shared by every call; decodes and VAD run on worker threads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Self

import numpy as np

from stt_whisper.call import CallTranscriber, Shared
from stt_whisper.decoder import SAMPLE_RATE, ModelSettings, ModelUnavailable, WhisperDecoder
from stt_whisper.scheduler import DecodeQueue
from stt_whisper.turn_model import TurnEnd, TurnModel
from stt_whisper.vad import SileroModel
from voicepipe.audio_format import InvalidInput
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples
from voicepipe.stage.blocking import BlockingWorker
from voicepipe.stage.stt import Endpointing, SpeechEngine, SpeechEvent, TranscriptionSettings

# Decodes one call can have waiting at once: an interim, a final started when speech paused
# (maybe stale, until the decoder drops it), and a final.
_DECODES_PER_CALL = 3
# The calls the queues are sized for when the server has no session limit (--max-sessions 0).
_UNLIMITED_CALLS = 64


# People pause inside sentences: without the turn model, 400 ms of silence ends an utterance
# (BENCHMARKS.md measures 120, 250 and 400 ms on human speech, and the turn model against it).
FIXED_SILENCE_MS = 400
SPEECH_START_MS = 20


class WhisperEngine(SpeechEngine):
    def __init__(
        self, model: ModelSettings, max_calls: int, interim_interval_ms: int, turn_end: TurnEnd
    ) -> None:
        self.model = model
        self.max_calls = max_calls or _UNLIMITED_CALLS
        self.interim_interval_ms = interim_interval_ms
        self.turn_end = turn_end
        self.default_endpointing = Endpointing(FIXED_SILENCE_MS, SPEECH_START_MS)
        self._shared: Shared | None = None

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        ModelSettings.add_flags(flags)
        flags.add(
            "--interim-interval-ms",
            type=int,
            default=500,
            help="audio between interim decodes of a growing utterance (when the decoder is idle)",
        )
        TurnEnd.add_flags(flags)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        # --max-sessions is the server's (the SDK refuses calls beyond it); the queues fit it.
        return cls(
            ModelSettings.from_args(args),
            args.max_sessions,
            args.interim_interval_ms,
            TurnEnd.from_args(args),
        )

    async def start(self) -> None:
        decoder = await asyncio.to_thread(WhisperDecoder, self.model)
        # The first decode allocates the model's buffers: done here, not in a caller's final.
        await asyncio.to_thread(decoder.decode, np.zeros(SAMPLE_RATE, np.int16), decoder.languages[0])
        turn_model = None
        if (path := self.turn_end.model_path) is not None:
            if not path.is_file():
                raise ModelUnavailable(
                    f"--turn-model {path} is not a file: install it with python -m stt_whisper.turn_model"
                )
            turn_model = await asyncio.to_thread(TurnModel, path)
            # A client that leaves the silence to the stage gets the turn model's choice.
            self.default_endpointing = Endpointing(self.turn_end.incomplete_ms, SPEECH_START_MS)
        self._shared = Shared(
            decodes=DecodeQueue(decoder, self.model.workers, _DECODES_PER_CALL * self.max_calls),
            vad=await asyncio.to_thread(SileroModel),
            vad_runs=BlockingWorker("silero", workers=1, max_queued=self.max_calls),
            turn_model=turn_model,
            turn_end=self.turn_end,
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
    ) -> AsyncGenerator[SpeechEvent, None]:
        call = CallTranscriber(self._loaded(), settings, self.interim_interval_ms)
        async with contextlib.aclosing(call.events(audio)) as events:
            async for event in events:
                yield event

    def _loaded(self) -> Shared:
        if self._shared is None:
            raise RuntimeError("WhisperEngine.start() has not run")
        return self._shared
