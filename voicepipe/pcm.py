"""PCM conversion every engine can use: the wire encodings (LINEAR16, G.711 mu-law) and
resampling between 8 and 48 kHz, chunk by chunk, with the filter state carried across chunks."""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soxr

Samples = npt.NDArray[np.int16]
_Int32Array = npt.NDArray[np.int32]


def as_int16(samples: npt.ArrayLike, what: str) -> Samples:
    """A 1-D int16 view of ``samples``; other integer dtypes are clipped to the int16 range."""
    array: npt.NDArray[Any] = np.asarray(samples)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of mono samples, got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.int16, copy=False)
    if array.dtype.kind in "iu":
        clipped: npt.NDArray[Any] = np.minimum(array, 32767)
        if array.dtype.kind == "i":
            clipped = np.maximum(clipped, -32768)
        return clipped.astype(np.int16)
    raise TypeError(f"{what} must hold int16 samples, not {array.dtype}")


def pcm16_to_bytes(samples: npt.ArrayLike) -> bytes:
    """int16 samples -> LINEAR16 bytes (signed 16-bit little-endian)."""
    return as_int16(samples, "samples").astype("<i2", copy=False).tobytes()


def bytes_to_pcm16(data: bytes) -> Samples:
    """LINEAR16 bytes (signed 16-bit little-endian) -> int16 samples (a new, writable array)."""
    if len(data) % 2:
        raise ValueError(f"LINEAR16 data must have an even byte count, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


_MULAW_BIAS: Final = 0x84
_MULAW_CLIP: Final = 32635
# exponent = index of the highest set bit of (biased magnitude >> 7), 0..7
_MULAW_EXPONENT: Final[_Int32Array] = np.array(
    [max(0, i.bit_length() - 1) for i in range(256)], dtype=np.int32
)


def _mulaw_decode_table() -> Samples:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


_MULAW_DECODE: Final = _mulaw_decode_table()


def mulaw_encode(samples: npt.ArrayLike) -> bytes:
    """int16 samples -> G.711 mu-law bytes (the classic Sun g711.c mapping: 0 -> 0xFF,
    -1 -> 0x7F, 32767 -> 0x80, -32768 -> 0x00)."""
    x: _Int32Array = as_int16(samples, "samples").astype(np.int32)
    sign: _Int32Array = np.where(x < 0, 0x80, 0).astype(np.int32)
    magnitude: _Int32Array = np.minimum(np.abs(x), _MULAW_CLIP) + _MULAW_BIAS
    exponent: _Int32Array = _MULAW_EXPONENT[magnitude >> 7]
    mantissa: _Int32Array = (magnitude >> (exponent + 3)) & 0x0F
    code: _Int32Array = ~(sign | (exponent << 4) | mantissa) & 0xFF
    return code.astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> Samples:
    """G.711 mu-law bytes -> int16 samples (0xFF and 0x7F -> 0, 0x80 -> 32124, 0x00 -> -32124)."""
    return _MULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


class Resampler:
    """Converts one stream of int16 samples from `from_rate` to `to_rate`, chunk by chunk: the
    filter state carries over, so the output does not depend on how the input was chunked (no
    clicks or drift at chunk edges). `flush()` returns the filter's tail at the end of the
    stream. Between equal rates it passes samples through untouched."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = (
            None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16")
        )

    def __call__(self, samples: Samples) -> Samples:
        if self._stream is None:
            return samples
        out: Samples = self._stream.resample_chunk(samples, last=False)
        return out

    def flush(self) -> Samples:
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out: Samples = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        return out
