"""One agent turn: Generate -> sentences -> Synthesize -> reply audio, all overlapped.

The turn's LLM stream (Generation) writes the Reply, which hands the text to the client and cuts
it into sentences; the TTS stream (Synthesis) speaks each sentence as soon as it is complete,
while the LLM writes the next, and hands the audio to the Playout, which paces it. Each stream
resumes itself when it breaks (see generation.py and synthesis.py); TurnTimings holds the
latency accounting. Data flows one way along that chain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from orchestrator.generation import Generation
from orchestrator.output import Deferred, EventSink
from orchestrator.playout import Playout
from orchestrator.reply import Reply
from orchestrator.retry import StageFailed
from orchestrator.sentences import FirstSegment
from orchestrator.synthesis import Synthesis
from orchestrator.timings import TurnTimings
from orchestrator.upstreams import Upstreams
from voice.v1 import common_pb2, language_model_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe.audio_format import PcmFormat
from voicepipe.durations import from_seconds

# TTS waits on the LLM for text; its deadline is a little later than the LLM's so a stalled LLM
# is reported as the LLM, not as a TTS that ran out of time waiting for it.
TTS_DEADLINE_GRACE_S = 1.0
# A spoken reply's token cap, some 150 words or a minute of speech: a model that rambles (small
# ones do, on a greeting) would otherwise hold its backend slot, and the caller, for minutes.
REPLY_MAX_TOKENS = 200


@dataclass
class TurnSettings:
    output_format: PcmFormat
    voice: str
    # Reply audio is released in real time, at most this far ahead of playback, so that on
    # barge-in the caller has not been sent much more than it heard, and the history is honest.
    audio_lead_s: float
    first_segment: FirstSegment  # where the reply's first TTS segment may end
    reply_max_tokens: int = 0  # asked of the LLM (0: the stage's default)


class Turn:
    """The parts of one turn; `run()` is the turn's task."""

    def __init__(
        self,
        messages: list[language_model_pb2.ChatMessage],
        correlation: common_pb2.Correlation,
        settings: TurnSettings,
        upstreams: Upstreams,
        output: EventSink,
        timings: TurnTimings,
        deadline: float,
        session_deadline: float,
    ) -> None:
        """`deadline`: the LLM's, and TTS's for its work (the reply's playing time is added);
        `session_deadline`: the latest any call may live."""
        self.turn_id = correlation.turn_id
        self.correlation = correlation
        self.timings = timings
        self.reply = Reply(output, correlation, timings, settings.first_segment)
        self.playout = Playout(settings.output_format, settings.audio_lead_s, output, correlation, timings)
        self._generation = Generation(
            upstreams.llm, messages, settings.reply_max_tokens, correlation, deadline, timings
        )
        self._synthesis = Synthesis(
            upstreams.tts,
            settings.output_format,
            settings.voice,
            correlation,
            deadline + TTS_DEADLINE_GRACE_S,
            session_deadline,
            timings,
        )

    @property
    def heard_text(self) -> str:
        return self.reply.text[: self.playout.heard_chars]

    @property
    def cut_short(self) -> StageFailed | None:
        """Why the reply ended at the text already delivered (see generation.py), if it did."""
        return self._generation.cut_short

    def open_early(self) -> None:
        """Sends the Generate request now, before the turn's task runs, so that it leaves ahead
        of the events the conversation queues for the client (the LLM is on the critical path,
        they are not)."""
        self._generation.open_early()

    def close(self) -> None:
        """Cancels a Generate call opened early for a turn that never used it (it was never run,
        or was cancelled before its LLM task started); the turn's owner calls it."""
        self._generation.close()

    def interrupt(self) -> None:
        """Barge-in: none of the turn's audio leaves from now on."""
        self.playout.interrupted = True

    async def run(self) -> None:
        """Raises StageFailed when a stage fails for good."""
        llm = asyncio.create_task(self._generation.run(self.reply), name=f"turn-{self.turn_id}-llm")
        tts = asyncio.create_task(
            self._synthesis.run(self.reply, self.playout), name=f"turn-{self.turn_id}-tts"
        )
        try:
            await asyncio.gather(llm, tts)
        finally:
            await cancel_and_wait(llm, tts)

    def completed_event(self) -> Deferred:
        """TurnCompleted, built when it leaves: by then the first audio has left too."""

        def build() -> pb.ConverseResponse:
            return pb.ConverseResponse(
                turn_completed=pb.TurnCompleted(
                    agent_text=self.reply.text,
                    latency=self.timings.breakdown(),
                    reply_audio_duration=from_seconds(self.playout.audio_seconds),
                ),
                correlation=self.correlation,
            )

        return Deferred(build)
