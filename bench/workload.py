"""What the simulated callers say, what they must get back, and how a turn is checked.

Every phrase is spoken in the stub audio code, so each transcript, each reply and each byte of
reply audio can be checked against what the deterministic stubs must produce."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from stubs import audio_code, replies
from voicepipe.stage.llm import Message
from voicepipe_client import PCM_16K, Utterance
from voicepipe_client.audio import FRAME_S, silent_frame

FORMAT = PCM_16K
SAMPLE_RATE = FORMAT.sample_rate
BYTES_PER_SECOND = SAMPLE_RATE * FORMAT.bytes_per_sample
# The server's split of the orchestrator-added latency (LatencyBreakdown), recorded per turn.
ADDED_PARTS = ("stt_round_trip", "llm_round_trip", "tts_round_trip", "orchestrator_processing")
SILENCE_FRAME = silent_frame(FORMAT)
# After the reply has played, the caller takes this long to start speaking again.
REACTION_S = 0.3
# Upper bound on end of speech -> first reply audio used to plan turns (not a pass mark).
PLANNED_TTFA_S = 1.2

_SHORT_QUESTIONS = ((12, 34), (7, 5), (23, 19), (41, 8), (3, 96), (58, 27), (14, 62), (9, 33))
_GREETINGS = ("hello there", "hi, how are you", "hey there")


@dataclass(frozen=True)
class Phrase:
    """One utterance of a caller and everything needed to check its turn."""

    kind: str  # short (one-sentence reply), medium (two sentences), long (a story, barged into)
    text: str
    utterance: Utterance  # 20 ms LINEAR16 frames: speech, then the code's trailing silence
    expected_user: str  # what STT must transcribe
    expected_reply: str  # what the LLM stub must answer
    reply_s: float  # duration of the reply audio
    barge_in_after_s: float | None = None  # speak over the reply after hearing this much of it

    @property
    def speech_s(self) -> float:
        return len(self.utterance.frames) * FRAME_S

    @property
    def cycle_s(self) -> float:
        """Time a caller needs for this turn, from its first frame to being ready for the next."""
        listen = self.barge_in_after_s if self.barge_in_after_s is not None else self.reply_s
        return self.speech_s + PLANNED_TTFA_S + listen + REACTION_S


def reply_audio_seconds(text: str) -> float:
    """Duration of the TTS stub's audio for `text` spoken as one segment."""
    rendered = audio_code.render(text, SAMPLE_RATE, trailing_silence_ms=audio_code.WORD_GAP_MS)
    return rendered.duration_seconds


@functools.lru_cache(maxsize=64)
def build_phrase(kind: str, text: str, barge_in_after_s: float | None = None) -> Phrase:
    expected_user = audio_code.normalize_text(text)
    expected_reply = replies.reply([Message("user", expected_user)])
    return Phrase(
        kind=kind,
        text=text,
        utterance=Utterance.spoken(audio_code.render, text, FORMAT),
        expected_user=expected_user,
        expected_reply=expected_reply,
        reply_s=reply_audio_seconds(expected_reply),
        barge_in_after_s=barge_in_after_s,
    )


def short_phrases() -> list[Phrase]:
    return [build_phrase("short", f"what is {a} plus {b}") for a, b in _SHORT_QUESTIONS]


def medium_phrases() -> list[Phrase]:
    return [build_phrase("medium", text) for text in _GREETINGS]


def long_phrase() -> Phrase:
    return build_phrase("long", "tell me a story", 1.0)


WORKLOADS = ("mixed", "compare", "short")


def script(workload: str, session_index: int) -> list[Phrase]:
    """The phrases a caller cycles through. `mixed` (the sweep): one-sentence and two-sentence
    replies alternating; `compare`: short, medium and a long reply that the caller interrupts
    after a second; `short`: one-sentence replies only."""
    shorts, mediums = short_phrases(), medium_phrases()
    k = session_index
    if workload == "mixed":
        pairs = [(shorts[(k + i) % len(shorts)], mediums[(k + i) % len(mediums)]) for i in range(8)]
        ordered = [p for pair in pairs for p in pair]
        return ordered if k % 2 == 0 else ordered[1:] + ordered[:1]
    if workload == "compare":
        return [shorts[k % len(shorts)], mediums[k % len(mediums)], long_phrase()]
    if workload == "short":
        return [shorts[(k + i) % len(shorts)] for i in range(len(shorts))]
    raise ValueError(f"unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}")


# --- checks ------------------------------------------------------------------------------------


@dataclass
class TurnOutcome:
    """What a caller observed of one turn (all times are time.monotonic())."""

    kind: str
    outcome: str = "open"  # completed | interrupted | failed | timeout
    user_text: str = ""
    agent_text: str = ""
    final_agent_text: str = ""
    heard_text: str = ""
    speech_end_at: float | None = None
    first_audio_at: float | None = None
    audio: bytearray = field(default_factory=bytearray)
    audio_bytes: int = 0
    chunks: int = 0
    late_chunks: int = 0
    max_late_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)  # as the server reported them
    problems: list[str] = field(default_factory=list)

    @property
    def ttfa_s(self) -> float | None:
        if self.speech_end_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.speech_end_at


def decode_reply(audio: bytes) -> str:
    """The text the reply audio speaks (the segments join into one utterance)."""
    if not audio:
        return ""
    samples = audio_code.bytes_to_pcm16(audio[: len(audio) - len(audio) % 2])
    return " ".join(audio_code.decode_utterances(samples, SAMPLE_RATE))


def check_turn(phrase: Phrase, turn: TurnOutcome, *, replies_expected: bool, check_audio: bool) -> None:
    """Appends to turn.problems whatever differs from what the stubs must produce."""
    problems = turn.problems
    if turn.user_text != phrase.expected_user:
        problems.append(f"transcript {turn.user_text!r} != spoken {phrase.expected_user!r}")
    if not replies_expected:
        return
    expected = phrase.expected_reply
    if turn.outcome == "completed":
        if turn.agent_text != expected or turn.final_agent_text != expected:
            problems.append(f"reply {turn.agent_text!r} != expected {expected!r}")
        if check_audio:
            heard = decode_reply(bytes(turn.audio))
            if heard != audio_code.normalize_text(expected):
                problems.append(f"reply audio says {heard!r}, expected {expected!r}")
    elif turn.outcome == "interrupted":
        if phrase.barge_in_after_s is None:
            problems.append("turn interrupted although the caller did not speak over it")
        if not expected.startswith(turn.agent_text) or not expected.startswith(turn.heard_text):
            problems.append(f"interrupted reply {turn.agent_text!r} is not a prefix of {expected!r}")
        if check_audio:
            heard = decode_reply(bytes(turn.audio))
            # The cut may fall inside a tone burst: only the last symbol may differ.
            if heard and not audio_code.normalize_text(expected).startswith(heard[:-1]):
                problems.append(f"interrupted reply audio says {heard!r}, not a prefix of {expected!r}")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of values, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
