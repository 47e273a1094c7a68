"""A turn's Synthesize call, resumed when it breaks: the new call is sent again the segments
whose audio was not fully received, and the audio already forwarded is skipped, so the caller
hears every word once.

The call is read at the pace of playback (the Playout waits before it takes more audio), so it
lives as long as the reply takes to say. Its deadline therefore moves: the turn's budget covers
the work, and every second of reply audio received adds the second it takes to play. The gRPC
call itself is bounded by the session's deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from orchestrator.calls import StageCall, call_metadata
from orchestrator.playout import Playout
from orchestrator.reply import Reply, Segment
from orchestrator.retry import TURN_CALLS_WAIT_FOR_READY, StageFailed, resume_turn_stream
from orchestrator.timings import TurnTimings
from orchestrator.upstreams import Upstream
from voice.v1 import common_pb2, text_to_speech_pb2, text_to_speech_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat


class Synthesis:
    """The TTS stream of one turn: it reads the turn's Reply and feeds its Playout."""

    def __init__(
        self,
        upstream: Upstream,
        fmt: PcmFormat,
        voice: str,
        correlation: common_pb2.Correlation,
        deadline: float,
        call_deadline: float,
        timings: TurnTimings,
    ) -> None:
        """`deadline`: by when the reply's speech must be ready, not counting the time its audio
        takes to play; `call_deadline`: the latest a call may live (the session's)."""
        self._upstream = upstream
        self._stub = text_to_speech_pb2_grpc.TextToSpeechServiceStub(upstream.channel)
        self._config = text_to_speech_pb2.SynthesizeRequest(
            config=text_to_speech_pb2.SynthesisConfig(
                voice=voice, audio_format=fmt.to_proto(), correlation=correlation
            )
        )
        self._format = fmt
        self._deadline = deadline
        self._call_deadline = call_deadline
        self._budget: asyncio.Timeout | None = None
        self._metadata = call_metadata(correlation)
        self._writer_name = f"turn-{correlation.turn_id}-tts-writer"
        self._timings = timings
        self._taken: list[Segment] = []  # segments sent to a call so far
        self._text_done = False

    async def run(self, reply: Reply, playout: Playout) -> None:
        """Raises StageFailed when TTS fails for good or its speech is not ready in time."""
        try:
            async with asyncio.timeout(self._deadline - time.monotonic()) as self._budget:
                await resume_turn_stream(pb.STAGE_TTS, lambda: self._attempt(reply, playout))
        except TimeoutError:
            raise StageFailed(
                pb.STAGE_TTS,
                "DEADLINE_EXCEEDED",
                f"tts: the reply's speech was not ready in time ({playout.audio_seconds:.1f} s of audio"
                " received; its playing time does not count against the turn's budget)",
            ) from None

    def _start(self, timeout: float) -> Any:
        # Not wait-for-ready (see TURN_CALLS_WAIT_FOR_READY).
        return self._stub.Synthesize(
            timeout=timeout, metadata=self._metadata, wait_for_ready=TURN_CALLS_WAIT_FOR_READY
        )

    async def _attempt(self, reply: Reply, playout: Playout) -> None:
        async with StageCall.open(self._upstream, self._call_deadline, self._start) as call:
            writer = call.start_writer(self._write(call.rpc, reply), name=self._writer_name)
            async for response in call.rpc:
                await self._receive(response, reply, playout)
            await writer

    async def _write(self, rpc: Any, reply: Reply) -> None:
        await rpc.write(self._config)
        # After a resumption: resend what an earlier call took but did not finish speaking.
        for taken in self._taken:
            if not taken.complete:
                await rpc.write(_segment_request(taken))
        while not self._text_done:
            segment = await reply.next_segment()
            if segment is None:
                self._text_done = True
                break
            self._taken.append(segment)
            if self._timings.first_segment_sent_at is None:
                self._timings.first_segment_sent_at = time.monotonic()
            await rpc.write(_segment_request(segment))
        await rpc.done_writing()

    async def _receive(
        self, response: text_to_speech_pb2.SynthesizeResponse, reply: Reply, playout: Playout
    ) -> None:
        if response.HasField("segment_complete"):
            reply.segment(response.segment_complete.segment_id).complete = True
            return
        chunk = response.audio
        segment = reply.segment(chunk.segment_id)
        fmt = self._format
        chunk_start = round(chunk.audio_offset.ToNanoseconds() * fmt.sample_rate / 1e9) * fmt.bytes_per_sample
        audio = chunk.audio
        # After a resumption the TTS speaks the segment again from its start: skip what was sent.
        skip = segment.forwarded_bytes - chunk_start
        if skip >= len(audio):
            return
        if skip > 0:
            audio = audio[skip:]
        if self._timings.tts_first_audio is None and chunk.HasField("time_to_first_audio"):
            self._timings.tts_first_audio = chunk.time_to_first_audio
            self._timings.first_audio_received_at = time.monotonic()
        segment.forwarded_bytes += len(audio)
        await playout.play(audio, heard_until=segment.reply_start + chunk.text_end)
        if self._budget is not None:  # the audio's playing time is time given, not spent
            remaining = self._deadline + playout.audio_seconds - time.monotonic()
            self._budget.reschedule(asyncio.get_running_loop().time() + remaining)


def _segment_request(segment: Segment) -> text_to_speech_pb2.SynthesizeRequest:
    return text_to_speech_pb2.SynthesizeRequest(
        segment=text_to_speech_pb2.TextSegment(segment_id=segment.segment_id, text=segment.text, flush=True)
    )
