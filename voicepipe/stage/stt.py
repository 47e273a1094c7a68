"""The speech-to-text side of the stage SDK: `SpeechEngine` is what an engine implements,
`SpeechToTextServicer` serves it as voice.v1.SpeechToTextService.Transcribe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe.pcm import Samples
from voicepipe.stage import Engine


@dataclass(frozen=True)
class TranscriptionSettings:
    """A validated TranscriptionConfig, as the engine sees it."""

    fmt: PcmFormat  # what the client sends
    language_code: str  # BCP-47, "en-US" when the client left it empty
    interim_results: bool
    end_of_utterance_silence_ms: int
    speech_start_ms: int
    correlation: common_pb2.Correlation


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began at `offset` (samples at the engine's rate, from the start of the call)."""

    offset: int


@dataclass(frozen=True)
class Transcript:
    """An interim or final transcript of the current utterance, with its span in samples at the
    engine's rate. After a final the SDK sends END_OF_UTTERANCE at `end` and the next utterance
    begins. `stability` applies to interims (the SDK sends 1.0 on finals), `confidence` to finals."""

    text: str
    is_final: bool
    start: int
    end: int
    stability: float = 0.0
    confidence: float = 0.0


SpeechEvent = SpeechStarted | Transcript


class SpeechEngine(Engine):
    """A speech recogniser. One instance per process, shared by every call."""

    def sample_rate(self, settings: TranscriptionSettings) -> int:
        """The rate the engine wants its audio at; the SDK resamples to it. The default is the
        client's own rate (no resampling)."""
        return settings.fmt.sample_rate

    def check(self, settings: TranscriptionSettings) -> None:
        """Rejects settings the engine cannot do (raise voicepipe.audio_format.InvalidInput)."""

    def transcribe(
        self, settings: TranscriptionSettings, audio: AsyncIterator[Samples]
    ) -> AsyncIterator[SpeechEvent]:
        """One call: consumes int16 mono audio at `sample_rate(settings)` (the iterator ends when
        the client half-closes) and yields events in the order the audio was spoken, ending after
        the last utterance is finalised. Every task it starts must be done when it returns or
        is closed."""
        raise NotImplementedError
