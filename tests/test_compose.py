"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the compose file is
validated and normalised by `docker-compose config`, then held against the shared conventions
(ports, modules) and against the flag parsers of the services it runs; the container health
check command is run against real services."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import llm_stub.__main__
import orchestrator.__main__
import stt_stub.__main__
import tts_stub.__main__
from tests.conftest import StartService
from voicepipe import config
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import PROJECT_ROOT

SHARED_README = PROJECT_ROOT.parent / "shared" / "README.md"
COMPOSE_TIMEOUT_S = 60
HEALTHCHECK_TIMEOUT_S = 30
STAGES = ("stt", "llm", "tts")

ParseFlags = Callable[[list[str] | None], argparse.Namespace]
# Each service's own flag parser, keyed by its compose service name (which is also the service
# name in its environment variables: VOICEPIPE_<NAME>_<FLAG>).
PARSERS: dict[str, ParseFlags] = {
    "orchestrator": orchestrator.__main__.parse_flags,
    "stt": stt_stub.__main__.parse_args,
    "llm": llm_stub.__main__.parse_args,
    "tts": tts_stub.__main__.parse_args,
}


@dataclass(frozen=True)
class Convention:
    """One row of the shared conventions' table of processes and ports."""

    module: str
    port: int
    metrics_port: int

    @property
    def service(self) -> str:
        return self.module.removesuffix("_stub")


def read_conventions() -> dict[str, Convention]:
    """`| STT stub | `python -m stt_stub` | 50052 | 9602 |` -> {"stt": Convention(...)}."""
    row = re.compile(r"^\|[^|]+\|\s*`python -m (\w+)`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*$")
    rows = [match for line in SHARED_README.read_text().splitlines() if (match := row.match(line))]
    conventions = {c.service: c for c in (Convention(m[1], int(m[2]), int(m[3])) for m in rows)}
    assert set(conventions) == set(PARSERS), f"{SHARED_README} lists {sorted(conventions)}"
    return conventions


CONVENTIONS = read_conventions()


# --- the files under test -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose model as `docker-compose config` validates and normalises it."""
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    completed = subprocess.run(
        [executable, "--file", "docker-compose.yml", "config"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, f"docker-compose config rejected the file:\n{completed.stderr}"
    model = yaml.safe_load(completed.stdout)
    assert isinstance(model, dict)
    return model


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    result = services[name]
    assert isinstance(result, dict)
    return result


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, comments and blank lines dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    return [
        Instruction(keyword.upper(), arguments)
        for keyword, _, arguments in (line.partition(" ") for line in logical_lines(text))
    ]


def runtime_stage() -> list[Instruction]:
    """The instructions of the last stage: what the image that runs is made of."""
    instructions = dockerfile()
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[last_from + 1 :]


def image_environment() -> dict[str, str]:
    """The VOICEPIPE_* variables the runtime image sets with ENV."""
    env: dict[str, str] = {}
    for instruction in runtime_stage():
        if instruction.keyword == "ENV":
            for assignment in shlex.split(instruction.arguments):
                name, _, value = assignment.partition("=")
                if name.startswith("VOICEPIPE_"):
                    env[name] = value
    return env


# --- what the services read -----------------------------------------------------------------------


def clear_voicepipe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VOICEPIPE_"):
            monkeypatch.delenv(name)


def variables_read(name: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The environment variable names that service `name`'s flag parser looks up."""
    clear_voicepipe_environment(monkeypatch)
    read: set[str] = set()
    original = config.env_var_name

    def recording(service: str, flag: str) -> str:
        variable = original(service, flag)
        read.add(variable)
        return variable

    with monkeypatch.context() as patch:
        patch.setattr(config, "env_var_name", recording)
        PARSERS[name]([])
    return read


def container_environment(compose: Mapping[str, Any], name: str) -> dict[str, str]:
    """What the service sees in its container: the image's variables, then the compose file's."""
    environment = service(compose, name).get("environment") or {}
    assert isinstance(environment, dict), "environment must be a mapping"
    return {**image_environment(), **{k: str(v) for k, v in environment.items()}}


def settings_in_container(
    compose: Mapping[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """The settings service `name` would run with: its real parser, its container's variables."""
    clear_voicepipe_environment(monkeypatch)
    for variable, value in container_environment(compose, name).items():
        monkeypatch.setenv(variable, value)
    return PARSERS[name]([])


# --- small parsers for compose values -------------------------------------------------------------


def seconds(duration: Any) -> float:
    """A compose duration ("1m30s", "500ms", or a number of seconds) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def published_ports(entry: Any) -> tuple[str, int, int]:
    """A port mapping in short ("127.0.0.1:9601:9601/tcp") or long form -> (host ip, host, container)."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"])
    *host_ip, published, target = str(entry).split("/")[0].split(":")
    return ":".join(host_ip), int(published), int(target)


def command(entry: Any) -> list[str]:
    return shlex.split(entry) if isinstance(entry, str) else [str(part) for part in entry]


def target_host_port(target: str) -> tuple[str, int]:
    """`dns:///stt:50052` or `stt:50052` -> ("stt", 50052)."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- the compose file -----------------------------------------------------------------------------


def test_compose_runs_exactly_the_four_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_service_runs_its_own_module(compose: dict[str, Any], name: str) -> None:
    assert command(service(compose, name).get("command")) == ["python", "-m", CONVENTIONS[name].module]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_variable_set_for_a_service_is_one_it_reads(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = variables_read(name, monkeypatch)
    unread = sorted(set(service(compose, name).get("environment") or {}) - read)
    assert unread == [], f"{name} does not read {unread}; it reads {sorted(read)}"


def test_every_variable_the_image_sets_is_read_by_some_service(monkeypatch: pytest.MonkeyPatch) -> None:
    read = set().union(*(variables_read(name, monkeypatch) for name in PARSERS))
    assert sorted(set(image_environment()) - read) == []


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_service_listens_on_all_interfaces_on_the_conventional_ports(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_in_container(compose, name, monkeypatch)
    convention = CONVENTIONS[name]
    assert (settings.host, settings.port, settings.metrics_port) == (
        "0.0.0.0",
        convention.port,
        convention.metrics_port,
    )
    published = sorted(published_ports(entry) for entry in service(compose, name).get("ports", []))
    assert published == sorted(
        [
            ("127.0.0.1", convention.port, convention.port),
            ("127.0.0.1", convention.metrics_port, convention.metrics_port),
        ]
    )


@pytest.mark.parametrize("name", STAGES)
def test_stages_use_the_realistic_latency_profile(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_in_container(compose, name, monkeypatch).latency_profile == "realistic"


def test_orchestrator_targets_the_stage_services(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_in_container(compose, "orchestrator", monkeypatch)
    targets = {stage: target_host_port(getattr(settings, stage)) for stage in STAGES}
    assert targets == {stage: (stage, CONVENTIONS[stage].port) for stage in STAGES}


def test_orchestrator_starts_after_the_stages_are_healthy(compose: dict[str, Any]) -> None:
    depends_on = service(compose, "orchestrator").get("depends_on") or {}
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry a condition"
    conditions = {stage: depends_on.get(stage, {}).get("condition") for stage in STAGES}
    assert conditions == dict.fromkeys(STAGES, "service_healthy")
    assert set(depends_on) == set(STAGES)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_health_check_asks_the_service_itself(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthcheck = service(compose, name).get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)
    port = settings_in_container(compose, name, monkeypatch).port
    assert command(healthcheck["test"]) == [
        "CMD",
        "python",
        "-m",
        "voicepipe.healthcheck",
        f"127.0.0.1:{port}",
    ]
    # The check's own RPC deadline is 2 s; compose must let it finish, and must not give up on
    # a service still starting.
    assert 2 < seconds(healthcheck["timeout"]) < seconds(healthcheck["interval"]) <= 60
    assert 1 <= int(healthcheck["retries"]) <= 10
    assert seconds(healthcheck["start_period"]) >= 5


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_stop_waits_longer_than_the_shutdown_grace_and_restarts_unless_stopped(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = service(compose, name)
    grace = settings_in_container(compose, name, monkeypatch).shutdown_grace
    assert seconds(definition.get("stop_grace_period", "10s")) > grace
    assert definition.get("restart") == "unless-stopped"


def test_all_services_run_the_image_built_from_this_dockerfile(compose: dict[str, Any]) -> None:
    for name in PARSERS:
        build = service(compose, name).get("build")
        assert build, f"{name} does not build the image"
        context = build if isinstance(build, str) else build["context"]
        assert Path(context).resolve() == PROJECT_ROOT.resolve()
        dockerfile_name = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert dockerfile_name == "Dockerfile"
    assert len({service(compose, name).get("image") for name in PARSERS}) == 1


# --- the Dockerfile -------------------------------------------------------------------------------


def protoc_arguments(line: str, replacements: Mapping[str, str]) -> list[str]:
    """The arguments of `python -m grpc_tools.protoc ...` in a shell line, plugin paths reduced
    to their program names and proto globs expanded."""
    for old, new in replacements.items():
        line = line.replace(old, new)
    words = shlex.split(line)
    start = words.index("grpc_tools.protoc") + 1
    end = words.index("&&", start) if "&&" in words[start:] else len(words)
    arguments: list[str] = []
    for word in words[start:end]:
        word = re.sub(r"^(--plugin=[\w-]+=).*/", r"\1", word)
        if "*" in word:
            arguments.extend(sorted(str(p.relative_to(PROJECT_ROOT)) for p in PROJECT_ROOT.glob(word)))
        else:
            arguments.append(word)
    return arguments


def touched_files(line: str) -> list[str]:
    words = shlex.split(line)
    start = words.index("touch") + 1
    end = words.index("&&", start) if "&&" in words[start:] else len(words)
    return [word for word in words[start:end] if not word.startswith("$")]


def test_image_generates_code_with_the_same_protoc_command_as_make_protos() -> None:
    makefile = logical_lines((PROJECT_ROOT / "Makefile").read_text())
    make_protoc = next(line for line in makefile if "grpc_tools.protoc" in line)
    make_touch = next(line for line in makefile if line.startswith("touch voice/"))
    build_run = next(
        i.arguments for i in dockerfile() if i.keyword == "RUN" and "grpc_tools.protoc" in i.arguments
    )
    expected = protoc_arguments(make_protoc, {"$(PROTOS)": "protos/voice/v1/*.proto"})
    assert "protos/voice/v1/voice_agent.proto" in expected
    assert protoc_arguments(build_run, {}) == expected
    assert touched_files(build_run) == touched_files(make_touch)


def test_image_takes_every_version_from_pyproject() -> None:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    assert re.findall(r"[\w-]+==\s*\d[\w.]*", text) == [], "versions are pinned in pyproject.toml only"


def test_image_runs_as_a_non_root_user_and_exposes_the_conventional_ports() -> None:
    stage = runtime_stage()
    users = [i.arguments.split(":")[0] for i in stage if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {
        int(port.split("/")[0]) for i in stage if i.keyword == "EXPOSE" for port in i.arguments.split()
    }
    assert exposed == {p for c in CONVENTIONS.values() for p in (c.port, c.metrics_port)}


def test_image_has_no_default_service() -> None:
    for instruction in runtime_stage():
        if instruction.keyword in ("CMD", "ENTRYPOINT"):
            words = json.loads(instruction.arguments)
            assert "-m" not in words, f"the image should not choose a service: {instruction.arguments}"


# --- the health check command ---------------------------------------------------------------------


async def healthcheck_exit_code(target: str) -> int:
    """`python -m voicepipe.healthcheck <target>`, as the container health check runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicepipe.healthcheck", target, cwd=PROJECT_ROOT
    )
    try:
        return await asyncio.wait_for(process.wait(), HEALTHCHECK_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_healthcheck_exits_0_for_a_serving_stage(start_service: StartService) -> None:
    stt = start_service("stt_stub", "--latency-profile", "instant")
    assert await healthcheck_exit_code(stt.target) == 0


async def test_healthcheck_exits_1_when_nothing_listens(closed_port: int) -> None:
    assert await healthcheck_exit_code(f"127.0.0.1:{closed_port}") == 1


async def test_orchestrator_is_unhealthy_without_its_stages(
    start_service: StartService, closed_port: int
) -> None:
    unreachable = f"127.0.0.1:{closed_port}"
    agent = start_service("orchestrator", "--stt", unreachable, "--llm", unreachable, "--tts", unreachable)
    assert await healthcheck_exit_code(agent.target) == 1


async def test_the_compose_configuration_comes_up_healthy(
    compose: dict[str, Any], start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four services with their compose variables (the image's host variable left out: the
    flags keep them on loopback and ephemeral ports), in compose's order: stages, then the
    orchestrator, whose health check then passes."""
    clear_voicepipe_environment(monkeypatch)
    for name in PARSERS:
        for variable, value in (service(compose, name).get("environment") or {}).items():
            monkeypatch.setenv(variable, str(value))
    stages = {stage: start_service(CONVENTIONS[stage].module) for stage in STAGES}
    for process in stages.values():
        assert await healthcheck_exit_code(process.target) == 0
    agent = start_service(
        "orchestrator", *(arg for stage in STAGES for arg in (f"--{stage}", stages[stage].target))
    )
    await wait_until_serving(agent.target, HEALTHCHECK_TIMEOUT_S)
    assert await healthcheck_exit_code(agent.target) == 0
