"""Figures of one measured step, computed from the callers' turn records and /proc readings."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from bench.workload import ADDED_PARTS, percentile

# Capacity: p99 orchestrator-added latency at most this, no late reply audio, no errors.
CAPACITY_P99_ADDED_MS = 25.0
# The load generator kept real time if at most this share of frames left over 10 ms late.
MAX_LATE_FRAME_SHARE = 0.01


@dataclass
class CpuWindow:
    """CPU used during the measured window, in cores (CPU seconds per wall second)."""

    server: float
    stages: float
    loadgen: float
    machine: float
    server_rss_mb: float

    @property
    def other(self) -> float:
        """Whatever else kept the machine busy (other processes not part of the benchmark)."""
        return max(0.0, self.machine - self.server - self.stages - self.loadgen)


@dataclass
class StepResult:
    design: str  # voicepipe | relay | http
    label: str
    workload: str
    sessions: int
    window_s: float
    turns: int
    outcomes: dict[str, int]
    errors: int
    error_samples: list[str]
    ttfa_ms: dict[str, float | None]
    ttfa_by_kind_ms: dict[str, float | None]
    added_ms: dict[str, float | None]  # server-reported orchestrator-added (voicepipe, http)
    client_added_ms: dict[str, float | None]
    late_chunks: int
    max_late_ms: float
    cpu: CpuWindow
    lag_frames: int
    lag_over_10ms_share: float
    lag_max_ms: float
    statuses: dict[str, int]
    stage_ms: dict[str, float | None] = field(default_factory=dict)
    # Medians of the server's split of the added latency (workload.ADDED_PARTS).
    added_parts_ms: dict[str, float | None] = field(default_factory=dict)
    others_before: float = float("nan")  # other programs' load (cores) just before the window

    @property
    def cpu_per_session_ms(self) -> float:
        """Server CPU milliseconds per second of one session."""
        return self.cpu.server * 1000 / max(1, self.sessions)

    @property
    def generator_kept_up(self) -> bool:
        return self.lag_over_10ms_share <= MAX_LATE_FRAME_SHARE

    @property
    def passes(self) -> bool:
        # The relay reports no stage breakdown: its latency is what its callers saw.
        p99 = self.added_ms.get("p99") if self.design != "relay" else self.client_added_ms.get("p99")
        return (
            self.errors == 0
            and self.late_chunks == 0
            and self.turns > 0
            and p99 is not None
            and p99 <= CAPACITY_P99_ADDED_MS
        )

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["cpu"] = {**vars(self.cpu), "other": self.cpu.other}
        data["cpu_per_session_ms"] = self.cpu_per_session_ms
        data["passes"] = self.passes
        return data


def _spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "n": float(len(values)),
    }


def summarize(
    design: str,
    label: str,
    workload: str,
    sessions: int,
    window_s: float,
    results: list[dict[str, Any]],
    cpu: CpuWindow,
) -> StepResult:
    turns = [t for r in results for t in r["turns"]]
    outcomes = collections.Counter(t["outcome"] for t in turns)
    statuses: collections.Counter[str] = collections.Counter()
    for r in results:
        statuses.update(r["statuses"])
    error_samples = [p for r in results for p in r["problems"]]
    error_samples += [p for t in turns for p in t["problems"]]
    error_samples += [f"{n} sessions ended with {code}" for code, n in statuses.items() if code != "OK"]
    errors = sum(bool(t["problems"]) for t in turns)
    errors += sum(len(r["problems"]) for r in results)
    errors += sum(n for code, n in statuses.items() if code != "OK")
    answered = [t for t in turns if t["ttfa_ms"] is not None]
    completed = [t for t in answered if t["outcome"] == "completed"]
    by_kind = collections.defaultdict(list)
    for t in answered:
        by_kind[t["kind"]].append(t["ttfa_ms"])
    frames = sum(r["send_lag"]["frames"] for r in results)
    # Buckets: <=1, 2, 5, 10, 20, 50, 100 ms, more; the last four are over 10 ms.
    over_10 = sum(sum(r["send_lag"]["buckets"][4:]) for r in results)
    stage_names = ("stt", "llm_first_token", "llm_first_sentence", "tts", "server_ttfa")
    return StepResult(
        design=design,
        label=label,
        workload=workload,
        sessions=sessions,
        window_s=window_s,
        turns=len(turns),
        outcomes=dict(outcomes),
        errors=errors,
        error_samples=error_samples[:8],
        ttfa_ms=_spread([t["ttfa_ms"] for t in answered]),
        ttfa_by_kind_ms={kind: percentile(values, 50) for kind, values in sorted(by_kind.items())},
        added_ms=_spread([t["orchestrator_added_ms"] for t in completed if "orchestrator_added_ms" in t]),
        client_added_ms=_spread([t["client_added_ms"] for t in completed if "client_added_ms" in t]),
        late_chunks=sum(t["late_chunks"] for t in turns),
        max_late_ms=max((t["max_late_ms"] for t in turns), default=0.0),
        cpu=cpu,
        lag_frames=frames,
        lag_over_10ms_share=over_10 / frames if frames else 0.0,
        lag_max_ms=max((r["send_lag"]["max_ms"] for r in results), default=0.0),
        statuses=dict(statuses),
        stage_ms={
            name: percentile([t[f"{name}_ms"] for t in completed if f"{name}_ms" in t], 50)
            for name in stage_names
        },
        added_parts_ms={
            part: percentile([t[f"{part}_ms"] for t in completed if f"{part}_ms" in t], 50)
            for part in ADDED_PARTS
        },
    )
