"""Turns assembled from Converse events: what the caller received of each agent turn.

A turn the caller starts (by speaking or typing) exists from that moment as an expected turn;
the server's next TurnStarted is matched to the oldest expected one, so the caller holds the
record before the server has named it. Times are time.monotonic()."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat


@dataclass(eq=False)
class Turn:
    """Everything the caller saw of one agent turn."""

    turn_id: str = ""  # "" until the server starts the turn
    user_text: str = ""
    agent_text: str = ""
    audio: bytearray = field(default_factory=bytearray)  # empty if the assembler keeps no audio
    audio_bytes: int = 0
    chunks: int = 0
    # Chunks that arrived after playback (started at the first chunk) had reached them: gaps.
    late_chunks: int = 0
    max_late_s: float = 0.0
    completed: pb.TurnCompleted | None = None
    interrupted: pb.TurnInterrupted | None = None
    errors: list[pb.SessionError] = field(default_factory=list)
    speech_ended_at: float | None = None  # the user's last voiced frame left, or the text turn
    started_at: float | None = None
    first_audio_at: float | None = None
    ended_at: float | None = None
    # Set when the turn starts or the call ends; at its first audio or its end (without audio);
    # when it ends (completed, interrupted, failed, or the call ended).
    started: asyncio.Event = field(default_factory=asyncio.Event)
    first_audio: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ended(self) -> bool:
        """The server said how the turn ended."""
        return self.completed is not None or self.interrupted is not None or bool(self.errors)

    @property
    def outcome(self) -> str:
        if self.completed is not None:
            return "completed"
        if self.interrupted is not None:
            return "interrupted"
        return "failed" if self.errors else "open"

    @property
    def heard_text(self) -> str | None:
        """What the user heard of an interrupted reply (None if not interrupted)."""
        return None if self.interrupted is None else self.interrupted.heard_text

    @property
    def withdrawn(self) -> bool:
        """The user went on speaking before they could have heard the reply: the turn answered
        a pause in their utterance, and the next turn answers the whole of it."""
        return self.interrupted is not None and self.interrupted.withdrawn

    @property
    def ttfa_s(self) -> float | None:
        if self.speech_ended_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.speech_ended_at

    def playback_end(self, bytes_per_second: int) -> float | None:
        """When a listener who started playing at the first chunk reaches the end of the audio."""
        if self.first_audio_at is None:
            return None
        return self.first_audio_at + self.audio_bytes / bytes_per_second

    def _restart(self) -> None:
        """Forgets what the server sent of the turn: it will be played again from the start (the
        conversation moved to another call before a ticket covered it)."""
        fresh = Turn(speech_ended_at=self.speech_ended_at)
        for kept in dataclasses.fields(self):
            if kept.name not in ("started", "first_audio", "done"):  # waited on: cleared instead
                setattr(self, kept.name, getattr(fresh, kept.name))
        for event in (self.started, self.first_audio, self.done):
            event.clear()

    def _end(self, now: float) -> None:
        if self.ended_at is None:
            self.ended_at = now
        self.started.set()
        self.first_audio.set()
        self.done.set()


class EventListener(Protocol):
    """Told of every event after it was assembled, and of the end of the call."""

    def on_event(self, response: pb.ConverseResponse) -> None: ...

    def on_end(self) -> None: ...


class TurnAssembler:
    """Builds Turn records from the events of one Converse call, in arrival order.

    `keep_audio=False` counts reply audio without keeping it (a load generator's callers).
    `transcripts_start_turns` is for an endpoint that answers with transcripts only, such as the
    benchmark's transport-floor relay: a final transcript starts the next expected turn, and turn
    events without a turn id belong to it."""

    def __init__(
        self,
        output_format: PcmFormat,
        *,
        keep_audio: bool = True,
        transcripts_start_turns: bool = False,
        listener: EventListener | None = None,
    ) -> None:
        self.bytes_per_second = output_format.sample_rate * output_format.bytes_per_sample
        self.keep_audio = keep_audio
        self.transcripts_start_turns = transcripts_start_turns
        self.listener = listener
        self.session_id = ""
        self.session_started = asyncio.Event()
        self.turns: list[Turn] = []  # in the order the server started them
        self.transcripts: list[str] = []  # final user transcripts
        self._transcript_ends: list[float] = []  # where each ends in the caller audio (s)
        self.errors: list[pb.SessionError] = []  # every error, in order
        self.session_errors: list[pb.SessionError] = []  # those of no turn (STT)
        self.stray_events = 0  # turn events of a turn the server never started
        self._expected: collections.deque[Turn] = collections.deque()
        self._by_id: dict[str, Turn] = {}

    def expect(self, turn: Turn) -> None:
        """The caller has started `turn` (its speech or text has left): the next TurnStarted not
        matched yet is matched to it."""
        self._expected.append(turn)

    def give_up(self, turn: Turn) -> None:
        """Stops expecting `turn`: a later TurnStarted goes to the next expected turn instead."""
        if turn in self._expected:
            self._expected.remove(turn)

    def turn(self, turn_id: str) -> Turn | None:
        return self._by_id.get(turn_id)

    def handle(self, response: pb.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "reply_audio":
            turn = self._by_id.get(response.correlation.turn_id)
            if turn is None:
                self.stray_events += 1
            else:
                self._audio(turn, response.reply_audio.audio, time.monotonic())
        elif kind == "agent_text":
            if (turn := self._of(response)) is not None:
                turn.agent_text += response.agent_text.text
        elif kind == "turn_started":
            self._start(response.correlation.turn_id, response.turn_started.user_text)
        elif kind == "user_transcript":
            if response.user_transcript.is_final:
                self.transcripts.append(response.user_transcript.text)
                self._transcript_ends.append(response.user_transcript.audio_end_offset.ToNanoseconds() / 1e9)
                if self.transcripts_start_turns:
                    self._start(response.correlation.turn_id, response.user_transcript.text)
        elif kind == "turn_completed":
            if (turn := self._of(response)) is not None:
                turn.completed = response.turn_completed
                turn._end(time.monotonic())
        elif kind == "turn_interrupted":
            if (turn := self._of(response)) is not None:
                turn.interrupted = response.turn_interrupted
                turn._end(time.monotonic())
        elif kind == "error":
            self.errors.append(response.error)
            if (turn := self._by_id.get(response.correlation.turn_id)) is not None:
                turn.errors.append(response.error)
                turn._end(time.monotonic())
            else:
                self.session_errors.append(response.error)
        elif kind == "session_started":
            self.session_id = response.session_started.session_id
            self.session_started.set()
        if self.listener is not None:
            self.listener.on_event(response)

    def moved(self, turns_covered: int, audio_covered_s: float) -> None:
        """The conversation goes on with a new call, from a ticket that covers the first
        `turns_covered` turns and the caller audio before `audio_covered_s`. The turns after
        those will be played again (the server redoes them from the audio and text the caller
        sends again): they are expected anew, first; the transcripts of that audio will come
        again."""
        again = [
            turn for turn in self.turns if not (turn.turn_id.isdigit() and int(turn.turn_id) <= turns_covered)
        ]
        for turn in again:
            self.turns.remove(turn)
            del self._by_id[turn.turn_id]
            turn._restart()
        self._expected.extendleft(reversed(again))
        kept = sum(1 for end in self._transcript_ends if end <= audio_covered_s)
        del self.transcripts[kept:], self._transcript_ends[kept:]

    def end(self) -> None:
        """The call is over: every turn still waited on is over too."""
        now = time.monotonic()
        for turn in (*self.turns, *self._expected):
            turn._end(now)
        self._expected.clear()
        self.session_started.set()
        if self.listener is not None:
            self.listener.on_end()

    def _of(self, response: pb.ConverseResponse) -> Turn | None:
        turn = self._by_id.get(response.correlation.turn_id)
        if turn is None:
            self.stray_events += 1
        return turn

    def _start(self, turn_id: str, user_text: str) -> None:
        turn = self._expected.popleft() if self._expected else Turn()
        turn.turn_id, turn.user_text, turn.started_at = turn_id, user_text, time.monotonic()
        self._by_id[turn_id] = turn
        self.turns.append(turn)
        turn.started.set()

    def _audio(self, turn: Turn, audio: bytes, now: float) -> None:
        if turn.first_audio_at is None:
            turn.first_audio_at = now
            turn.first_audio.set()
        else:
            late = now - (turn.first_audio_at + turn.audio_bytes / self.bytes_per_second)
            if late > 0:
                turn.late_chunks += 1
                turn.max_late_s = max(turn.max_late_s, late)
        turn.audio_bytes += len(audio)
        turn.chunks += 1
        if self.keep_audio:
            turn.audio += audio
