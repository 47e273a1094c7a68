"""Where utterances start, pause and end, from Silero's per-window speech probabilities and the
call's endpointing settings. Pure bookkeeping over 32 ms windows, so it is independent of how
the audio was chunked."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stt_whisper.vad import WINDOW

SPEECH_THRESHOLD = 0.5  # Silero's recommended threshold
SILENCE_THRESHOLD = 0.35  # below this, speech has stopped (hysteresis, as faster-whisper's VAD)
_WINDOW_MS = WINDOW * 1000 / 16_000


@dataclass(frozen=True)
class Started:
    """Speech started at sample `offset` (the start of its first voiced window)."""

    offset: int


@dataclass(frozen=True)
class Paused:
    """Voiced audio stopped at sample `end`; the utterance ends unless speech resumes."""

    end: int


@dataclass(frozen=True)
class Held:
    """The pause has lasted the endpointer's `hold_ms` (voiced audio stopped at sample `end`):
    the moment a turn model that was trained on turns ending in that much silence can judge it."""

    end: int


@dataclass(frozen=True)
class Resumed:
    """Speech came back before the endpointing silence had held."""


@dataclass(frozen=True)
class Ended:
    """The endpointing silence held: the utterance's voiced audio ended at sample `end`."""

    end: int


Boundary = Started | Paused | Held | Resumed | Ended


class Endpointer:
    def __init__(
        self, speech_start_ms: int, end_of_utterance_silence_ms: int, hold_ms: int | None = None
    ) -> None:
        """`hold_ms`: a pause that lasts this long (at least two windows, and has not ended the
        utterance) is reported `Held`; None: never."""
        self._start_windows = max(1, math.ceil(speech_start_ms / _WINDOW_MS))
        self._end_windows = max(1, math.ceil(end_of_utterance_silence_ms / _WINDOW_MS))
        self._hold_windows = None if hold_ms is None else max(2, math.ceil(hold_ms / _WINDOW_MS))
        self._pause_end_windows = self._end_windows  # this pause's (see end_pause_after)
        self._windows = 0
        self._voiced = False
        self._voiced_run = 0
        self._silent_run = 0
        self.in_utterance = False
        self.voiced_end = 0  # end of the last voiced window

    @property
    def start_samples(self) -> int:
        """Voiced audio needed before speech counts as started."""
        return self._start_windows * WINDOW

    @property
    def position(self) -> int:
        """The end of the last window seen, in samples."""
        return self._windows * WINDOW

    def end_pause_after(self, silence_ms: int) -> None:
        """The current pause ends the utterance after `silence_ms` instead (at once if that much
        has passed); speech resuming restores the configured silence."""
        self._pause_end_windows = max(1, math.ceil(silence_ms / _WINDOW_MS))

    def step(self, probability: float) -> Boundary | None:
        start = self.position
        self._windows += 1
        threshold = SILENCE_THRESHOLD if self._voiced else SPEECH_THRESHOLD
        self._voiced = probability >= threshold
        if self._voiced:
            self._voiced_run += 1
            silent_before, self._silent_run = self._silent_run, 0
            self._pause_end_windows = self._end_windows
            self.voiced_end = self.position
            if not self.in_utterance and self._voiced_run >= self._start_windows:
                self.in_utterance = True
                return Started(start - (self._voiced_run - 1) * WINDOW)
            return Resumed() if self.in_utterance and silent_before else None
        self._voiced_run = 0
        if not self.in_utterance:
            return None
        self._silent_run += 1
        if self._silent_run >= self._pause_end_windows:
            self.in_utterance = False
            self._silent_run = 0
            return Ended(self.voiced_end)
        if self._silent_run == 1:
            return Paused(self.voiced_end)
        return Held(self.voiced_end) if self._silent_run == self._hold_windows else None
