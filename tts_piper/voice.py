"""A Piper voice: its VITS model (`.onnx`) run with onnxruntime, and its config (`.onnx.json`:
sample rate, espeak voice, phoneme id map, inference scales).

The model is loaded with its phoneme durations (the `Ceil` tensor of the duration predictor,
in frames of `hop_length` samples) exposed as a second output, so that every sentence comes
back with the samples each phoneme id takes: where each word ends."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime

from voicepipe.pcm import Samples

DEFAULT_HOP_LENGTH: Final = 256


def _with_durations(model: onnx.ModelProto) -> bytes:
    """The model with its duration tensor as an output (a model exported with it is kept)."""
    ceil = [node.output[0] for node in model.graph.node if node.op_type == "Ceil"]
    if len(model.graph.output) == 1:
        if len(ceil) != 1:
            raise ValueError(
                f"the model has {len(ceil)} Ceil nodes, not the one duration tensor of a Piper voice"
            )
        model.graph.output.append(onnx.ValueInfoProto(name=ceil[0]))
    return bytes(model.SerializeToString())


@dataclass(frozen=True)
class Spoken:
    """A sentence's audio and how many of its samples each phoneme id took."""

    samples: Samples
    samples_per_id: list[int]


class PiperVoice:
    """One voice, from `model` (its `.onnx`) and the `.onnx.json` next to it. `threads` is
    onnxruntime's intra-op thread count for one sentence."""

    def __init__(self, model: Path, threads: int = 1) -> None:
        config_path = model.with_name(model.name + ".json")
        if not model.is_file() or not config_path.is_file():
            raise FileNotFoundError(f"a Piper voice needs {model} and {config_path}")
        config: dict[str, Any] = json.loads(config_path.read_text())
        self.name = model.name.removesuffix(".onnx")
        self.sample_rate: int = config["audio"]["sample_rate"]
        self.espeak_voice: str = config["espeak"]["voice"]
        self.language: str = config.get("language", {}).get("code", "").replace("_", "-")
        self.id_map: dict[str, list[int]] = config["phoneme_id_map"]
        self._hop = int(config.get("hop_length", DEFAULT_HOP_LENGTH))
        inference = config.get("inference", {})
        self._scales = np.array(
            [
                inference.get("noise_scale", 0.667),
                inference.get("length_scale", 1.0),
                inference.get("noise_w", 0.8),
            ],
            dtype=np.float32,
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            _with_durations(onnx.load(model)), options, providers=["CPUExecutionProvider"]
        )

    def speak(self, ids: list[int]) -> Spoken:
        """Synthesises one sentence (blocking: run it off the event loop). The audio is
        normalised to full scale, as Piper does."""
        audio, durations = self._session.run(
            None,
            {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": self._scales,
            },
        )
        waveform = np.asarray(audio, dtype=np.float32).reshape(-1)
        peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
        scaled = waveform * (32767.0 / peak) if peak > 1e-8 else np.zeros_like(waveform)
        samples = np.clip(scaled, -32767, 32767).astype(np.int16)
        per_id = [int(frames) * self._hop for frames in np.asarray(durations).reshape(-1)]
        return Spoken(samples, per_id)
