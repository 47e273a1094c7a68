"""A caller's voice for clients, tests and the demo: phrases spoken by espeak-ng in-process, at
any rate, as the client library's `Speaker` (text, rate) -> samples. Call it before a
conversation starts, not on its event loop: a sentence takes espeak some milliseconds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voicepipe.pcm import Resampler, Samples
from voicepipe.stage.alignment import Mark
from voicepipe.stage.espeak_voices import VoiceCatalogue
from voicepipe.stage.libespeak import Espeak
from voicepipe.stage.normalize import normalize

# espeak's output falls below this (of 32767) only in pauses: where speech ends.
SILENCE_LEVEL = 200


@dataclass(frozen=True)
class SpokenPhrase:
    samples: Samples
    speech_end_samples: int


class EspeakSpeaker:
    """Speaks in one voice (any name ListVoices lists, with an optional +variant)."""

    def __init__(self, voice: str = "en-gb") -> None:
        self._espeak = Espeak()
        catalogue = VoiceCatalogue(self._espeak.voices(), self._espeak.variants())
        self._espeak.set_voice(catalogue.resolve(voice))

    def __call__(self, text: str, sample_rate: int) -> SpokenPhrase:
        pieces: list[Samples] = []

        def sink(samples: Samples, marks: list[Mark]) -> bool:
            pieces.append(samples)
            return False

        self._espeak.synth(normalize(text).text, sink)
        resample = Resampler(self._espeak.sample_rate, sample_rate)
        samples = np.concatenate([*(resample(p) for p in pieces), resample.flush()])
        voiced = np.flatnonzero(np.abs(samples.astype(np.int32)) > SILENCE_LEVEL)
        return SpokenPhrase(samples, int(voiced[-1]) + 1 if voiced.size else 0)

    def close(self) -> None:
        self._espeak.close()
