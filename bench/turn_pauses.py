"""Mid-sentence pauses and finished sentences: the fixed silence against the turn model, and the
turn model's threshold and two silences chosen by measurement.

    python -m bench.turn_pauses [--pauses-ms 300,500,700,1000] [--voices en-gb,en-us,en-us+f3]
                                [--check-after-ms 200]

The test set:
- SPLIT, phrases spoken by espeak-ng in each voice with a pause after an unfinished first part
  ("can you tell me about the … opening hours"), that part spoken as a sentence and as a clause,
  and a human reader's pause inside a sentence: each should be heard as one utterance;
- WHOLE, finished sentences in each voice, and the human recordings of finished sentences of
  pocketsphinx-testdata (bench.recordings): each should end promptly, and be heard whole too.

Verdicts: every phrase goes through the Whisper stage's own voice activity, endpointing and turn
model (stt_whisper's Silero, Endpointer and TurnModel, as a call runs them), which gives each pause
its length and the turn model's score at its check, and its words: Whisper's decode of the
utterance up to the pause's first silent window, as the stage decodes it (stt_whisper.call). The
table then applies each setting's rule (stt_whisper.turn_model.TurnEnd) to those pauses: a phrase
is heard whole when no pause inside it lasts the silence its score (and, with "words", its words)
chose; a finished sentence's endpoint waits the silence chosen at its last pause (never less than
the check's own 200 ms, plus the check's run time)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass

import numpy as np

from bench.recordings import all_recordings, cards, librivox
from stt_whisper.call import PRE_ROLL
from stt_whisper.decoder import ModelSettings, WhisperDecoder
from stt_whisper.endpoint import Ended, Endpointer, Held, Paused, Resumed, Started
from stt_whisper.engine import FIXED_SILENCE_MS, SPEECH_START_MS
from stt_whisper.turn_model import DEFAULT_PATH, SILENCE_BEFORE_CHECK_MS, TurnEnd, TurnModel
from stt_whisper.unfinished_words import reads_unfinished
from stt_whisper.vad import WINDOW, SileroModel, VoiceActivity
from tts_espeak.speaker import EspeakSpeaker
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples

RATE = 16_000
LEAD = np.zeros(RATE // 2, np.int16)
TAIL = np.zeros(RATE * 3 // 2, np.int16)
SPLIT = (
    ("can you tell me about the", "opening hours"),
    ("and then I went to the", "station"),
    ("my account number is", "four five six"),
    ("I would like to", "book a table for two"),
    ("the reason I am calling is that", "my card was blocked"),
    ("could you send me the", "invoice for March"),
    ("my phone number is", "seven one two three"),
    ("I was wondering if", "you could help me"),
    ("the problem is that", "the heating does not work"),
    ("I need to change my", "delivery address"),
    ("can you check whether", "my parcel has arrived"),
    ("we are looking for a", "room with a view"),
)
WHOLE = (
    "What time do you open tomorrow?",
    "Please cancel my order.",
    "Thank you, that is all.",
    "I need a taxi to the airport.",
    "Yes.",
    "Can I speak to a person?",
    "My account number is four five six.",
    "No, thank you.",
    "That sounds good to me.",
    "I would like to book a table for two.",
    "Where is the nearest station?",
    "Okay.",
)
# How the unfinished first part is spoken: as a sentence of its own (espeak's falling, final
# intonation), or as a clause that goes on (a comma: espeak's continuing intonation).
ENDINGS = {"sentence": "", "clause": ","}
# A human reader's pause inside one sentence: "he was not an ill disposed young man, | unless to
# be rather cold hearted …" is one sentence of Sense and Sensibility read as two recordings.
HUMAN_SPLIT = ("sense_and_sensibility_01_austen_64kb-0880", "sense_and_sensibility_01_austen_64kb-0890")
VOICED = 1000  # of 32767: the recordings' speech begins and ends where they first and last reach it
MARGIN = RATE // 20  # kept around it (soft onsets and endings)
THRESHOLDS = (0.5, 0.7, 0.9)
COMPLETE_MS = (200, 300, 400)
INCOMPLETE_MS = (800, 1200)
# The fixed silence alone, and with the words' long silence.
FIXED_VARIANTS = ((False, 1200), (True, 800), (True, 1200))


@dataclass(frozen=True)
class Pause:
    ms: float  # its silence, from the end of the voiced audio to speech resuming (inf: the end)
    complete: float | None  # the turn model's score, if the pause lasted until its check
    words: str  # what Whisper heard up to the pause


@dataclass(frozen=True)
class Phrase:
    name: str
    audio: Samples
    pause_at: int | None  # the sample where the phrase's mid-sentence pause starts (SPLIT only)


@dataclass(frozen=True)
class Heard:
    """A phrase's pauses; `mid` is the index of its mid-sentence pause (SPLIT)."""

    phrase: Phrase
    pauses: list[Pause]
    mid: int | None


class Judge:
    """A call's voice activity, endpointing and turn model, run over whole recordings."""

    def __init__(self, check_after_ms: int) -> None:
        self._check_after_ms = check_after_ms
        self._silero = SileroModel()
        self._model = TurnModel(DEFAULT_PATH)
        flags = FlagParser("stt", "the stage's Whisper model")
        ModelSettings.add_flags(flags)
        self._whisper = WhisperDecoder(ModelSettings.from_args(flags.parse([])))
        self.check_s: list[float] = []

    def __call__(self, phrase: Phrase) -> Heard:
        vad = VoiceActivity(self._silero)
        endpointer = Endpointer(SPEECH_START_MS, 10_000, hold_ms=self._check_after_ms or None)
        audio = np.concatenate([phrase.audio, TAIL])
        pauses: list[Pause] = []
        start = pause_end = 0
        score: float | None = None
        words = ""
        mid = None
        for probability in vad.feed(audio):
            boundary = endpointer.step(probability)
            if isinstance(boundary, Started):
                start = boundary.offset
            elif isinstance(boundary, Paused):
                pause_end, score = boundary.end, None
                heard = audio[max(0, start - PRE_ROLL) : endpointer.position]
                words = self._whisper.decode(heard, "en").text
                if mid is None and phrase.pause_at is not None and boundary.end >= phrase.pause_at - WINDOW:
                    mid = len(pauses)
            if isinstance(boundary, Held) or (isinstance(boundary, Paused) and not self._check_after_ms):
                began = time.perf_counter()
                score = self._model.complete(audio[max(0, start - PRE_ROLL) : endpointer.position])
                self.check_s.append(time.perf_counter() - began)
            if isinstance(boundary, Resumed):
                resumed = endpointer.position - WINDOW
                pauses.append(Pause((resumed - pause_end) * 1000 / RATE, score, words))
            assert not isinstance(boundary, Ended)
        pauses.append(Pause(float("inf"), score, words))
        return Heard(phrase, pauses, mid)


@dataclass(frozen=True)
class SplitAudio:
    """A SPLIT phrase spoken with its pause: the pause starts at `pause_at`, speech ends at
    `speech_end` (espeak's trailing silence follows)."""

    audio: Samples
    pause_at: int
    speech_end: int


def split_audio(speaker: EspeakSpeaker, first: str, second: str, ending: str, pause_ms: int) -> SplitAudio:
    """LEAD, the first part (ending as ENDINGS[ending]) up to its speech end, `pause_ms` of
    silence, the second part."""
    a, b = speaker(first + ENDINGS[ending], RATE), speaker(second, RATE)
    gap = np.zeros(RATE * pause_ms // 1000, np.int16)
    audio = np.concatenate([LEAD, a.samples[: a.speech_end_samples], gap, b.samples])
    pause_at = len(LEAD) + a.speech_end_samples
    return SplitAudio(audio, pause_at, pause_at + len(gap) + b.speech_end_samples)


def spoken(voices: list[str], pause_ms: int, ending: str) -> tuple[list[Phrase], list[Phrase]]:
    """SPLIT with its pause (its first part ending as ENDINGS[ending]), and WHOLE, in each voice;
    then the human recordings."""
    split, whole = [], []
    for voice in voices:
        speaker = EspeakSpeaker(voice)
        try:
            for first, second in SPLIT:
                spoken_split = split_audio(speaker, first, second, ending, pause_ms)
                name = f"{voice} ({ending}): {first} … {second}"
                split.append(Phrase(name, spoken_split.audio, spoken_split.pause_at))
            for text in WHOLE:
                c = speaker(text, RATE)
                whole.append(
                    Phrase(
                        f"{voice}: {text}", np.concatenate([LEAD, c.samples[: c.speech_end_samples]]), None
                    )
                )
        finally:
            speaker.close()
    for recording in [*all_recordings(), *cards()]:
        whole.append(Phrase(f"human: {recording.reference}", recording.audio, None))
    return split, whole


def human_split(pause_ms: int) -> Phrase:
    """HUMAN_SPLIT's two recordings, their own silences trimmed to MARGIN, `pause_ms` between."""
    first, second = (next(r for r in librivox() if r.name == name).audio for name in HUMAN_SPLIT)
    end = int(np.flatnonzero(np.abs(first.astype(np.int32)) > VOICED)[-1]) + MARGIN
    start = max(0, int(np.flatnonzero(np.abs(second.astype(np.int32)) > VOICED)[0]) - MARGIN)
    gap = np.zeros(RATE * pause_ms // 1000, np.int16)
    audio = np.concatenate([LEAD, first[:end], gap, second[start:]])
    return Phrase("human: he was not an ill disposed young man … unless to be", audio, len(LEAD) + end)


def with_pause(heard: Heard, pause_ms: int, longest_ms: int) -> Heard:
    """The same phrase with a shorter mid-sentence pause: only that pause's length changes (the
    score at its check does not: the check comes before the pause's length makes a difference)."""
    assert heard.mid is not None
    pauses = list(heard.pauses)
    pauses[heard.mid] = dataclasses.replace(
        pauses[heard.mid], ms=pauses[heard.mid].ms - (longest_ms - pause_ms)
    )
    return dataclasses.replace(heard, pauses=pauses)


def ends_after(pause: Pause, turn_end: TurnEnd) -> float:
    """The silence that ends an utterance at this pause, by the stage's rule (TurnEnd); with a
    turn model, never before its check."""
    silence = turn_end.pause_silence_ms(reads_unfinished(pause.words), pause.complete, FIXED_SILENCE_MS)
    return silence if turn_end.model_path is None else max(silence, SILENCE_BEFORE_CHECK_MS)


def whole(heard: Heard, turn_end: TurnEnd) -> bool:
    return all(p.ms < ends_after(p, turn_end) for p in heard.pauses[:-1])


def finished(turn_end: TurnEnd, heard: list[Heard], check_ms: float) -> str:
    """The finished sentences' columns: heard whole, when their endpoint came, how many were
    judged unfinished (by the turn model or their words)."""
    kept = sum(whole(h, turn_end) for h in heard)
    check = check_ms if turn_end.model_path is not None else 0
    waits = [ends_after(h.pauses[-1], turn_end) + check for h in heard]
    late = sum(ends_after(h.pauses[-1], turn_end) >= turn_end.incomplete_ms for h in heard)
    median, longest = statistics.median(waits), max(waits)
    return f"{kept} of {len(heard)} | {median:.0f} / {longest:.0f} | {late} of {len(heard)} |"


def table(pauses_ms: list[int], voices: list[str], check_after_ms: int) -> None:
    judge = Judge(check_after_ms)
    longest = max(pauses_ms)
    heard_split = {}
    for ending in ENDINGS:
        split_phrases, whole_phrases = spoken(voices, longest, ending)
        heard_split[f"espeak, first part as a {ending}"] = [judge(p) for p in split_phrases]
    heard_split["human reader"] = [judge(human_split(longest))]
    missed = [h.phrase.name for hs in heard_split.values() for h in hs if h.mid is None]
    assert not missed, f"no mid-sentence pause found in {missed}"
    heard_whole = [judge(p) for p in whole_phrases]
    check_ms = statistics.median(judge.check_s) * 1000
    print(
        f"turn model checked after {check_after_ms} ms of silence (0: at the first silent window):"
        f" {check_ms:.0f} ms per check, median over {len(judge.check_s)} (added to its waits)"
    )
    print(
        "| endpointing | "
        + " | ".join(f"SPLIT, {kind}: whole at {'/'.join(map(str, pauses_ms))} ms" for kind in heard_split)
        + " | finished sentences heard whole | finished: endpoint after (ms) median / max"
        " | finished judged unfinished (waiting the long silence) |"
    )
    print("|---" * (len(heard_split) + 4) + "|")
    turn_ends = [
        TurnEnd(DEFAULT_PATH, complete_ms, incomplete_ms, threshold, words)
        for words, threshold, complete_ms, incomplete_ms in itertools.product(
            (False, True), THRESHOLDS, COMPLETE_MS, INCOMPLETE_MS
        )
    ]
    fixed = [TurnEnd(None, FIXED_SILENCE_MS, incomplete, 0.5, words) for words, incomplete in FIXED_VARIANTS]
    variants = [
        *(
            (
                f"fixed {FIXED_SILENCE_MS} ms"
                + (f", unfinished words {t.incomplete_ms} ms" if t.words else ""),
                t,
            )
            for t in fixed
        ),
        *((f"turn model {t.describe()}", t) for t in turn_ends),
    ]
    for label, turn_end in variants:
        split = [
            " / ".join(str(sum(whole(with_pause(h, ms, longest), turn_end) for h in hs)) for ms in pauses_ms)
            + f" of {len(hs)}"
            for hs in heard_split.values()
        ]
        print(f"| {label} | {' | '.join(split)} | {finished(turn_end, heard_whole, check_ms)}", flush=True)
    heard_all = [h for hs in heard_split.values() for h in hs] + heard_whole
    print("\nscores at each pause (mid-sentence pause first for SPLIT; '-' = not checked):")
    for heard in heard_all:
        order = [heard.mid] if heard.mid is not None else []
        order += [i for i in range(len(heard.pauses)) if i != heard.mid]
        scores = [
            ("-" if (s := heard.pauses[i].complete) is None else f"{s:.2f}")
            + (" (unfinished words)" if reads_unfinished(heard.pauses[i].words) else "")
            for i in order
        ]
        words = [heard.pauses[i].words for i in order]
        print(f"  {heard.phrase.name}: {', '.join(scores)}; heard at the pauses: {words}")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_pauses", description=__doc__)
    parser.add_argument(
        "--pauses-ms", default="300,500,700,1000", help="mid-sentence pauses, comma-separated"
    )
    parser.add_argument("--voices", default="en-gb,en-us,en-us+f3", help="espeak-ng voices, comma-separated")
    parser.add_argument(
        "--check-after-ms",
        type=int,
        default=SILENCE_BEFORE_CHECK_MS,
        help="the silence before the turn model's check (the stage's; 0: at the first silent window)",
    )
    args = parser.parse_args()
    if not DEFAULT_PATH.is_file():
        parser.error(f"no turn model at {DEFAULT_PATH}: install it with python -m stt_whisper.turn_model")
    pauses_ms = [int(p) for p in _names(args.pauses_ms)]
    voices = _names(args.voices)
    table(pauses_ms, voices, args.check_after_ms)


if __name__ == "__main__":
    main()
