"""Caller audio: utterances cut into the 20 ms frames a live microphone sends.

The library does not synthesise speech: a caller gives samples, or a `Speaker` that renders text
(for example the stub audio code's `render`, which the stub STT transcribes exactly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from voicepipe.audio_format import PcmFormat

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000


class SpeechSamples(Protocol):
    """Rendered speech: its samples and where the last voiced sample ends."""

    @property
    def samples(self) -> npt.NDArray[np.int16]: ...

    @property
    def speech_end_samples(self) -> int: ...


# text, sample rate -> speech
Speaker = Callable[[str, int], SpeechSamples]


@dataclass(frozen=True)
class Utterance:
    """Audio in 20 ms frames of one format (the last may be shorter), and the frame holding the
    end of speech: the moment it leaves is when the user stopped speaking, where TTFA starts."""

    frames: tuple[bytes, ...]
    speech_end_frame: int

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("an utterance needs at least one sample")
        if not 0 <= self.speech_end_frame < len(self.frames):
            raise ValueError(
                f"speech_end_frame {self.speech_end_frame} is not one of the {len(self.frames)} frames"
            )

    @classmethod
    def from_samples(
        cls, samples: npt.NDArray[np.int16], fmt: PcmFormat, speech_end_sample: int | None = None
    ) -> Utterance:
        """`samples` in `fmt`; speech ends at `speech_end_sample` (default: the last sample)."""
        data = fmt.encode(samples)
        frame_bytes = fmt.bytes_for(FRAME_MS)
        frames = tuple(data[i : i + frame_bytes] for i in range(0, len(data), frame_bytes))
        end = len(samples) if speech_end_sample is None else speech_end_sample
        return cls(frames, max(0, end - 1) // (frame_bytes // fmt.bytes_per_sample))

    @classmethod
    def spoken(cls, speaker: Speaker, text: str, fmt: PcmFormat) -> Utterance:
        speech = speaker(text, fmt.sample_rate)
        return cls.from_samples(speech.samples, fmt, speech.speech_end_samples)


def silent_frame(fmt: PcmFormat) -> bytes:
    return fmt.encode(np.zeros(fmt.bytes_for(FRAME_MS) // fmt.bytes_per_sample, np.int16))
