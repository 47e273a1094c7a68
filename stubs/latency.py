"""Stub latency profiles: the one place their timings are defined.

`instant` adds no artificial delay (tests). `realistic` behaves like a hosted engine (demo and
benchmarks): STT finalises ~150 ms after speech ends (120 ms endpointing silence + 30 ms
processing), the LLM's first token comes at ~250 ms and then ~40 tokens/s, TTS first audio at
~100 ms and then synthesis at ~5x real time. Each figure can be overridden by a flag.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, replace
from typing import ClassVar, Self

from voicepipe.config import FlagParser


@dataclass(frozen=True)
class LatencyProfile:
    stt_processing_ms: float  # after the endpointing silence has been heard
    llm_first_token_ms: float
    llm_tokens_per_second: float  # 0: no pacing
    tts_first_audio_ms: float
    tts_realtime_factor: float  # audio seconds produced per wall second; 0: no pacing


PROFILES = {
    "instant": LatencyProfile(0.0, 0.0, 0.0, 0.0, 0.0),
    "realistic": LatencyProfile(30.0, 250.0, 40.0, 100.0, 5.0),
}

_OVERRIDES = {
    "stt": (("--processing-ms", "stt_processing_ms"),),
    "llm": (
        ("--first-token-ms", "llm_first_token_ms"),
        ("--tokens-per-second", "llm_tokens_per_second"),
    ),
    "tts": (
        ("--first-audio-ms", "tts_first_audio_ms"),
        ("--realtime-factor", "tts_realtime_factor"),
    ),
}


def add_flags(flags: FlagParser, stage: str) -> None:
    flags.add(
        "--latency-profile",
        type=str,
        default="instant",
        choices=tuple(PROFILES),
        help="artificial delays: instant (tests) or realistic (demo, benchmarks)",
    )
    for flag, field in _OVERRIDES[stage]:
        flags.add(flag, type=float, default=None, help=f"override the profile's {field}")


def from_args(args: argparse.Namespace, stage: str) -> LatencyProfile:
    profile = PROFILES[args.latency_profile]
    for flag, field in _OVERRIDES[stage]:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            profile = replace(profile, **{field: value})
    return profile


async def sleep_until(deadline: float) -> None:
    """Simulated engine work: returns once time.monotonic() >= deadline (never early, though
    uvloop's millisecond timers can fire up to a millisecond before the time asked for). The
    instant profile's deadlines are already past, so it never sleeps."""
    while (remaining := deadline - time.monotonic()) > 0:  # noqa: ASYNC110 - a timer, not polling
        await asyncio.sleep(remaining)


class ProfiledEngine:
    """A stub engine driven by a latency profile: the flags of its role (`--latency-profile` and
    the role's overrides) build it. Mix in before the engine base class."""

    role: ClassVar[str]

    def __init__(self, profile: LatencyProfile) -> None:
        self.profile = profile

    @classmethod
    def add_flags(cls, flags: FlagParser) -> None:
        add_flags(flags, cls.role)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(from_args(args, cls.role))
