"""The STT stub's engine: hears the stub audio code as it arrives. Words become interim
transcripts, an utterance's end a final one, held back by the latency profile's processing time
(as a real engine would take to finalise)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np

from stubs import audio_code
from stubs.latency import ProfiledEngine, sleep_until
from voicepipe.pcm import Samples
from voicepipe.stage.stt import (
    Endpointing,
    SpeculationWithdrawn,
    SpeechEngine,
    SpeechEvent,
    SpeechStarted,
    Transcript,
    TranscriptionSettings,
)

# The stub's "model" is exact, but clients should not see certainty where a real engine has none.
INTERIM_STABILITY = 0.9
FINAL_CONFIDENCE = 0.99
# A silence after a word this long is a pause, not the gap before the code's next word (60 ms):
# the utterance so far goes out as a speculative transcript.
SPECULATE_AFTER_MS = audio_code.WORD_GAP_MS + 20
SPECULATION_STEP_MS = 10


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
        pause = Pause(decoder, settings)
        async for samples in audio:
            for piece in pause.pieces(samples):
                for event in decoder.feed(piece):
                    for item in pause.before(event):
                        yield item
                    yield await self._event(event, pause)
                for item in pause.after_audio():
                    if isinstance(item, Transcript):  # decoded as a real engine would, in the pause
                        await sleep_until(time.monotonic() + self.profile.stt_processing_ms / 1000)
                    yield item
        for event in decoder.finish():
            for item in pause.before(event):
                yield item
            yield await self._event(event, pause)

    async def _event(self, event: audio_code.DecoderEvent, pause: Pause) -> SpeechEvent:
        if isinstance(event, audio_code.SpeechStarted):
            return SpeechStarted(event.offset_samples)
        if isinstance(event, audio_code.WordDecoded):
            pause.heard(event)
            return Transcript(
                event.text_so_far, False, event.start_samples, event.end_samples, stability=INTERIM_STABILITY
            )
        if not pause.confirmed:  # a confirmed speculative transcript was decoded already
            await sleep_until(time.monotonic() + self.profile.stt_processing_ms / 1000)
        pause.reset()
        return Transcript(
            event.text, True, event.start_samples, event.end_samples, confidence=FINAL_CONFIDENCE
        )


class Pause:
    """Speculation on the stub code: once the silence after a word outlasts the gap between the
    code's words, the utterance so far is sent as a speculative transcript; it is withdrawn when
    the code resumes before the utterance ends, and confirmed by a final of the same words."""

    def __init__(self, decoder: audio_code.SpeechDecoder, settings: TranscriptionSettings) -> None:
        self._decoder = decoder
        self._enabled = settings.speculative_results
        self._after = audio_code.ms_to_samples(SPECULATE_AFTER_MS, settings.fmt.sample_rate)
        self._step = audio_code.ms_to_samples(SPECULATION_STEP_MS, settings.fmt.sample_rate)
        self._so_far: audio_code.WordDecoded | None = None  # the utterance so far
        self._speculated: Transcript | None = None
        self.confirmed = False

    def pieces(self, samples: Samples) -> list[Samples]:
        """The audio cut at every SPECULATION_STEP_MS of the stream, where the pause is looked at:
        so the results do not depend on how the client split its audio."""
        if not self._enabled:
            return [samples]
        first = -self._decoder.samples_consumed % self._step or self._step
        cuts = range(first, samples.size, self._step)
        return [piece for piece in np.split(samples, list(cuts)) if piece.size]

    def heard(self, word: audio_code.WordDecoded) -> None:
        self._so_far = word

    def before(self, event: audio_code.DecoderEvent) -> list[SpeechEvent]:
        """What goes out before the decoder's next event: a word after the speculative
        transcript, or an end elsewhere, withdraws it; an end at the same place confirms it."""
        speculated = self._speculated
        if speculated is None or isinstance(event, audio_code.SpeechStarted):
            return []
        if isinstance(event, audio_code.UtteranceEnded):
            self.confirmed = (speculated.text, speculated.end) == (event.text, event.end_samples)
            if self.confirmed:
                return []
        return self._withdraw()

    def after_audio(self) -> list[SpeechEvent]:
        """After a piece of audio: the speculative transcript, or its withdrawal."""
        decoder, speculated, so_far = self._decoder, self._speculated, self._so_far
        if speculated is not None:
            return self._withdraw() if decoder.last_voiced_end != speculated.end else []
        if (
            not self._enabled
            or so_far is None
            or not decoder.in_utterance
            or decoder.samples_consumed - decoder.last_voiced_end < self._after
        ):
            return []
        self._speculated = Transcript(
            so_far.text_so_far, False, so_far.start_samples, decoder.last_voiced_end, speculative=True
        )
        return [self._speculated]

    def _withdraw(self) -> list[SpeechEvent]:
        assert self._speculated is not None
        withdrawn = SpeculationWithdrawn(self._speculated.end)
        self._speculated = None
        return [withdrawn]

    def reset(self) -> None:
        self._so_far = None
        self._speculated = None
        self.confirmed = False
