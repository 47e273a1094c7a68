"""The orchestrator's own Prometheus metrics (RPC metrics come from the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)

ACTIVE_SESSIONS = Gauge("voicepipe_active_sessions", "Conversations in progress.")
SESSIONS_REJECTED = Counter(
    "voicepipe_sessions_rejected_total", "Conversations refused, by reason.", ("reason",)
)
TURNS = Counter("voicepipe_turns_total", "Turns by outcome.", ("outcome",))
TTFA_SECONDS = Histogram(
    "voicepipe_ttfa_seconds",
    "Time to first reply audio, from the end of the user's speech (server side).",
    buckets=_LATENCY_BUCKETS,
)
ORCHESTRATOR_ADDED_SECONDS = Histogram(
    "voicepipe_orchestrator_added_seconds",
    "TTFA minus the stages' own reported times: the latency the orchestrator added.",
    buckets=_LATENCY_BUCKETS,
)
ORCHESTRATOR_ADDED_PARTS_SECONDS = Histogram(
    "voicepipe_orchestrator_added_parts_seconds",
    "Where the orchestrator-added latency went: each stage's round trip beyond the stage's own"
    " time (network, gRPC, the stage server), and the orchestrator's own processing.",
    ("part",),
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
STAGE_LATENCY_SECONDS = Histogram(
    "voicepipe_stage_latency_seconds",
    "Each stage's reported latency per turn: STT finalisation, LLM first token and first"
    " sentence, TTS first audio.",
    ("stage", "figure"),
    buckets=_LATENCY_BUCKETS,
)
STAGE_ERRORS = Counter(
    "voicepipe_stage_errors_total", "Failed upstream calls, by stage and status code.", ("stage", "code")
)
RESUMPTIONS = Counter(
    "voicepipe_stage_resumptions_total",
    "Upstream streams reopened by the orchestrator after a failure, by stage and reason.",
    ("stage", "reason"),
)
SPECULATIVE = Counter(
    "voicepipe_speculative_total",
    "Turns started on a speculative transcript, by outcome: confirmed (the final had the same"
    " words: its reply was released), withdrawn (speech resumed), replaced (the final had other"
    " words), dropped (the conversation ended or a turn was already playing).",
    ("outcome",),
)
