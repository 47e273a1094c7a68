"""A turn's latency accounting: the moments on its critical path and the stages' own figures,
recorded by the parts of the turn as they happen, and the breakdown (and histograms) built from
them when the turn completes."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from orchestrator.metrics import (
    ORCHESTRATOR_ADDED_PARTS_SECONDS,
    ORCHESTRATOR_ADDED_SECONDS,
    STAGE_LATENCY_SECONDS,
    TTFA_SECONDS,
)
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.durations import from_seconds, to_seconds


class TurnTimings:
    """Monotonic moments (…_at) and the durations the stages reported; each is written by the
    part of the turn that sees it happen."""

    def __init__(
        self, speech_ended_at: float, stt_finalization: Duration, transcript_received_at: float
    ) -> None:
        self.speech_ended_at = speech_ended_at  # the user stopped speaking (or the text turn arrived)
        self.stt_finalization = stt_finalization
        # The final transcript arrived (a text turn: speech_ended_at).
        self.transcript_received_at = transcript_received_at
        self.llm_call_started_at = 0.0
        self.last_delta_at = 0.0
        self.first_sentence_at: float | None = None
        self.first_segment_sent_at: float | None = None
        self.first_audio_received_at: float | None = None
        self.first_audio_at: float | None = None  # the first reply audio left for the client
        self.llm_ttft = Duration()
        self.llm_first_sentence: Duration | None = None
        self.last_llm_elapsed = Duration()
        self.tts_first_audio: Duration | None = None

    def breakdown(self) -> pb.LatencyBreakdown:
        """The turn's LatencyBreakdown; observes the latency histograms once per turn."""
        stt = to_seconds(self.stt_finalization)
        first_sentence = to_seconds(self.llm_first_sentence) if self.llm_first_sentence else 0.0
        tts = to_seconds(self.tts_first_audio) if self.tts_first_audio else 0.0
        latency = pb.LatencyBreakdown(
            stt_finalization=self.stt_finalization,
            llm_time_to_first_token=self.llm_ttft,
            llm_time_to_first_sentence=from_seconds(first_sentence),
            tts_time_to_first_audio=from_seconds(tts),
        )
        STAGE_LATENCY_SECONDS.labels("stt", "finalization").observe(stt)
        STAGE_LATENCY_SECONDS.labels("llm", "first_token").observe(to_seconds(self.llm_ttft))
        STAGE_LATENCY_SECONDS.labels("llm", "first_sentence").observe(first_sentence)
        STAGE_LATENCY_SECONDS.labels("tts", "first_audio").observe(tts)
        if self.first_audio_at is not None:
            ttfa = self.first_audio_at - self.speech_ended_at
            added = ttfa - stt - first_sentence - tts
            latency.time_to_first_audio.CopyFrom(from_seconds(ttfa))
            latency.orchestrator_added.CopyFrom(from_seconds(added))
            TTFA_SECONDS.observe(ttfa)
            ORCHESTRATOR_ADDED_SECONDS.observe(added)
            self._split_added(latency, added, stt, first_sentence, tts)
        return latency

    def _split_added(
        self, latency: pb.LatencyBreakdown, added: float, stt: float, first_sentence: float, tts: float
    ) -> None:
        """Fills in where orchestrator_added went: each stage's round trip and the rest."""
        parts = {
            "stt_round_trip": self.transcript_received_at - self.speech_ended_at - stt,
            "llm_round_trip": (
                self.first_sentence_at - self.llm_call_started_at - first_sentence
                if self.first_sentence_at is not None
                else 0.0
            ),
            "tts_round_trip": (
                self.first_audio_received_at - self.first_segment_sent_at - tts
                if self.first_audio_received_at is not None and self.first_segment_sent_at is not None
                else 0.0
            ),
        }
        parts["orchestrator_processing"] = added - sum(parts.values())
        for name, seconds in parts.items():
            getattr(latency, name).CopyFrom(from_seconds(seconds))
            ORCHESTRATOR_ADDED_PARTS_SECONDS.labels(name).observe(seconds)
