"""A Docker engine and compose stacks for the tests that run the images: dockerd started when none
answers (and then stopped again), the images built once by `make images`, and one compose project
per stack, under a name of its own, with the orchestrator published on an ephemeral loopback port
and everything it made removed by `down`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from voicepipe.processes import PROJECT_ROOT

DOCKER_TIMEOUT_S = 60.0
ENGINE_START_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 1800.0
UP_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.1
# The orchestrator's and the gateway's ports on the host: ephemeral (the compose files default to
# the conventions').
PUBLISH_EPHEMERAL = dict.fromkeys(
    (
        "VOICEPIPE_PUBLISH_PORT",
        "VOICEPIPE_PUBLISH_METRICS_PORT",
        "VOICEPIPE_PUBLISH_GATEWAY_PORT",
        "VOICEPIPE_PUBLISH_GATEWAY_METRICS_PORT",
    ),
    "0",
)


def run(command: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    """`command`'s standard output; fails the test with its output if it fails."""
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert completed.returncode == 0, (
        f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed.stdout


def docker(*args: str) -> str:
    return run(["docker", *args], DOCKER_TIMEOUT_S)


def compose_environment() -> dict[str, str]:
    """This process's environment without compose's own variables or VOICEPIPE_* ones, so that
    neither reaches the compose files' interpolation."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "VOICEPIPE_"))}


def engine_answers() -> bool:
    return (
        subprocess.run(
            ["docker", "info"], capture_output=True, timeout=DOCKER_TIMEOUT_S, check=False
        ).returncode
        == 0
    )


@contextmanager
def docker_engine() -> Iterator[None]:
    """The Docker engine: the one that answers, else dockerd started here (as root, with its
    defaults) and stopped on exit."""
    if engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    assert dockerd, "dockerd is not installed (voicepipe_tools/system-packages.sh installs docker.io)"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
            while not engine_answers():
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"dockerd did not start: {log.read().decode()[-2000:]}")
                time.sleep(POLL_INTERVAL_S)
            yield
        finally:
            process.terminate()
            try:
                process.wait(ENGINE_START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def build_images() -> None:
    """`make images`: BuildKit reuses every layer already built, so a second run takes seconds."""
    run(["make", "images"], BUILD_TIMEOUT_S)


def docker_time(stamp: str) -> datetime:
    """Docker's RFC 3339 times carry nanoseconds; datetime takes microseconds."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00"))


@dataclass
class ComposeStack:
    """One compose project of the given files."""

    files: Sequence[str]
    environment: dict[str, str] = field(default_factory=dict)
    project: str = field(default_factory=lambda: f"voicepipe-test-{uuid.uuid4().hex[:8]}")

    def compose(self, *args: str, timeout_s: float = UP_TIMEOUT_S) -> str:
        executable = shutil.which("docker-compose")
        assert executable, "docker-compose is not installed (voicepipe_tools/system-packages.sh installs it)"
        env = {**compose_environment(), **PUBLISH_EPHEMERAL, **self.environment}
        files = (arg for file in self.files for arg in ("--file", file))
        return run([executable, "--project-name", self.project, *files, *args], timeout_s, env)

    def up(self, *scale: str) -> None:
        self.compose("up", "--detach", "--no-build", *(a for s in scale for a in ("--scale", s)))

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")

    def containers(self, service: str) -> list[str]:
        """The ids of the service's containers (every replica), oldest first."""
        return self.compose("ps", "--quiet", service).split()

    def published(self, service: str, port: int) -> str:
        """host:port where the service's container port is published."""
        return self.compose("port", service, str(port)).strip()

    def left_behind(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        return [
            *docker("ps", "--all", "--quiet", "--filter", label).split(),
            *docker("network", "ls", "--quiet", "--filter", label).split(),
            *docker("volume", "ls", "--quiet", "--filter", label).split(),
        ]


def inspect(container: str) -> dict[str, Any]:
    details = json.loads(docker("inspect", container))
    assert isinstance(details, list) and len(details) == 1
    result: dict[str, Any] = details[0]
    return result


def log_events(container: str) -> list[dict[str, Any]]:
    """The JSON lines a service's container has logged (stderr) so far."""
    completed = subprocess.run(
        ["docker", "logs", container], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S, check=False
    )
    events: list[dict[str, Any]] = []
    for line in completed.stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def serving_session(containers: Sequence[str], event: str, session_id: str) -> list[str]:
    """The containers that logged `event` for the session."""
    return [
        c
        for c in containers
        if any(e.get("event") == event and e.get("session_id") == session_id for e in log_events(c))
    ]


def wait_for_session(containers: Sequence[str], event: str, session_id: str, timeout_s: float) -> str:
    """The one container that logs `event` for the session, once it has (polled, bounded)."""
    deadline = time.monotonic() + timeout_s
    while not (found := serving_session(containers, event, session_id)):
        assert time.monotonic() < deadline, f"no container logged {event!r} for {session_id} in {timeout_s} s"
        time.sleep(POLL_INTERVAL_S)
    assert len(found) == 1, f"{len(found)} containers logged {event!r} for {session_id}"
    return found[0]


def require(path: Path) -> Path:
    assert path.exists(), f"{path} is missing (voicepipe_tools/system-packages.sh installs it)"
    return path


def kill_replica_serving(
    containers: Sequence[str], event: str, session_id: str, timeout_s: float
) -> list[str]:
    """`docker kill` the replica that logs `event` for the session, once it has; returns what the
    killed process had logged for the session."""
    replica = wait_for_session(containers, event, session_id, timeout_s)
    docker("kill", replica)
    return [str(e.get("event")) for e in log_events(replica) if e.get("session_id") == session_id]
