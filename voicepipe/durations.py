"""protobuf Durations from seconds and from sample counts, used by every service."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration


def from_seconds(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def from_samples(samples: int, rate: int) -> Duration:
    """A stream position as a duration, exact to the nanosecond (no float rounding)."""
    duration = Duration()
    duration.FromNanoseconds(samples * 1_000_000_000 // rate)
    return duration


def to_seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9
