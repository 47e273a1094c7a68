"""The text-to-speech side of the stage SDK: `VoiceEngine` is what an engine implements,
`TextToSpeechServicer` serves it as voice.v1.TextToSpeechService.Synthesize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe.pcm import Samples
from voicepipe.stage import Engine


@dataclass(frozen=True)
class SynthesisSettings:
    """A validated SynthesisConfig, as the engine sees it."""

    fmt: PcmFormat  # what the client wants back
    voice: str  # as the client named it; "" means the engine's default
    chunk_duration_ms: int
    correlation: common_pb2.Correlation


@dataclass(frozen=True)
class Segment:
    """One text segment to speak. `due` (time.monotonic()) is when it became due for synthesis:
    its flush, or the end of the request stream; time to first audio is measured from there."""

    segment_id: int
    text: str
    due: float


@dataclass(frozen=True)
class SpeechAudio:
    """Audio as the engine produces it, at `VoiceEngine.sample_rate(settings)`: once these samples
    have played, `segment.text[:text_end]` has been spoken (text_end never decreases within a
    segment and must reach len(text) with the last piece). Pieces may be any length; the SDK
    cuts them into the client's chunks."""

    samples: Samples
    text_end: int


class VoiceEngine(Engine):
    """A speech synthesiser. One instance per process, shared by every call."""

    def sample_rate(self, settings: SynthesisSettings) -> int:
        """The rate the engine produces; the SDK resamples to the client's. The default is the
        client's own rate."""
        return settings.fmt.sample_rate

    def check(self, settings: SynthesisSettings) -> None:
        """Rejects settings the engine cannot do, such as an unknown voice (raise InvalidInput)."""

    def synthesize(self, settings: SynthesisSettings, segment: Segment) -> AsyncIterator[SpeechAudio]:
        """Speaks one segment, yielding audio as it is produced (the first piece should leave
        before the whole segment is synthesised). Closing the iterator must stop the synthesis."""
        raise NotImplementedError
