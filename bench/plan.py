"""What a benchmark run measures (the full run and the short check), and what it found."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench import profiling
from bench.runner import MemoryResult
from bench.summary import StepResult


@dataclass(frozen=True)
class Plan:
    """What one run measures; `full` and `short` below."""

    budget_s: float
    # Kept back by the sweep and the profile for the phases after them (the baselines and the
    # memory check); the baselines keep back part of it for the memory check.
    reserve_s: float
    quiet_wait_s: float  # longest total wait for other programs to leave the machine idle
    single_runs: int  # N=1 repeats of voicepipe and of the request/response baseline
    single_window_s: float
    http_window_s: float
    sweep: tuple[int, ...]
    sweep_window_s: float
    http_sessions: tuple[int, ...]  # baseline at these N (besides N=1)
    relay_sessions: tuple[int, ...]
    relay_window_s: float
    idle_sessions: int
    churn_batch: int
    churn_checkpoints: tuple[int, ...]
    profile_sessions: int  # the profile runs at the capacity N, at least this many (0: no profile)


FULL = Plan(
    budget_s=14 * 60,
    reserve_s=330.0,
    quiet_wait_s=240.0,
    single_runs=5,  # one session's p50 moves by ~0.5 ms from run to run on a shared machine
    single_window_s=16.0,
    http_window_s=16.0,
    sweep=(1, 10, 25, 50, 60, 70, 80, 90, 100, 125, 150, 200, 300, 400, 600, 800, 1000),
    sweep_window_s=15.0,
    http_sessions=(1, 10, 50),
    relay_sessions=(1, 10, 50, 100, 200),
    relay_window_s=12.0,
    idle_sessions=500,
    churn_batch=250,
    churn_checkpoints=tuple(range(1000, 10001, 1000)),
    profile_sessions=50,
)
SHORT = Plan(
    budget_s=120.0,
    reserve_s=0.0,
    quiet_wait_s=10.0,
    single_runs=1,
    single_window_s=7.5,
    http_window_s=7.5,
    sweep=(10,),
    sweep_window_s=5.0,
    http_sessions=(),
    relay_sessions=(1,),
    relay_window_s=6.0,
    idle_sessions=50,
    churn_batch=100,
    churn_checkpoints=(100, 200, 300),
    profile_sessions=0,
)


@dataclass
class Run:
    """Everything measured, for the report."""

    command: str
    short: bool
    started: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    single: list[StepResult] = field(default_factory=list)
    http_single: list[StepResult] = field(default_factory=list)
    sweep: list[StepResult] = field(default_factory=list)
    sweep_stopped: str = ""
    http: list[StepResult] = field(default_factory=list)
    relay: list[StepResult] = field(default_factory=list)
    memory: MemoryResult | None = None
    profile: profiling.ProfileSummary | None = None
    profile_step: StepResult | None = None
    notes: list[str] = field(default_factory=list)
