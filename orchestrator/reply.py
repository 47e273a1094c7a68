"""The reply's text as the LLM streams it: handed to the client, and cut into sentences (the
segments TTS speaks; the first may be a clause, see sentences.py) that are queued for the TTS
stream in order."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from orchestrator.output import EventSink
from orchestrator.sentences import FirstSegment, SentenceChunker
from orchestrator.timings import TurnTimings
from voice.v1 import common_pb2
from voice.v1 import voice_agent_pb2 as pb

# Segments queued for TTS at most; the LLM waits for TTS beyond that.
MAX_QUEUED_SEGMENTS = 256


@dataclass(slots=True)
class Segment:
    segment_id: int
    text: str
    reply_start: int  # where the segment's text starts in the reply
    forwarded_bytes: int = 0  # reply audio of this segment already handed to the client
    complete: bool = False


class Reply:
    """Written by the turn's LLM stream, read by its TTS stream."""

    def __init__(
        self,
        output: EventSink,
        correlation: common_pb2.Correlation,
        timings: TurnTimings,
        first_segment: FirstSegment,
    ) -> None:
        self.text = ""
        self.segments: list[Segment] = []
        self._output = output
        self._correlation = correlation
        self._timings = timings
        self._chunker = SentenceChunker(first_segment)
        self._queue: asyncio.Queue[Segment | None] = asyncio.Queue(MAX_QUEUED_SEGMENTS)

    async def add(self, text: str, elapsed: Duration) -> None:
        """New text of the reply; `elapsed` is the LLM's time when it produced it."""
        self._timings.last_delta_at = time.monotonic()
        self.text += text
        # TTS first: its first audio is on the critical path, the text event to the client is not.
        for sentence in self._chunker.push(text):
            if self._timings.llm_first_sentence is None:
                self._timings.llm_first_sentence = elapsed
            await self._queue_segment(sentence)
        await self._output.put(
            pb.ConverseResponse(agent_text=pb.AgentText(text=text), correlation=self._correlation)
        )

    async def flush(self) -> None:
        """No more text is coming: what is left of the last sentence goes to TTS now."""
        rest = self._chunker.flush()
        if rest.strip():
            await self._queue_segment(rest)

    async def finish(self) -> None:
        await self.flush()
        await self._queue.put(None)

    async def next_segment(self) -> Segment | None:
        """The next segment to speak; None once the reply is complete."""
        return await self._queue.get()

    def segment(self, segment_id: int) -> Segment:
        return self.segments[segment_id - 1]

    async def _queue_segment(self, text: str) -> None:
        if self._timings.llm_first_sentence is None:  # the reply is one unterminated sentence
            self._timings.llm_first_sentence = self._timings.last_llm_elapsed
        if self._timings.first_sentence_at is None:
            self._timings.first_sentence_at = self._timings.last_delta_at
        reply_start = sum(len(s.text) for s in self.segments)
        segment = Segment(len(self.segments) + 1, text, reply_start)
        self.segments.append(segment)
        await self._queue.put(segment)
