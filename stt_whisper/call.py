"""One Transcribe call: voice activity decides where utterances start and end; the decode of a
final starts as soon as the speech pauses (so it runs during the endpointing silence) and is
discarded if speech resumes; interims re-decode the growing utterance when the decoder is idle.

With speculative results, that decode's text goes out as soon as it is ready, still in the pause:
the final confirms it (the same decode, not another) or a withdrawal follows when speech resumes.

When the client leaves the silence to the stage, each pause is judged: by its words (English: the
pause's decode stopping on a word no sentence ends on keeps the utterance open for the unfinished
silence, and nothing speculative goes out) and by the turn model, when there is one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from stt_whisper.agreement import LocalAgreement
from stt_whisper.decoder import SAMPLE_RATE, WINDOW_S, Hypothesis
from stt_whisper.endpoint import Ended, Endpointer, Held, Paused, Resumed, Started
from stt_whisper.scheduler import DecodeQueue, Urgency
from stt_whisper.turn_model import SILENCE_BEFORE_CHECK_MS, TurnEnd, TurnModel
from stt_whisper.unfinished_words import reads_unfinished
from stt_whisper.vad import WINDOW, SileroModel, VoiceActivity
from voicepipe.aio import cancel_and_wait
from voicepipe.pcm import Samples
from voicepipe.stage import StageError
from voicepipe.stage.blocking import BlockingWorker
from voicepipe.stage.stt import (
    SpeculationWithdrawn,
    SpeechEvent,
    SpeechStarted,
    Transcript,
    TranscriptionSettings,
)

log = logging.getLogger(__name__)

# Audio before the first voiced window that goes to the decoder (speech onsets are soft).
PRE_ROLL = SAMPLE_RATE // 5
# An utterance is cut into several finals before it outgrows Whisper's window (with room for
# the pre-roll and the trailing window).
MAX_UTTERANCE = (WINDOW_S - 3) * SAMPLE_RATE
# A cut is made at the latest pause if there was one in this much of the utterance's end.
CUT_SEARCH = 10 * SAMPLE_RATE


@dataclass(frozen=True)
class Shared:
    """What every call of the process shares: one model and its queue, one VAD."""

    decodes: DecodeQueue
    vad: SileroModel
    vad_runs: BlockingWorker  # Silero, and the turn model
    turn_model: TurnModel | None
    turn_end: TurnEnd


class CallAudio:
    """The call's audio from `base` on (older audio is dropped once an utterance is final)."""

    def __init__(self) -> None:
        self.base = 0
        self._data = bytearray()

    @property
    def end(self) -> int:
        return self.base + len(self._data) // 2

    def append(self, samples: Samples) -> None:
        self._data += samples.astype("<i2", copy=False).tobytes()

    def span(self, start: int, end: int) -> Samples:
        first, last = max(start, self.base) - self.base, min(end, self.end) - self.base
        return np.frombuffer(bytes(self._data[2 * first : 2 * last]), dtype="<i2").astype(np.int16)

    def drop_before(self, sample: int) -> None:
        new_base = min(sample, self.end)
        if new_base > self.base:
            del self._data[: 2 * (new_base - self.base)]
            self.base = new_base


@dataclass
class Decode:
    """A decode in flight for the audio from `start` to `end` (samples)."""

    task: asyncio.Task[Hypothesis]
    start: int
    end: int


class Utterance:
    def __init__(self, speech_start: int, audio_from: int) -> None:
        self.speech_start = speech_start
        self.audio_from = audio_from  # where its decoded audio begins (pre-roll included)
        self.agreement = LocalAgreement()
        self.paused = False
        self.pause_end = 0  # where its voiced audio ended, when it paused
        self.last_pause_cut = -1  # a sample inside its latest pause
        self.interim_at = speech_start  # where the last interim's audio ended


class CallTranscriber:
    def __init__(self, shared: Shared, settings: TranscriptionSettings, interim_interval_ms: int) -> None:
        self._shared = shared
        self._settings = settings
        self._language = settings.language_code.split("-")[0].lower()
        self._interim_every = SAMPLE_RATE * interim_interval_ms // 1000
        self._audio = CallAudio()
        self._vad = VoiceActivity(shared.vad)
        # The turn model judges each pause when the client left the silence to the stage.
        self._turn_model = shared.turn_model if settings.engine_silence else None
        # So do the words of each pause, in English.
        self._reads_words = settings.engine_silence and shared.turn_end.words and self._language == "en"
        self._words_unfinished: bool | None = None  # the current pause's words; None: not read yet
        # A pause that is judged lasts the unfinished silence unless judged finished: by its words
        # as soon as its decode is ready, and at the latest once it has lasted the hold, where
        # the verdict is awaited (the turn model's check runs there).
        hold_ms: int | None = None
        if self._turn_model is not None:
            hold_ms = SILENCE_BEFORE_CHECK_MS
        elif self._reads_words:
            hold_ms = settings.end_of_utterance_silence_ms
        self._endpointer = Endpointer(
            settings.speech_start_ms,
            settings.end_of_utterance_silence_ms if hold_ms is None else shared.turn_end.incomplete_ms,
            hold_ms=hold_ms,
        )
        self._utterance: Utterance | None = None
        self._candidate: Decode | None = None  # a final's decode, started when speech paused
        self._interim: Decode | None = None
        self._speculated: Transcript | None = None  # sent, not yet confirmed or withdrawn
        self._tasks: set[asyncio.Task[Any]] = set()

    async def events(self, audio: AsyncIterator[Samples]) -> AsyncGenerator[SpeechEvent, None]:
        try:
            async for samples in audio:
                self._audio.append(samples)
                probabilities = await self._shared.vad_runs.run(self._vad.feed, samples)
                self._read_words()  # a decode that ended while the audio was on its way
                for probability in probabilities:
                    for event in await self._step(probability):
                        yield event
                self._read_words()
                for result in (self._interim_result(), self._speculative_result()):
                    if result is not None:
                        yield result
            if self._utterance is not None:
                end = self._endpointer.voiced_end
                yield await self._final(end, min(end + WINDOW, self._audio.end))
        finally:
            await cancel_and_wait(*self._tasks)

    async def _step(self, probability: float) -> list[SpeechEvent]:
        boundary = self._endpointer.step(probability)
        position = self._endpointer.position
        utterance = self._utterance
        if isinstance(boundary, Started):
            self._utterance = Utterance(boundary.offset, max(self._audio.base, boundary.offset - PRE_ROLL))
            return [SpeechStarted(boundary.offset)]
        if utterance is None:
            # Between utterances only what the next one could start with is kept.
            self._audio.drop_before(position - PRE_ROLL - self._endpointer.start_samples)
            return []
        events: list[SpeechEvent] = []
        if isinstance(boundary, Paused):
            utterance.paused = True
            utterance.pause_end = boundary.end
            utterance.last_pause_cut = position
            self._cancel(self._interim)
            self._interim = None
            self._candidate = self._start(utterance, position, Urgency.FINAL)
        elif isinstance(boundary, Held):
            await self._judge_held_pause(utterance, position)
        elif isinstance(boundary, Resumed):
            utterance.paused = False
            self._words_unfinished = None
            self._cancel(self._candidate)
            self._candidate = None
            if self._speculated is not None:
                events.append(SpeculationWithdrawn(self._speculated.end))
                self._speculated = None
        elif isinstance(boundary, Ended):
            return [await self._final(boundary.end, boundary.end + WINDOW)]
        if position - utterance.audio_from >= MAX_UTTERANCE:
            return [*events, *await self._cut(utterance, position)]
        if not utterance.paused:
            self._maybe_start_interim(utterance, position)
        return events

    async def _cut(self, utterance: Utterance, position: int) -> list[SpeechEvent]:
        """Ends an overlong utterance at its latest pause (or here, if it had none lately) and
        begins the next one there, so no audio falls between them."""
        cut = utterance.last_pause_cut if utterance.last_pause_cut > position - CUT_SEARCH else position
        final = await self._final(min(cut, self._endpointer.voiced_end), cut)
        self._utterance = Utterance(cut, cut)
        return [final, SpeechStarted(cut)]

    async def _final(self, speech_end: int, audio_end: int) -> Transcript:
        utterance = self._utterance
        assert utterance is not None
        candidate, self._candidate = self._candidate, None
        self._speculated = None  # the final confirms it (the same decode, when it is the same audio)
        self._words_unfinished = None
        self._cancel(self._interim)
        self._interim = None
        if candidate is not None and (candidate.start, candidate.end) == (utterance.audio_from, audio_end):
            hypothesis = await candidate.task
        else:
            self._cancel(candidate)
            hypothesis = await self._decode(utterance, audio_end, Urgency.FINAL)
        self._utterance = None
        self._audio.drop_before(audio_end)
        return Transcript(
            hypothesis.text,
            is_final=True,
            start=utterance.speech_start,
            end=speech_end,
            confidence=hypothesis.confidence,
        )

    def _maybe_start_interim(self, utterance: Utterance, position: int) -> None:
        """Interims give way to finals: one only starts when no decode of any call is waiting."""
        if (
            not self._settings.interim_results
            or self._interim is not None
            or position - utterance.interim_at < self._interim_every
            or not self._shared.decodes.idle
        ):
            return
        utterance.interim_at = position
        self._interim = self._start(utterance, position, Urgency.INTERIM)

    def _interim_result(self) -> Transcript | None:
        interim, utterance = self._interim, self._utterance
        if interim is None or not interim.task.done() or utterance is None:
            return None
        self._interim = None
        if interim.task.cancelled() or interim.task.exception() is not None:
            return None  # refused under load: interims are the first thing to give way
        if utterance.paused or interim.start != utterance.audio_from:
            return None
        text = utterance.agreement.update(interim.task.result().words)
        if not text:
            return None
        stable = len(utterance.agreement.stable_text)
        return Transcript(
            text, is_final=False, start=utterance.speech_start, end=interim.end, stability=stable / len(text)
        )

    async def _judge_held_pause(self, utterance: Utterance, position: int) -> None:
        """The pause has lasted the hold: its verdict is awaited here, so that it holds whether or
        not more audio follows (the decode is the final's own: the final waited for it anyway).
        Then the turn model hears the whole utterance so far, up to `position` in the pause:
        Smart Turn's input is the turn with the silence it was trained to end on (see turn_model)."""
        if self._reads_words and self._words_unfinished is None:
            if self._candidate is not None:
                await asyncio.wait([self._candidate.task])
            self._read_words(held=True)
        if self._turn_model is None or self._words_unfinished:
            return
        audio = self._audio.span(utterance.audio_from, position)
        try:
            score = await self._shared.vad_runs.run(self._turn_model.complete, audio)
        except StageError:
            return  # refused under load: the unfinished silence
        silence_ms = self._pause_silence_ms(score)
        log.debug("pause judged", extra={"complete": round(score, 3), "silence_ms": silence_ms})
        self._endpointer.end_pause_after(silence_ms)

    def _read_words(self, *, held: bool = False) -> None:
        """Once the pause's decode is ready, its words judge it: words that leave the sentence
        open keep the unfinished silence (whatever the turn model would say); finished ones end
        the pause after the fixed silence, or leave it to the turn model. `held`: the pause has
        lasted its hold, and a pause without a decode of its own (one an overlong utterance was
        cut in) has no words to keep it open."""
        if not self._reads_words or self._words_unfinished is not None:
            return
        words = self._pause_words()
        if words is None:
            if not held:
                return
            words = ""
        self._words_unfinished = reads_unfinished(words)
        if self._words_unfinished:
            log.debug("pause judged by its words", extra={"unfinished": words[-40:]})
        if self._words_unfinished or self._turn_model is None:  # else the turn model decides
            self._endpointer.end_pause_after(self._pause_silence_ms(None))

    def _pause_silence_ms(self, complete: float | None) -> int:
        """The current pause's silence, by TurnEnd's rule (the bench applies the same)."""
        fixed_ms = self._settings.end_of_utterance_silence_ms
        return self._shared.turn_end.pause_silence_ms(bool(self._words_unfinished), complete, fixed_ms)

    def _pause_words(self) -> str | None:
        """The words of the current pause's decode: None while it runs (or out of a pause); empty
        when it failed (the final decodes again, and the pause is not held for it)."""
        candidate, utterance = self._candidate, self._utterance
        if candidate is None or utterance is None or not utterance.paused or not candidate.task.done():
            return None
        if candidate.task.cancelled() or candidate.task.exception() is not None:
            return ""
        return candidate.task.result().text

    def _speculative_result(self) -> Transcript | None:
        """The pause's decode, once ready, while the utterance is still paused (and, where words
        are judged, once they read finished)."""
        candidate, utterance = self._candidate, self._utterance
        if (
            not self._settings.speculative_results
            or (self._reads_words and self._words_unfinished is not False)
            or self._speculated is not None
            or candidate is None
            or utterance is None
            or not utterance.paused
            or not candidate.task.done()
            or candidate.task.cancelled()
            or candidate.task.exception() is not None  # the final meets it again and reports it
        ):
            return None
        text = candidate.task.result().text
        if not text:
            return None
        self._speculated = Transcript(
            text, is_final=False, start=utterance.speech_start, end=utterance.pause_end, speculative=True
        )
        return self._speculated

    def _start(self, utterance: Utterance, end: int, urgency: Urgency) -> Decode:
        # The audio is taken now: by the time the task runs, later windows may have ended the
        # utterance and dropped it.
        task = asyncio.create_task(
            self._decode(utterance, end, urgency), name=f"whisper-{urgency.name.lower()}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Decode(task, utterance.audio_from, end)

    def _decode(self, utterance: Utterance, end: int, urgency: Urgency) -> Coroutine[Any, Any, Hypothesis]:
        """Interims are asked to continue the words already reported stable; a final is decoded
        afresh from the whole utterance (it may correct them: it is the better transcript)."""
        audio = self._audio.span(utterance.audio_from, end)
        prefix = utterance.agreement.stable_text if urgency == Urgency.INTERIM else ""
        return self._shared.decodes.decode(audio, self._language, prefix, urgency)

    @staticmethod
    def _cancel(decode: Decode | None) -> None:
        """A decode nobody will use: dropped from the queue if it has not started. (Its holder
        forgets it: a cancelled task is only marked cancelled once it has run again.)"""
        if decode is not None:
            decode.task.cancel()
