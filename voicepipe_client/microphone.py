"""The caller's microphone: sends utterances in 20 ms frames, in real time (a frame every 20 ms,
silence between utterances, as a live microphone does) or as fast as the server takes them."""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe_client.audio import FRAME_S, Utterance, silent_frame
from voicepipe_client.turns import Turn


class Pause(enum.Enum):
    SILENCE = "silence"  # nothing to say now: a silent frame
    END = "end"  # nothing more to say: the microphone stops


@dataclass(eq=False, slots=True)
class Speech:
    """An utterance on its way out, and the turn it starts (None: audio that starts no turn the
    caller waits for, such as a recording that may hold several utterances)."""

    utterance: Utterance
    turn: Turn | None = None
    speech_ended_at: float | None = None
    sent: asyncio.Event = field(default_factory=asyncio.Event)  # every frame left (or never will)

    def stop_sending(self) -> None:
        """No more of the speech leaves (all of it has, or the microphone stopped): `sent`; a
        turn whose end of speech never left is over, as the server will never start it."""
        self.sent.set()
        if self.turn is not None and self.speech_ended_at is None:
            self.turn._end(time.monotonic())


class Cue(Protocol):
    """What a real-time microphone says next; asked at each frame while it says nothing."""

    def __call__(self, now: float) -> Speech | Pause: ...


class FrameLag(Protocol):
    """Told how late each real-time frame left (a saturated sender under-loads its target)."""

    def record(self, lag_s: float) -> None: ...


# Writes one request; False once the call has ended (the call's reader reports how).
Write = Callable[[pb.ConverseRequest], Awaitable[bool]]
# Called when a turn's end of speech has left: the server may start the turn from now on.
Expect = Callable[[Turn], None]


class SpeechQueue:
    """Utterances waiting to be spoken, in order: the cue of a microphone that is told what to say."""

    def __init__(self) -> None:
        self._items: collections.deque[Speech] = collections.deque()
        self._changed = asyncio.Event()
        self._closed = False

    def put(self, speech: Speech) -> None:
        if self._closed:
            raise RuntimeError("the input has ended")
        self._items.append(speech)
        self._changed.set()

    def close(self) -> None:
        """Nothing more will be queued: the microphone stops once the queue is empty."""
        self._closed = True
        self._changed.set()

    def drop(self) -> None:
        """The microphone has stopped (or the conversation is over): whatever is queued will
        never be sent."""
        self._closed = True
        self._changed.set()
        while self._items:
            self._items.popleft().stop_sending()

    def __call__(self, now: float) -> Speech | Pause:
        if self._items:
            return self._items.popleft()
        return Pause.END if self._closed else Pause.SILENCE

    async def next(self) -> Speech | None:
        while not self._items and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        return self._items.popleft() if self._items else None


class Microphone:
    """Sends what `queue` (or a `cue` of the caller's, in real time only) says. `lag` hears how
    late each real-time frame left."""

    def __init__(self, *, realtime: bool, cue: Cue | None = None, lag: FrameLag | None = None) -> None:
        if cue is not None and not realtime:
            raise ValueError("a cue is asked once per 20 ms frame: it needs a real-time microphone")
        self.realtime = realtime
        self.queue = SpeechQueue()
        self._cue: Cue = cue or self.queue
        self._lag = lag

    async def run(self, fmt: PcmFormat, write: Write, expect: Expect, opened: asyncio.Event) -> None:
        """Sends, once `opened` is set: the server has opened the session (or the call is over).
        Until then nothing would hear the audio, and a frame written across a refusal can hide
        the refusal's status from the caller (grpc/grpc#36066)."""
        try:
            await opened.wait()
            if self.realtime:
                await self._real_time(silent_frame(fmt), write, expect)
            else:
                await self._as_fast_as_possible(write, expect)
        finally:
            self.queue.drop()

    async def _real_time(self, silence: bytes, write: Write, expect: Expect) -> None:
        start = time.monotonic()
        frame_no = 0
        speech: Speech | None = None
        position = 0
        while True:
            due = start + frame_no * FRAME_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if self._lag is not None:
                self._lag.record(max(0.0, now - due))
            if speech is None:
                cued = self._cue(now)
                if cued is Pause.END:
                    return
                if cued is not Pause.SILENCE:
                    speech, position = cued, 0
            if speech is None:
                if not await write(pb.ConverseRequest(audio=silence)):
                    return
            else:
                if not await self._send(speech, position, write, expect):
                    speech.stop_sending()
                    return
                position += 1
                if position == len(speech.utterance.frames):
                    speech.sent.set()
                    speech = None
            frame_no += 1

    async def _as_fast_as_possible(self, write: Write, expect: Expect) -> None:
        while (speech := await self.queue.next()) is not None:
            try:
                for position in range(len(speech.utterance.frames)):
                    if not await self._send(speech, position, write, expect):
                        return
            finally:
                speech.stop_sending()

    @staticmethod
    async def _send(speech: Speech, position: int, write: Write, expect: Expect) -> bool:
        utterance = speech.utterance
        if not await write(pb.ConverseRequest(audio=utterance.frames[position])):
            return False
        if position == utterance.speech_end_frame:
            speech.speech_ended_at = time.monotonic()
            if speech.turn is not None:
                speech.turn.speech_ended_at = speech.speech_ended_at
                expect(speech.turn)
        return True
