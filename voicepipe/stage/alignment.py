"""Word-aligned audio: an engine's audio and its word marks (where each word starts, where each
clause ends, in samples) become SpeechAudio pieces whose `text_end` says how much of the
original segment text has been spoken once the piece has played.

A word counts as spoken when the audio reaches the start of the next word or the end of its
clause, so a listener who stops
after a piece has heard every word its `text_end` covers, and `text_end` always falls on a word
boundary of the original text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from voicepipe.pcm import Samples
from voicepipe.stage.normalize import NormalizedText
from voicepipe.stage.tts import SpeechAudio


@dataclass(frozen=True)
class Mark:
    """A word starting (`length` code points from `position`) or a clause ending (length 0), at
    `sample` samples into the segment's audio. `position` is a 0-based code point index into the
    normalised text the engine speaks."""

    is_word: bool
    position: int
    length: int
    sample: int


class WordAligner:
    """Cuts one segment's audio at word ends. The latest piece is held back until the next one
    arrives (or `finish`), so that the last piece carries the whole text."""

    def __init__(self, text: NormalizedText, emit: Callable[[SpeechAudio], None]) -> None:
        self._text = text
        self._emit = emit
        self._received = 0  # samples so far: where the next buffer starts in the segment's audio
        self._word: Mark | None = None  # the word being spoken
        self._text_end = 0
        self._held: SpeechAudio | None = None

    def on_audio(self, samples: Samples, marks: list[Mark]) -> None:
        cursor = 0
        for mark in sorted(marks, key=lambda m: m.sample):
            if self._word is not None:
                cut = min(max(mark.sample - self._received, cursor), samples.size)
                self._push(samples[cursor:cut])
                cursor = cut
                self._text_end = max(
                    self._text_end, self._text.spoken_through(self._word.position + self._word.length)
                )
                self._hold_text_end()
            self._word = mark if mark.is_word else None
        self._push(samples[cursor:])
        self._received += samples.size

    def finish(self) -> None:
        """The segment is spoken: the last piece covers the whole text (an empty piece when
        there was nothing to say)."""
        self._text_end = len(self._text.original)
        if self._held is None:
            self._held = SpeechAudio(samples=np.zeros(0, dtype=np.int16), text_end=self._text_end)
        self._hold_text_end()
        self._emit(self._held)
        self._held = None

    def _push(self, samples: Samples) -> None:
        if not samples.size:
            return
        if self._held is not None:
            self._emit(self._held)
        self._held = SpeechAudio(samples=samples, text_end=self._text_end)

    def _hold_text_end(self) -> None:
        """The piece held back ends where the word ended: it carries the word."""
        if self._held is not None:
            self._held = replace(self._held, text_end=self._text_end)
