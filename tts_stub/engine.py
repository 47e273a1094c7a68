"""The TTS stub's engine: speaks text in the stub audio code, paced by the latency profile.

A segment is rendered without the code's end-of-utterance silence but followed by one word gap
(`audio_code.WORD_GAP_MS`), so consecutive segments play as one continuous reply: a listener
hears them as a single utterance with a word boundary between segments. A caller that needs
the utterance to end (to feed the audio to a recogniser, say) appends its own silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stubs import audio_code
from stubs.latency import ProfiledEngine, sleep_until
from voicepipe.pcm import Samples
from voicepipe.stage.tts import Segment, SpeechAudio, SynthesisSettings, VoiceEngine

# Silence after each segment: a word gap, so that segments join into one utterance.
SEGMENT_TRAILING_SILENCE_MS = audio_code.WORD_GAP_MS
# A sentence renders in well under a millisecond, the longest segment at 48 kHz in about 0.15 s:
# segments longer than this render on a worker thread so other calls' audio is not held up.
RENDER_IN_THREAD_CHARS = 512


def original_char_ends(text: str, rendered: audio_code.RenderedSpeech) -> npt.NDArray[np.int64]:
    """For each code point of `text`, the sample position by which it has been spoken.

    The renderer speaks `normalize_text(text)`, which maps every non-space code point to one
    symbol and every whitespace run between words to one word gap. Whitespace counts as spoken
    with the word before it (leading whitespace at once), so text[:end] never stops inside a
    whitespace run."""
    ends = np.zeros(len(text), dtype=np.int64)
    symbol_ends = rendered.char_end_samples
    k = 0  # index into the normalized text
    spoken = 0
    after_space = False
    for i, char in enumerate(text):
        if char.isspace():
            after_space = True
        else:
            if after_space and k > 0:
                k += 1  # the normalized space between two words
            after_space = False
            spoken = int(symbol_ends[k])
            k += 1
        ends[i] = spoken
    return ends


@dataclass(frozen=True)
class SegmentAudio:
    """One segment's audio, and the characters spoken by each position."""

    samples: Samples
    char_ends: npt.NDArray[np.int64]

    @classmethod
    def render(cls, text: str, sample_rate: int) -> SegmentAudio:
        if not text.strip():
            # Nothing to say; a silence here could split the reply into two utterances.
            return cls(np.zeros(0, dtype=np.int16), np.zeros(len(text), dtype=np.int64))
        rendered = audio_code.render(text, sample_rate, trailing_silence_ms=SEGMENT_TRAILING_SILENCE_MS)
        return cls(rendered.samples, original_char_ends(text, rendered))

    def pieces(self, piece_samples: int) -> list[tuple[int, int, int]]:
        """(start, end, text_end) of consecutive pieces of `piece_samples`: text_end counts the
        characters whose audio has all been played by the piece's end."""
        if not self.samples.size:
            return []
        starts = np.arange(0, self.samples.size, piece_samples, dtype=np.int64)
        ends = np.minimum(starts + piece_samples, self.samples.size)
        text_ends = np.searchsorted(self.char_ends, ends, side="right")
        return list(zip(starts.tolist(), ends.tolist(), text_ends.tolist(), strict=True))


class StubVoiceEngine(ProfiledEngine, VoiceEngine):
    """Renders at the client's own rate, in pieces of the client's chunk length, each released
    when the latency profile says it has been produced: the first `tts_first_audio_ms` after the
    segment became due, then at `tts_realtime_factor` x real time (0: at once)."""

    role = "tts"

    async def synthesize(
        self, settings: SynthesisSettings, segment: Segment
    ) -> AsyncGenerator[SpeechAudio, None]:
        rate = settings.fmt.sample_rate
        if len(segment.text) > RENDER_IN_THREAD_CHARS:
            audio = await asyncio.to_thread(SegmentAudio.render, segment.text, rate)
        else:
            audio = SegmentAudio.render(segment.text, rate)
        # The engine is free once the previous segment has been produced, which is now.
        start = max(segment.due + self.profile.tts_first_audio_ms / 1000, time.monotonic())
        realtime_factor = self.profile.tts_realtime_factor
        piece_samples = max(1, audio_code.ms_to_samples(settings.chunk_duration_ms, rate))
        for s0, s1, text_end in audio.pieces(piece_samples):
            if realtime_factor:
                await sleep_until(start + s0 / rate / realtime_factor)
            else:
                await sleep_until(start)
            yield SpeechAudio(audio.samples[s0:s1], text_end)
