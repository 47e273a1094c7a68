"""Reply audio on its way to the client, paced in real time: it is released at most `lead_s`
ahead of playback, so that on barge-in the caller has not been sent much more than it heard, and
the history keeps what the caller heard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from orchestrator.output import Deferred, EventSink
from orchestrator.timings import TurnTimings
from voice.v1 import common_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.durations import from_seconds


class Playout:
    """What of the reply has been sent and heard; written by the turn's TTS stream only."""

    def __init__(
        self,
        fmt: PcmFormat,
        lead_s: float,
        output: EventSink,
        correlation: common_pb2.Correlation,
        timings: TurnTimings,
    ) -> None:
        self.heard_chars = 0  # of the reply text, spoken by audio that left for the client
        self.interrupted = False  # barge-in: no more of the turn's audio leaves
        self.audio_bytes = 0
        self._fmt = fmt
        self._lead_s = lead_s
        self._output = output
        self._correlation = correlation
        self._timings = timings
        self._started_at: float | None = None

    @property
    def audio_seconds(self) -> float:
        return self.audio_bytes / (self._fmt.bytes_per_sample * self._fmt.sample_rate)

    async def play(self, audio: bytes, heard_until: int) -> None:
        """Queues audio for the client, waiting first if it would run too far ahead of playback;
        `heard_until` is where in the reply text the audio's speech ends."""
        offset_s = self.audio_seconds
        now = time.monotonic()
        if self._started_at is None:
            self._started_at = now
        elif (wait := self._started_at + offset_s - self._lead_s - now) > 0:
            await asyncio.sleep(wait)
        self.audio_bytes += len(audio)
        event = pb.ConverseResponse(
            reply_audio=pb.ReplyAudio(audio=audio, audio_offset=from_seconds(offset_s)),
            correlation=self._correlation,
        )
        await self._output.put(Deferred(self._sent(event, heard_until)))

    def _sent(self, event: pb.ConverseResponse, heard_until: int) -> Callable[[], pb.ConverseResponse | None]:
        """Runs as the audio leaves: only then has the caller been sent it."""

        def build() -> pb.ConverseResponse | None:
            if self.interrupted:
                return None
            if self._timings.first_audio_at is None:
                self._timings.first_audio_at = time.monotonic()
            self.heard_chars = max(self.heard_chars, heard_until)
            return event

        return build
