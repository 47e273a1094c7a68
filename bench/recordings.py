"""Real human speech with reference transcripts, from Debian's pocketsphinx-testdata package
(LibriVox sentences, "go forward ten meters" and playing cards, 16 kHz mono), and the text
normalisation used to compare a transcript with its reference."""

from __future__ import annotations

import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voicepipe.pcm import Samples

DATA = Path("/usr/share/pocketsphinx/test/data")
SAMPLE_RATE = 16_000
_TRANSCRIPTION_LINE = re.compile(r"<s>(.*)</s>\s*\((.+)\)")
_NUMBERS = {
    "0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
    "7": "seven", "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve",
}  # fmt: skip
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


@dataclass(frozen=True)
class Recording:
    name: str
    audio: Samples
    reference: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def available() -> bool:
    return (DATA / "goforward.raw").is_file() and (DATA / "librivox" / "transcription").is_file()


def goforward() -> Recording:
    audio = np.fromfile(DATA / "goforward.raw", dtype="<i2").astype(np.int16)
    return Recording("goforward", audio, "go forward ten meters")


def librivox() -> list[Recording]:
    return _transcribed(DATA / "librivox" / "transcription", "")


def cards() -> list[Recording]:
    """Playing cards read out, among them the short answer "five five" (004)."""
    return _transcribed(DATA / "cards" / "cards.transcription", "cards-")


def _transcribed(transcription: Path, prefix: str) -> list[Recording]:
    """The recordings a sphinx transcription file lists (`<s> text </s> (name)` lines), each
    `name.wav` beside it."""
    recordings = []
    for line in transcription.read_text().splitlines():
        match = _TRANSCRIPTION_LINE.match(line.strip())
        if match:
            reference, name = match.group(1).strip(), match.group(2)
            audio = read_wav(transcription.parent / f"{name}.wav")
            recordings.append(Recording(f"{prefix}{name}", audio, reference))
    return recordings


def all_recordings() -> list[Recording]:
    return [goforward(), *librivox()]


def padded(audio: Samples, before_s: float = 0.5, after_s: float = 1.0) -> Samples:
    """Silence around speech, as a caller's microphone has it."""
    before, after = (np.zeros(int(s * SAMPLE_RATE), np.int16) for s in (before_s, after_s))
    return np.concatenate([before, audio, after])


def read_wav(path: Path) -> Samples:
    with wave.open(str(path)) as wav:
        if wav.getframerate() != SAMPLE_RATE or wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"{path} is not 16 kHz mono LINEAR16")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)


def normalise(text: str) -> str:
    """Lower case, no punctuation, hyphens as spaces, small numbers as words, common
    abbreviations spelled out."""
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
    words = [_ABBREVIATIONS.get(w, _NUMBERS.get(w, w)) for w in words]
    return " ".join(w.strip("'") for w in words if w.strip("'"))
