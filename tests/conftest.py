"""Shared fixtures: real services as child processes on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from voicepipe.processes import ServiceProcess, stage_args

StartService = Callable[..., ServiceProcess]


@pytest.fixture
def start_service() -> Iterator[StartService]:
    """`start_service("stt_stub", "--latency-profile", "instant")` starts a service on port 0 and
    stops it (SIGTERM, then SIGKILL) when the test ends."""
    started: list[ServiceProcess] = []

    def start(module: str, *extra: str) -> ServiceProcess:
        process = ServiceProcess(module, stage_args(0, 0, *extra))
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
