"""Validation and conversion of the audio formats the contracts allow, shared by every service
that accepts audio, so that all of them reject the same bad input with the same message."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from voice.v1 import common_pb2
from voicepipe import pcm

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
DEFAULT_SAMPLE_RATE = 16_000
# One audio message may hold at most this much audio (any rate, any encoding).
MAX_AUDIO_MESSAGE_SECONDS = 2

LINEAR16 = common_pb2.AUDIO_ENCODING_LINEAR16
MULAW = common_pb2.AUDIO_ENCODING_MULAW


class InvalidInput(ValueError):
    """Client input that breaks the contract; servers answer it with INVALID_ARGUMENT."""


@dataclass(frozen=True)
class PcmFormat:
    """A validated mono audio format."""

    encoding: common_pb2.AudioEncoding.ValueType
    sample_rate: int

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == LINEAR16 else 1

    @property
    def max_message_bytes(self) -> int:
        return MAX_AUDIO_MESSAGE_SECONDS * self.sample_rate * self.bytes_per_sample

    def to_proto(self) -> common_pb2.AudioFormat:
        return common_pb2.AudioFormat(
            encoding=self.encoding, sample_rate_hertz=self.sample_rate, channel_count=1
        )

    def describe(self) -> str:
        name = "LINEAR16" if self.encoding == LINEAR16 else "MULAW"
        return f"{name} {self.sample_rate} Hz mono"

    def bytes_for(self, milliseconds: float) -> int:
        return int(self.sample_rate * milliseconds / 1000) * self.bytes_per_sample

    def decode(self, data: bytes) -> npt.NDArray[np.int16]:
        """Audio bytes in this format -> int16 samples. Call check_message first."""
        if self.encoding == LINEAR16:
            return pcm.bytes_to_pcm16(data)
        return pcm.mulaw_decode(data)

    def encode(self, samples: npt.NDArray[np.int16]) -> bytes:
        if self.encoding == LINEAR16:
            return pcm.pcm16_to_bytes(samples)
        return pcm.mulaw_encode(samples)

    def check_message(self, data: bytes) -> None:
        """Rejects an audio message that is empty, too large, or not whole samples."""
        if not data:
            raise InvalidInput("audio message is empty; send at least one sample")
        if len(data) > self.max_message_bytes:
            raise InvalidInput(
                f"audio message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}"
                f" bytes ({MAX_AUDIO_MESSAGE_SECONDS} s of {self.describe()})"
            )
        if len(data) % self.bytes_per_sample:
            raise InvalidInput(
                f"audio message of {len(data)} bytes is not a whole number of 16-bit LINEAR16 samples"
                " (odd byte count)"
            )


def parse_audio_format(fmt: common_pb2.AudioFormat, field: str) -> PcmFormat:
    """Validates an AudioFormat (unset rate and channels take their defaults)."""
    if fmt.encoding not in (LINEAR16, MULAW):
        known = fmt.encoding in common_pb2.AudioEncoding.values()
        name = common_pb2.AudioEncoding.Name(fmt.encoding) if known else str(fmt.encoding)
        raise InvalidInput(f"{field}.encoding {name} is not supported; use LINEAR16 or MULAW")
    rate = fmt.sample_rate_hertz or DEFAULT_SAMPLE_RATE
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidInput(
            f"{field}.sample_rate_hertz {rate} is out of range; use {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}"
        )
    if fmt.channel_count not in (0, 1):
        raise InvalidInput(f"{field}.channel_count {fmt.channel_count} is not supported; only mono (1)")
    return PcmFormat(encoding=fmt.encoding, sample_rate=rate)
