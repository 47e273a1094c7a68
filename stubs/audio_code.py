"""The stub audio code: text rendered as deterministic dual-tone audio, and decoded back exactly.

The stage stubs cannot understand speech, so the TTS stub "speaks" text in this code and the STT
stub "hears" it; clients and tests use the same module to speak a phrase. The round trip is exact
(``decode(encode(t)) == normalize_text(t)``), which is how the system proves that audio was not
lost, duplicated or reordered. This docstring is the specification; a client in another language
can be written from it alone.

Text
----
``normalize_text`` defines what survives the round trip:

* whitespace is anything ``str.isspace()`` accepts; leading and trailing whitespace is dropped and
  every internal run of whitespace becomes one word gap (decoded as a single ``" "``);
* each printable non-space ASCII character (``"!"`` 0x21 .. ``"~"`` 0x7E, 94 symbols) is one
  symbol; every other code point (non-ASCII letters, emoji, control characters) becomes ``"?"``.

Symbols
-------
A symbol is a dual tone, like DTMF: one tone from group A plus one from group B. With
``index = ord(c) - 33`` (0..93)::

    A = index // 10   ->  GROUP_A_HZ = 350, 450, 550, ..., 1250 Hz  (350 + 100 * A)
    B = index % 10    ->  GROUP_B_HZ = 1500, 1650, 1800, ..., 2850 Hz (1500 + 150 * B)

For example ``"!"`` is 350 + 1500 Hz, ``"a"`` (index 64) is 950 + 2100 Hz and ``"~"`` (index 93)
is 1250 + 1950 Hz. The six unused codes (A = 9, B = 4..9) decode as ``"?"``. Every tone is below
3400 Hz, so the code survives 8 kHz sampling and G.711 mu-law.

Each tone is a sine starting at phase 0 at the burst's first sample, with peak amplitude
``TONE_AMPLITUDE`` = 0.25 of full scale (32767), so a symbol peaks at 0.5 of full scale (its RMS
is -12 dBFS). Both edges of a burst get a raised-cosine ramp of ``RAMP_MS`` = 2 ms: with
``R = ms_to_samples(2, rate)``, sample ``n < R`` is scaled by ``0.5 - 0.5 * cos(pi * (n + 0.5) / R)``
and the last ``R`` samples by the mirror image. The ``gain`` of ``encode`` multiplies the signal
before it is rounded to int16 and clipped to [-32768, 32767].

Timing
------
All times are whole milliseconds on one timeline starting at sample 0 (after the optional leading
silence). A time ``t`` ms is sample ``ms_to_samples(t, rate) = (t * rate + 500) // 1000`` (rounded,
so nothing drifts at rates like 11025 Hz). Each symbol is a ``TONE_MS`` = 30 ms burst, followed by

* ``INTER_CHAR_SILENCE_MS`` = 10 ms of silence before the next symbol of the same word,
* ``WORD_GAP_MS`` = 60 ms of silence before the first symbol of the next word (this replaces the
  10 ms, it is not added to it),
* ``trailing_silence_ms`` (default ``DEFAULT_TRAILING_SILENCE_MS`` = 250 ms) after the last symbol.

So "hi yo" is: h 0-30, i 40-70, y 130-160, o 170-200, silence 200-450 ms. Utterances rendered
separately can be concatenated into one stream; the default trailing silence (250 ms) exceeds the
decoder's default end-of-utterance silence (120 ms), so each becomes its own utterance.

Decoding
--------
Voice-activity detection works on frames of ``frame_samples(rate) = round(rate / 400)`` samples
(2.5 ms; 28 samples = 2.54 ms at 11025 Hz), aligned to sample 0 of the stream. A frame is voiced
when its RMS exceeds ``VOICE_THRESHOLD_DBFS`` = -40 dBFS, where 0 dBFS is an RMS of 32768 (an
absolute threshold: RMS > 327.68). Runs of voiced frames are bursts, runs of unvoiced frames gaps.
The gap after a burst is measured in whole frames from the end of the burst's last voiced frame:

* gap < ``WORD_BOUNDARY_GAP_MS`` = 35 ms: the next burst is in the same word;
* gap >= 35 ms: word boundary, reported as soon as the 35 ms are reached (``WordDecoded``);
* gap >= ``end_of_utterance_silence_ms`` (default 120 ms): end of utterance (``UtteranceEnded``).

A threshold of T ms is reached after ``ceil(T * rate / 1000 / frame)`` silent frames.

Each burst is one symbol. Its first and last voiced frames (which hold the ramps and partial
frames) are dropped when the burst has at least 3 frames; the remaining samples (only those in
the burst's first ``MAX_ANALYSIS_MS`` = 60 ms) are multiplied by a Hann window
(``numpy.hanning(n + 2)[1:-1]``) and correlated with a cosine and a sine at each of the 20
candidate frequencies, phase 0 at the first analysed sample (one DFT term per frequency, as in
Goertzel, computed as one matrix product). The strongest group-A and the strongest group-B
frequency (power = cos^2 + sin^2) give the symbol. Measured decision margin (strongest over
runner-up power, per group, over all 94 symbols): about 32 dB on clean audio, >= 24 dB at -20 dB
gain with -50 dBFS noise and mu-law.

Events
------
Offsets are in samples from the first sample of the stream (``samples_to_ms`` and
``samples_to_seconds`` convert them). Per utterance the decoder emits, in this order:

* ``SpeechStarted(offset_samples)``: once the utterance holds ``speech_start_ms`` (default 20 ms,
  rounded up to whole frames) of voiced frames in total, counted across bursts; the offset is the
  start of the utterance's first voiced frame. An utterance that ends before that is discarded as
  noise (no events at all); word events detected before ``SpeechStarted`` are held back and
  emitted right after it.
* ``WordDecoded(text_so_far, start_samples, end_samples, word, word_start_samples)``: one per
  word, when its 35 ms word boundary is reached (the last word too, before the end of the
  utterance is known). ``text_so_far`` is the utterance so far (interim transcript),
  ``start_samples`` the utterance start, ``end_samples`` the end of the word's last voiced frame.
* ``UtteranceEnded(text, start_samples, end_samples, detected_at_samples)``: ``text`` is final and
  equals the last ``text_so_far``; ``end_samples`` is the end of the last voiced frame and
  ``detected_at_samples = end_samples + ceil-to-frames(end_of_utterance_silence_ms)``. At the end
  of the stream ``finish()`` analyses the last partial frame, emits the pending ``WordDecoded`` and
  closes the utterance with ``detected_at_samples`` = the stream length.

Onsets and ends are found to within one frame plus the ramp (well inside +-5 ms of the rendered
timeline). Events depend only on the sample stream, never on how it was split into ``feed`` calls:
the decoder buffers less than one frame, processes whole frames from the start of the stream and
drops them; a burst keeps at most 60 ms of samples, so memory is bounded.

Wire formats
------------
``pcm16_to_bytes``/``bytes_to_pcm16`` convert LINEAR16 (signed 16-bit little-endian).
``mulaw_encode``/``mulaw_decode`` implement G.711 mu-law exactly as the classic Sun ``g711.c``
(bias 0x84, clip 32635, inverted bits): 0 -> 0xFF, -1 -> 0x7F, 32767 -> 0x80, 0x00 -> -32124.

Operating range
---------------
Guaranteed and tested (tests/test_audio_code.py): any integer rate 8000..48000 Hz, gain -20 dB to
+6 dB and beyond into hard clipping (+12 dB tested), additive white noise at -50 dBFS, LINEAR16 or
mu-law transport, any chunking. Measured limits: gain -24 dB (below it, bursts fall under the -40
dBFS voice threshold) to +20 dB; white noise up to -45 dBFS (at -40 dBFS noise counts as voice).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from voicepipe.pcm import as_int16, bytes_to_pcm16, mulaw_decode, mulaw_encode, pcm16_to_bytes

__all__ = [
    "DEFAULT_END_OF_UTTERANCE_SILENCE_MS",
    "DEFAULT_SPEECH_START_MS",
    "DEFAULT_TRAILING_SILENCE_MS",
    "GROUP_A_HZ",
    "GROUP_B_HZ",
    "INTER_CHAR_SILENCE_MS",
    "MAX_ANALYSIS_MS",
    "RAMP_MS",
    "REPLACEMENT_CHAR",
    "SUPPORTED_MAX_RATE",
    "SUPPORTED_MIN_RATE",
    "TONE_AMPLITUDE",
    "TONE_MS",
    "VOICE_THRESHOLD_DBFS",
    "WORD_BOUNDARY_GAP_MS",
    "WORD_GAP_MS",
    "DecoderEvent",
    "RenderedSpeech",
    "SpeechDecoder",
    "SpeechStarted",
    "UtteranceEnded",
    "WordDecoded",
    "bytes_to_pcm16",
    "decode_utterances",
    "encode",
    "frame_samples",
    "gain_from_db",
    "ms_to_samples",
    "mulaw_decode",
    "mulaw_encode",
    "normalize_text",
    "pcm16_to_bytes",
    "render",
    "samples_to_ms",
    "samples_to_seconds",
]

Int16Array: TypeAlias = npt.NDArray[np.int16]
Int64Array: TypeAlias = npt.NDArray[np.int64]
Float32Array: TypeAlias = npt.NDArray[np.float32]
Float64Array: TypeAlias = npt.NDArray[np.float64]
Int32Array: TypeAlias = npt.NDArray[np.int32]

SUPPORTED_MIN_RATE: Final = 8000
SUPPORTED_MAX_RATE: Final = 48000

# --- alphabet --------------------------------------------------------------------------------
FIRST_CHAR: Final = "!"  # 0x21, symbol index 0
LAST_CHAR: Final = "~"  # 0x7E, symbol index 93
SYMBOL_COUNT: Final = 94
REPLACEMENT_CHAR: Final = "?"
GROUP_A_HZ: Final[tuple[int, ...]] = tuple(350 + 100 * i for i in range(10))  # 350..1250
GROUP_B_HZ: Final[tuple[int, ...]] = tuple(1500 + 150 * i for i in range(10))  # 1500..2850

# --- rendering -------------------------------------------------------------------------------
TONE_MS: Final = 30
INTER_CHAR_SILENCE_MS: Final = 10
WORD_GAP_MS: Final = 60
DEFAULT_TRAILING_SILENCE_MS: Final = 250
RAMP_MS: Final = 2
TONE_AMPLITUDE: Final = 0.25
FULL_SCALE: Final = 32767

# --- decoding --------------------------------------------------------------------------------
FRAMES_PER_SECOND: Final = 400  # frame = round(rate / 400) samples, about 2.5 ms
VOICE_THRESHOLD_DBFS: Final = -40.0  # frame RMS above this (0 dBFS = RMS 32768) is voiced
WORD_BOUNDARY_GAP_MS: Final = 35
DEFAULT_END_OF_UTTERANCE_SILENCE_MS: Final = 120
DEFAULT_SPEECH_START_MS: Final = 20
MAX_ANALYSIS_MS: Final = 60  # samples of one burst kept for symbol detection

_VOICE_RMS: Final = 32768.0 * 10.0 ** (VOICE_THRESHOLD_DBFS / 20.0)


# --- small helpers ---------------------------------------------------------------------------


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise TypeError(f"sample_rate must be an int, not {type(sample_rate).__name__}")
    rate = int(sample_rate)
    if not SUPPORTED_MIN_RATE <= rate <= SUPPORTED_MAX_RATE:
        raise ValueError(
            f"sample_rate {rate} is out of range; use {SUPPORTED_MIN_RATE} to {SUPPORTED_MAX_RATE} Hz"
        )
    return rate


def ms_to_samples(milliseconds: int, sample_rate: int) -> int:
    """Sample index of a whole-millisecond time: ``(ms * rate + 500) // 1000`` (rounded)."""
    return (int(milliseconds) * int(sample_rate) + 500) // 1000


def samples_to_ms(samples: int, sample_rate: int) -> float:
    """A sample offset or count in milliseconds."""
    return samples * 1000.0 / sample_rate


def samples_to_seconds(samples: int, sample_rate: int) -> float:
    """A sample offset or count in seconds."""
    return samples / float(sample_rate)


def frame_samples(sample_rate: int) -> int:
    """Length of one voice-activity frame: ``round(rate / 400)`` samples (about 2.5 ms)."""
    return round(_check_rate(sample_rate) / FRAMES_PER_SECOND)


def gain_from_db(decibels: float) -> float:
    """Linear amplitude factor for a gain in dB (for ``encode(..., gain=...)``)."""
    return float(10.0 ** (decibels / 20.0))


# --- text ------------------------------------------------------------------------------------


def _symbol_char(char: str) -> str:
    return char if FIRST_CHAR <= char <= LAST_CHAR else REPLACEMENT_CHAR


def normalize_text(text: str) -> str:
    """What ``text`` decodes to: whitespace runs become one space, the ends are stripped, and
    every character outside ``"!"``..``"~"`` becomes ``"?"``."""
    return " ".join("".join(_symbol_char(c) for c in word) for word in text.split())


# --- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedSpeech:
    """Audio of one utterance, with where each character of ``text`` is spoken.

    ``text`` is ``normalize_text`` of the input. For character ``i`` of ``text``,
    ``char_start_samples[i]``/``char_end_samples[i]`` delimit its tone burst; a space spans its
    word gap (from the end of the previous burst to the start of the next). A chunk of samples
    ``[s0, s1)`` has finished speaking every character whose end is ``<= s1``. Both arrays are
    non-decreasing int64.
    """

    text: str
    sample_rate: int
    samples: Int16Array
    char_start_samples: Int64Array
    char_end_samples: Int64Array

    @property
    def speech_end_samples(self) -> int:
        """End of the last tone burst (0 for empty text)."""
        return int(self.char_end_samples[-1]) if len(self.text) else 0

    @property
    def duration_seconds(self) -> float:
        return samples_to_seconds(len(self.samples), self.sample_rate)


@functools.lru_cache(maxsize=2048)
def _burst_template(sample_rate: int, length: int, index: int) -> Float64Array:
    """One symbol's tone burst, in units of full scale, ramps included."""
    n = np.arange(length, dtype=np.float64)
    f_a = GROUP_A_HZ[index // 10]
    f_b = GROUP_B_HZ[index % 10]
    tone = TONE_AMPLITUDE * (
        np.sin(2.0 * np.pi * f_a * n / sample_rate) + np.sin(2.0 * np.pi * f_b * n / sample_rate)
    )
    ramp_len = min(max(1, ms_to_samples(RAMP_MS, sample_rate)), length // 2)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_len) + 0.5) / ramp_len)
        tone[:ramp_len] *= ramp
        tone[length - ramp_len :] *= ramp[::-1]
    tone.flags.writeable = False
    return tone


def render(
    text: str,
    sample_rate: int,
    *,
    trailing_silence_ms: int = DEFAULT_TRAILING_SILENCE_MS,
    leading_silence_ms: int = 0,
    gain: float = 1.0,
) -> RenderedSpeech:
    """Renders ``text`` in the stub audio code, with its character map (see RenderedSpeech)."""
    rate = _check_rate(sample_rate)
    if trailing_silence_ms < 0 or leading_silence_ms < 0:
        raise ValueError("silence durations must be >= 0 ms")
    if not math.isfinite(gain) or gain < 0:
        raise ValueError(f"gain must be a finite number >= 0, got {gain}")
    norm = normalize_text(text)
    starts: list[int] = []
    ends: list[int] = []
    bursts: list[tuple[int, int, int]] = []  # (start, end, symbol index)
    t = int(leading_silence_ms)
    for i, char in enumerate(norm):
        if char == " ":
            starts.append(ms_to_samples(t - INTER_CHAR_SILENCE_MS, rate))
            t += WORD_GAP_MS - INTER_CHAR_SILENCE_MS
            ends.append(ms_to_samples(t, rate))
            continue
        s0 = ms_to_samples(t, rate)
        s1 = ms_to_samples(t + TONE_MS, rate)
        starts.append(s0)
        ends.append(s1)
        bursts.append((s0, s1, ord(char) - ord(FIRST_CHAR)))
        t += TONE_MS
        if i + 1 < len(norm):
            t += INTER_CHAR_SILENCE_MS
    total = ms_to_samples(t + trailing_silence_ms, rate)
    signal = np.zeros(total, dtype=np.float64)
    for s0, s1, index in bursts:
        signal[s0:s1] = _burst_template(rate, s1 - s0, index)
    signal *= FULL_SCALE * gain
    np.rint(signal, out=signal)
    np.clip(signal, -32768, 32767, out=signal)
    return RenderedSpeech(
        text=norm,
        sample_rate=rate,
        samples=signal.astype(np.int16),
        char_start_samples=np.array(starts, dtype=np.int64),
        char_end_samples=np.array(ends, dtype=np.int64),
    )


def encode(
    text: str,
    sample_rate: int,
    *,
    trailing_silence_ms: int = DEFAULT_TRAILING_SILENCE_MS,
    leading_silence_ms: int = 0,
    gain: float = 1.0,
) -> Int16Array:
    """Renders ``text`` in the stub audio code: int16 mono samples at ``sample_rate``."""
    return render(
        text,
        sample_rate,
        trailing_silence_ms=trailing_silence_ms,
        leading_silence_ms=leading_silence_ms,
        gain=gain,
    ).samples


# --- wire formats ----------------------------------------------------------------------------


# --- decoder events --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began at ``offset_samples`` (start of the utterance's first voiced frame)."""

    offset_samples: int


@dataclass(frozen=True)
class WordDecoded:
    """A word boundary was detected (35 ms of silence after a word).

    ``text_so_far`` is the whole utterance so far (use it for interim transcripts);
    ``start_samples`` is the start of the utterance, ``end_samples`` the end of this word's last
    voiced frame. ``word`` and ``word_start_samples`` describe the word alone.
    """

    text_so_far: str
    start_samples: int
    end_samples: int
    word: str
    word_start_samples: int


@dataclass(frozen=True)
class UtteranceEnded:
    """The utterance ended: ``text`` is final; ``start_samples`` is the start of its first voiced
    frame, ``end_samples`` the end of its last one, and ``detected_at_samples`` the stream position
    where the end-of-utterance silence was reached (or the end of the stream, from ``finish``)."""

    text: str
    start_samples: int
    end_samples: int
    detected_at_samples: int


DecoderEvent: TypeAlias = SpeechStarted | WordDecoded | UtteranceEnded


# --- decoder ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _analysis_basis(sample_rate: int) -> Float32Array:
    """(MAX_ANALYSIS_MS samples, 40): cos then sin at the 20 candidate frequencies."""
    length = ms_to_samples(MAX_ANALYSIS_MS, sample_rate)
    freqs = np.array(GROUP_A_HZ + GROUP_B_HZ, dtype=np.float64)
    phase = 2.0 * np.pi * np.outer(np.arange(length, dtype=np.float64), freqs) / sample_rate
    basis = np.concatenate((np.cos(phase), np.sin(phase)), axis=1).astype(np.float32)
    basis.flags.writeable = False
    return basis


@functools.lru_cache(maxsize=256)
def _hann(length: int) -> Float32Array:
    window = np.hanning(length + 2)[1:-1].astype(np.float32)
    window.flags.writeable = False
    return window


def _detect_symbol(samples: Float32Array, sample_rate: int) -> str:
    """Strongest group-A and group-B tones of a burst's samples -> character."""
    n = len(samples)
    if n == 0:
        return REPLACEMENT_CHAR
    projected = (samples * _hann(n)) @ _analysis_basis(sample_rate)[:n]
    power = projected[:20] ** 2 + projected[20:] ** 2
    index = int(np.argmax(power[:10])) * 10 + int(np.argmax(power[10:]))
    return chr(ord(FIRST_CHAR) + index) if index < SYMBOL_COUNT else REPLACEMENT_CHAR


class SpeechDecoder:
    """Streaming decoder of the stub audio code (one per audio stream).

    ``feed`` any number of int16 samples at a time and collect the events; ``finish`` at the end
    of the stream. Events and their offsets (samples since the start of the stream) depend only
    on the samples, never on how they were split into ``feed`` calls. Memory is bounded: at most
    one frame of unprocessed samples plus ``MAX_ANALYSIS_MS`` of the current burst are kept.
    """

    _MAX_BLOCK_FRAMES: Final = 8192

    def __init__(
        self,
        sample_rate: int,
        *,
        end_of_utterance_silence_ms: int = DEFAULT_END_OF_UTTERANCE_SILENCE_MS,
        speech_start_ms: int = DEFAULT_SPEECH_START_MS,
    ) -> None:
        rate = _check_rate(sample_rate)
        if end_of_utterance_silence_ms <= WORD_BOUNDARY_GAP_MS:
            raise ValueError(
                f"end_of_utterance_silence_ms must exceed {WORD_BOUNDARY_GAP_MS} ms,"
                f" got {end_of_utterance_silence_ms}"
            )
        if speech_start_ms < 0:
            raise ValueError(f"speech_start_ms must be >= 0, got {speech_start_ms}")
        self._rate = rate
        self._frame = frame_samples(rate)
        frame = self._frame
        self._energy_threshold = frame * _VOICE_RMS**2
        self._word_gap = self._ms_to_whole_frames(WORD_BOUNDARY_GAP_MS) * frame
        self._eou_gap = self._ms_to_whole_frames(end_of_utterance_silence_ms) * frame
        self._speech_start = max(1, self._ms_to_whole_frames(speech_start_ms)) * frame
        self._analysis_cap = ms_to_samples(MAX_ANALYSIS_MS, rate)
        self.end_of_utterance_silence_ms = end_of_utterance_silence_ms
        self.speech_start_ms = speech_start_ms

        self._pending: Int16Array = np.zeros(0, dtype=np.int16)  # < one frame, not yet processed
        self._consumed = 0  # samples received
        self._processed = 0  # samples analysed (whole frames, except after finish)
        self._finished = False
        # current burst
        self._in_burst = False
        self._burst_parts: list[Float32Array] = []
        self._burst_kept = 0
        self._burst_frames = 0
        self._burst_last_frame = 0
        self._burst_truncated = False
        # current utterance
        self._utt_open = False
        self._utt_start = 0
        self._utt_voiced = 0
        self._started = False
        self._words: list[str] = []
        self._word_chars: list[str] = []
        self._word_start = 0
        self._last_voiced_end = 0
        self._held: list[DecoderEvent] = []

    def _ms_to_whole_frames(self, milliseconds: int) -> int:
        """Frames of silence/voice needed to reach ``milliseconds`` (rounded up)."""
        return -(-milliseconds * self._rate // (1000 * self._frame))

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def frame_samples(self) -> int:
        return self._frame

    @property
    def samples_consumed(self) -> int:
        """Samples received so far: the current stream offset."""
        return self._consumed

    @property
    def current_offset_ms(self) -> float:
        return samples_to_ms(self._consumed, self._rate)

    @property
    def in_utterance(self) -> bool:
        """True between the first voiced frame of an utterance and its end."""
        return self._utt_open

    @property
    def last_voiced_end(self) -> int:
        """The end of the current utterance's last voiced frame (in samples)."""
        return self._last_voiced_end

    def to_ms(self, samples: int) -> float:
        """An offset of this stream, in milliseconds."""
        return samples_to_ms(samples, self._rate)

    def to_seconds(self, samples: int) -> float:
        """An offset of this stream, in seconds."""
        return samples_to_seconds(samples, self._rate)

    def feed(self, samples: npt.ArrayLike) -> list[DecoderEvent]:
        """Adds int16 samples to the stream; returns the events they complete, in order."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        chunk = as_int16(samples, "samples")
        if chunk.size == 0:
            return []
        self._consumed += chunk.size
        frame = self._frame
        if self._pending.size + chunk.size < frame:
            self._pending = np.concatenate((self._pending, chunk))
            return []
        data = np.concatenate((self._pending, chunk)) if self._pending.size else chunk
        whole = data.size - data.size % frame
        self._pending = data[whole:].copy()
        events: list[DecoderEvent] = []
        block = self._MAX_BLOCK_FRAMES * frame
        for begin in range(0, whole, block):
            self._process(data[begin : min(whole, begin + block)], events)
        return events

    def finish(self) -> list[DecoderEvent]:
        """End of stream: analyses the last partial frame and closes an open utterance."""
        if self._finished:
            return []
        self._finished = True
        events: list[DecoderEvent] = []
        tail = self._pending
        self._pending = np.zeros(0, dtype=np.int16)
        if tail.size:
            wide = tail.astype(np.int64)
            start = self._processed
            self._processed += tail.size
            if int(wide @ wide) > tail.size * _VOICE_RMS**2:
                self._voiced_run(tail, start, self._processed, 1, tail.size, events)
            else:
                self._silent_run(start, self._processed, events)
        if self._in_burst:
            self._close_burst()
        if self._utt_open:
            self._end_utterance(self._consumed, events)
        return events

    # -- internals -----------------------------------------------------------------------------

    def _process(self, data: Int16Array, events: list[DecoderEvent]) -> None:
        frame = self._frame
        count = data.size // frame
        wide = data.astype(np.int64).reshape(count, frame)
        voiced = np.einsum("ij,ij->i", wide, wide) > self._energy_threshold
        cuts = (np.flatnonzero(voiced[1:] != voiced[:-1]) + 1).tolist()
        base = self._processed
        first = 0
        for last in [*cuts, count]:
            s0 = base + first * frame
            s1 = base + last * frame
            if voiced[first]:
                self._voiced_run(data[first * frame : last * frame], s0, s1, last - first, frame, events)
            else:
                self._silent_run(s0, s1, events)
            first = last
        self._processed = base + count * frame

    def _voiced_run(
        self,
        samples: Int16Array,
        s0: int,
        s1: int,
        frames: int,
        last_frame: int,
        events: list[DecoderEvent],
    ) -> None:
        if not self._in_burst:
            self._in_burst = True
            self._burst_parts = []
            self._burst_kept = 0
            self._burst_frames = 0
            self._burst_truncated = False
            if not self._utt_open:
                self._utt_open = True
                self._utt_start = s0
                self._utt_voiced = 0
                self._started = False
                self._words = []
                self._word_chars = []
                self._held = []
            if not self._word_chars:
                self._word_start = s0
        room = self._analysis_cap - self._burst_kept
        if room > 0:
            part = samples[:room].astype(np.float32)
            self._burst_parts.append(part)
            self._burst_kept += part.size
        if samples.size > max(room, 0):
            self._burst_truncated = True
        self._burst_frames += frames
        self._burst_last_frame = last_frame
        self._last_voiced_end = s1
        self._utt_voiced += s1 - s0
        if not self._started and self._utt_voiced >= self._speech_start:
            self._started = True
            events.append(SpeechStarted(self._utt_start))
            events.extend(self._held)
            self._held = []

    def _close_burst(self) -> None:
        samples = self._burst_parts[0] if len(self._burst_parts) == 1 else np.concatenate(self._burst_parts)
        if self._burst_frames >= 3:
            stop = samples.size if self._burst_truncated else samples.size - self._burst_last_frame
            samples = samples[self._frame : stop]
        self._word_chars.append(_detect_symbol(samples, self._rate))
        self._burst_parts = []
        self._in_burst = False

    def _silent_run(self, s0: int, s1: int, events: list[DecoderEvent]) -> None:
        if self._in_burst:
            self._close_burst()
        if not self._utt_open:
            return
        gap = s1 - self._last_voiced_end
        if self._word_chars and gap >= self._word_gap:
            self._close_word(events)
        if gap >= self._eou_gap:
            self._end_utterance(self._last_voiced_end + self._eou_gap, events)

    def _close_word(self, events: list[DecoderEvent]) -> None:
        word = "".join(self._word_chars)
        self._words.append(word)
        self._word_chars = []
        event = WordDecoded(
            text_so_far=" ".join(self._words),
            start_samples=self._utt_start,
            end_samples=self._last_voiced_end,
            word=word,
            word_start_samples=self._word_start,
        )
        (events if self._started else self._held).append(event)

    def _end_utterance(self, detected_at: int, events: list[DecoderEvent]) -> None:
        if self._word_chars:
            self._close_word(events)
        if self._started:
            events.append(
                UtteranceEnded(
                    text=" ".join(self._words),
                    start_samples=self._utt_start,
                    end_samples=self._last_voiced_end,
                    detected_at_samples=detected_at,
                )
            )
        self._utt_open = False
        self._held = []
        self._words = []


def decode_utterances(
    samples: npt.ArrayLike,
    sample_rate: int,
    *,
    end_of_utterance_silence_ms: int = DEFAULT_END_OF_UTTERANCE_SILENCE_MS,
    speech_start_ms: int = DEFAULT_SPEECH_START_MS,
) -> list[str]:
    """Decodes a whole recording: the final text of each utterance, in order."""
    decoder = SpeechDecoder(
        sample_rate,
        end_of_utterance_silence_ms=end_of_utterance_silence_ms,
        speech_start_ms=speech_start_ms,
    )
    events = decoder.feed(samples) + decoder.finish()
    return [event.text for event in events if isinstance(event, UtteranceEnded)]
