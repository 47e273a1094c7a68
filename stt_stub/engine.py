"""The STT stub's engine: hears the stub audio code as it arrives. Words become interim
transcripts, an utterance's end a final one, held back by the latency profile's processing time
(as a real engine would take to finalise)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

from stubs import audio_code
from stubs.latency import ProfiledEngine, sleep_until
from voicepipe.pcm import Samples
from voicepipe.stage.stt import (
    Endpointing,
    SpeechEngine,
    SpeechEvent,
    SpeechStarted,
    Transcript,
    TranscriptionSettings,
)

# The stub's "model" is exact, but clients should not see certainty where a real engine has none.
INTERIM_STABILITY = 0.9
FINAL_CONFIDENCE = 0.99


class StubSpeechEngine(ProfiledEngine, SpeechEngine):
    role = "stt"
    # The audio code's own: its words are 60 ms apart and its utterances end with 250 ms.
    default_endpointing = Endpointing(
        audio_code.DEFAULT_END_OF_UTTERANCE_SILENCE_MS, audio_code.DEFAULT_SPEECH_START_MS
    )

    async def transcribe(
        self, settings: TranscriptionSettings, audio: AsyncIterator[Samples]
    ) -> AsyncGenerator[SpeechEvent, None]:
        decoder = audio_code.SpeechDecoder(
            settings.fmt.sample_rate,
            end_of_utterance_silence_ms=settings.end_of_utterance_silence_ms,
            speech_start_ms=settings.speech_start_ms,
        )
        async for samples in audio:
            for event in decoder.feed(samples):
                yield await self._event(event)
        for event in decoder.finish():
            yield await self._event(event)

    async def _event(self, event: audio_code.DecoderEvent) -> SpeechEvent:
        if isinstance(event, audio_code.SpeechStarted):
            return SpeechStarted(event.offset_samples)
        if isinstance(event, audio_code.WordDecoded):
            return Transcript(
                event.text_so_far, False, event.start_samples, event.end_samples, stability=INTERIM_STABILITY
            )
        await sleep_until(time.monotonic() + self.profile.stt_processing_ms / 1000)
        return Transcript(
            event.text, True, event.start_samples, event.end_samples, confidence=FINAL_CONFIDENCE
        )
