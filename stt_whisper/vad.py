"""Silero VAD, streamed: the ONNX model faster-whisper ships in its assets, run window by window
with its recurrent state carried from one window to the next, so a call's speech probabilities
do not depend on how its audio was chunked."""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
import onnxruntime
from faster_whisper.utils import get_assets_path

from voicepipe.pcm import Samples

WINDOW = 512  # samples at 16 kHz (32 ms): the model's frame
_CONTEXT = 64  # samples of the previous window the model sees with each window
_STATE_SHAPE = (1, 1, 128)


class SileroModel:
    """The shared ONNX session (its run() is thread-safe); one per process."""

    def __init__(self) -> None:
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(
            os.path.join(get_assets_path(), "silero_vad_v6.onnx"),
            providers=["CPUExecutionProvider"],
            sess_options=options,
        )


class VoiceActivity:
    """One stream's speech probabilities: `feed(samples)` returns one probability per whole
    32 ms window completed by the samples (the rest waits for the next feed)."""

    def __init__(self, model: SileroModel) -> None:
        self._session = model.session
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, samples: Samples) -> list[float]:
        audio = np.concatenate([self._pending, samples.astype(np.float32) / 32768.0])
        whole = len(audio) // WINDOW * WINDOW
        self._pending = audio[whole:]
        probabilities: list[float] = []
        for start in range(0, whole, WINDOW):
            window = audio[start : start + WINDOW]
            framed: npt.NDArray[np.float32] = np.concatenate([self._context, window])[None, :]
            out, self._h, self._c = self._session.run(None, {"input": framed, "h": self._h, "c": self._c})
            probabilities.append(float(np.asarray(out).reshape(-1)[0]))
            self._context = window[-_CONTEXT:]
        return probabilities
