"""The espeak-ng voice engine: every library call runs on one worker thread (libespeak-ng keeps
global state and is not thread-safe), one segment at a time, and its audio streams out of the
synthesis callback as espeak produces it."""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator
from typing import Self

from voicepipe.config import FlagParser
from voicepipe.pcm import Samples
from voicepipe.stage.alignment import Mark, WordAligner
from voicepipe.stage.blocking import BlockingWorker, Emitter
from voicepipe.stage.espeak_voices import VoiceCatalogue
from voicepipe.stage.libespeak import Espeak, Parameter
from voicepipe.stage.normalize import NormalizedText, normalize
from voicepipe.stage.tts import Segment, SpeechAudio, SynthesisSettings, VoiceEngine, VoiceList

RATE_WPM = (80, 450)
PITCH = (0, 100)


def _in_range(low: int, high: int, what: str) -> type[int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} {value} is out of range; use {low} to {high}")
        return value

    return parse  # type: ignore[return-value]


class EspeakEngine(VoiceEngine):
    """Speaks with libespeak-ng. `voice` is the default for calls that name none."""

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50) -> None:
        self.default_voice = voice
        self.rate_wpm = rate_wpm
        self.pitch = pitch
        # Segments wait their turn for the one thread; beyond this many waiting, RESOURCE_EXHAUSTED.
        self._worker = BlockingWorker("espeak", workers=1, max_queued=64)
        self._espeak: Espeak | None = None
        self._catalogue: VoiceCatalogue | None = None
        self._selected = ""  # the espeak voice the library has selected

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        flags.add("--voice", type=str, default="en-us", help="voice for calls whose config names none")
        flags.add(
            "--rate", type=_in_range(*RATE_WPM, "--rate"), default=175, help="speaking rate, words per minute"
        )
        flags.add("--pitch", type=_in_range(*PITCH, "--pitch"), default=50, help="base pitch, 0 to 100")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(voice=args.voice, rate_wpm=args.rate, pitch=args.pitch)

    async def start(self) -> None:
        self._espeak = espeak = await self._worker.run(Espeak)
        self._catalogue = VoiceCatalogue(await self._worker.run(espeak.voices), espeak.variants())
        self._catalogue.resolve(self.default_voice)  # a bad --voice stops the process here

    async def close(self) -> None:
        if self._espeak is not None:
            await self._worker.run(self._espeak.close)
        self._worker.close()

    def sample_rate(self, settings: SynthesisSettings) -> int:
        return self._library.sample_rate

    def check(self, settings: SynthesisSettings) -> None:
        self._voices.resolve(settings.voice or self.default_voice)

    async def list_voices(self) -> VoiceList:
        return self._voices.listing()

    async def synthesize(
        self, settings: SynthesisSettings, segment: Segment
    ) -> AsyncGenerator[SpeechAudio, None]:
        voice = self._voices.resolve(settings.voice or self.default_voice)
        text = normalize(segment.text)

        def speak(emitter: Emitter[SpeechAudio]) -> None:
            self._speak(voice, text, emitter)

        async for piece in self._worker.stream(speak):
            yield piece

    def _speak(self, voice: str, text: NormalizedText, emitter: Emitter[SpeechAudio]) -> None:
        """On the worker thread: the whole segment, piece by piece, until done or the consumer goes."""
        espeak = self._library
        aligner = WordAligner(text, emitter.emit)
        if text.speakable:
            if voice != self._selected:
                espeak.set_voice(voice)
                self._selected = voice
                # Selecting a voice resets the speech parameters to the voice's own.
                espeak.set_parameter(Parameter.RATE, self.rate_wpm)
                espeak.set_parameter(Parameter.PITCH, self.pitch)

            def sink(samples: Samples, marks: list[Mark]) -> bool:
                aligner.on_audio(samples, marks)
                return emitter.cancelled

            espeak.synth(text.text, sink)
        if not emitter.cancelled:
            aligner.finish()

    @property
    def _library(self) -> Espeak:
        if self._espeak is None:
            raise RuntimeError("EspeakEngine.start() has not run")
        return self._espeak

    @property
    def _voices(self) -> VoiceCatalogue:
        if self._catalogue is None:
            raise RuntimeError("EspeakEngine.start() has not run")
        return self._catalogue
