"""The text-to-speech side of the stage SDK: `VoiceEngine` is what an engine implements,
`TextToSpeechServicer` serves it as voice.v1.TextToSpeechService.Synthesize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from voice.v1 import common_pb2, text_to_speech_pb2
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


@dataclass(frozen=True)
class VoiceInfo:
    """A voice SynthesisConfig.voice may name."""

    name: str  # what to put in SynthesisConfig.voice
    description: str
    language_codes: tuple[str, ...] = ()  # BCP-47, most suitable first
    gender: str = ""  # "male", "female" or "" when unspecified


@dataclass(frozen=True)
class VoiceList:
    """What ListVoices answers: the voices, the variants any of them may take as "+variant", and
    whether any name at all is accepted (an engine with a single voice)."""

    voices: tuple[VoiceInfo, ...]
    variants: tuple[str, ...] = ()
    accepts_any_name: bool = False

    def to_proto(self) -> text_to_speech_pb2.ListVoicesResponse:
        return text_to_speech_pb2.ListVoicesResponse(
            voices=[
                text_to_speech_pb2.Voice(
                    name=voice.name,
                    description=voice.description,
                    language_codes=voice.language_codes,
                    gender=voice.gender,
                )
                for voice in self.voices
            ],
            variants=self.variants,
            accepts_any_name=self.accepts_any_name,
        )


class VoiceEngine(Engine):
    """A speech synthesiser. One instance per process, shared by every call."""

    def sample_rate(self, settings: SynthesisSettings) -> int:
        """The rate the engine produces; the SDK resamples to the client's. The default is the
        client's own rate."""
        return settings.fmt.sample_rate

    def check(self, settings: SynthesisSettings) -> None:
        """Rejects settings the engine cannot do, such as an unknown voice (raise InvalidInput)."""

    async def list_voices(self) -> VoiceList:
        """The voices `check` accepts, for ListVoices. The default: one voice, under any name."""
        return VoiceList(
            voices=(VoiceInfo(name="default", description="the only voice; any name selects it"),),
            accepts_any_name=True,
        )

    def synthesize(self, settings: SynthesisSettings, segment: Segment) -> AsyncIterator[SpeechAudio]:
        """Speaks one segment, yielding audio as it is produced (the first piece should leave
        before the whole segment is synthesised). Closing the iterator must stop the synthesis."""
        raise NotImplementedError
