"""docker-compose.tls.yml on top of docker-compose.yml, checked without a Docker engine: the merged
model as `docker-compose config` produces it gives every service its certificate, its client CA
and (the orchestrator) its stage channels' TLS, all from files `make certs` writes into the
mounted directory; then the four services run with exactly those variables (the mount replaced by
a directory of certificates made here) and their health checks pass over mutual TLS."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.test_compose import (
    GATEWAY,
    HEALTHCHECK_TIMEOUT_S,
    STAGES,
    STUBS,
    clear_voicepipe_environment,
    compose_config,
    container_environment,
    healthcheck_exit_code,
    module_and_flags,
    parser,
    service,
    target_host_port,
    variables_read,
)
from voicepipe.healthcheck import parse_args as healthcheck_args
from voicepipe.processes import PROJECT_ROOT, ServiceProcess, stage_args
from voicepipe.settings import ServerSettings
from voicepipe.tls import ChannelTls
from voicepipe_tools.certs import write_local_pki

# The stub stack's services and the flag parser of each (the override applies to either stack).
PARSERS = {name: parser(module) for name, module in STUBS.modules.items()}
# Those that serve gRPC, with mutual TLS (the gateway's page stays plain HTTP on loopback).
GRPC_SERVICES = sorted(name for name in PARSERS if name != GATEWAY)

OVERRIDE = "docker-compose.tls.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config(("docker-compose.yml", OVERRIDE))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    write_local_pki(directory)
    return directory


def mount(compose: dict[str, Any], name: str) -> tuple[Path, str]:
    """The certificates' host directory and where the container sees it (read-only)."""
    volumes = service(compose, name).get("volumes") or []
    assert len(volumes) == 1, volumes
    volume = volumes[0]
    if isinstance(volume, str):
        source, target, mode = volume.split(":")
        assert mode == "ro"
    else:
        source, target = volume["source"], volume["target"]
        assert volume.get("read_only")
    return Path(source), target


def environment_with(compose: dict[str, Any], name: str, pki: Path) -> dict[str, str]:
    """The container's VOICEPIPE_* variables, with the mount's paths pointing into `pki`."""
    _, inside = mount(compose, name)
    return {
        variable: value.replace(inside, str(pki)) if value.startswith(inside + "/") else value
        for variable, value in container_environment(STUBS, compose, name).items()
    }


def set_environment(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    clear_voicepipe_environment(monkeypatch)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)


def test_the_certificates_are_mounted_from_where_make_certs_writes_them(compose: dict[str, Any]) -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "-m voicepipe_tools.certs out/certs" in makefile
    for name in PARSERS:
        source, _ = mount(compose, name)
        assert source.resolve() == (PROJECT_ROOT / "out" / "certs").resolve()


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_every_service_serves_mutual_tls_with_its_own_certificate(
    compose: dict[str, Any], name: str, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_environment(monkeypatch, environment_with(compose, name, pki))
    tls = ServerSettings.from_args(PARSERS[name]([])).tls
    assert tls is not None and tls.client_ca is not None
    assert (tls.certificate, tls.key, tls.client_ca) == (
        pki / f"{name}.pem",
        pki / f"{name}-key.pem",
        pki / "ca.pem",
    )
    # Its health check presents a certificate of the same CA.
    probe = ChannelTls.from_args(healthcheck_args(["127.0.0.1:1"]))
    assert probe is not None and probe.ca == pki / "ca.pem"
    assert probe.certificate is not None and probe.certificate.exists()


def test_the_orchestrator_verifies_each_stage_by_its_compose_name(
    compose: dict[str, Any], pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_environment(monkeypatch, environment_with(compose, "orchestrator", pki))
    args = PARSERS["orchestrator"]([])
    upstream = ChannelTls.from_args(args, "upstream_tls")
    assert upstream == ChannelTls(pki / "ca.pem", pki / "orchestrator.pem", pki / "orchestrator-key.pem")
    for stage in STAGES:
        host, _ = target_host_port(getattr(args, stage))
        certificate = x509.load_pem_x509_certificate((pki / f"{stage}.pem").read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName)


def test_the_gateway_presents_the_client_certificate_and_verifies_the_orchestrator_by_its_name(
    compose: dict[str, Any], pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_environment(monkeypatch, environment_with(compose, GATEWAY, pki))
    args = PARSERS[GATEWAY]([])
    upstream = ChannelTls.from_args(args, "orchestrator_tls")
    assert upstream == ChannelTls(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")
    host, _ = target_host_port(args.orchestrator)
    certificate = x509.load_pem_x509_certificate((pki / f"{host}.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_variable_the_override_sets_is_read(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = variables_read(compose, name, monkeypatch)
    read_by_health_check = {
        v for v in service(compose, name)["environment"] if v.startswith("VOICEPIPE_HEALTHCHECK_")
    }
    clear_voicepipe_environment(monkeypatch)
    for variable in read_by_health_check:
        monkeypatch.setenv(variable, "x")
    parsed = vars(healthcheck_args(["127.0.0.1:1"]))
    assert all(parsed[v.removeprefix("VOICEPIPE_HEALTHCHECK_").lower()] == "x" for v in read_by_health_check)
    unread = sorted(set(service(compose, name)["environment"]) - read - read_by_health_check)
    assert unread == [], f"{name} does not read {unread}"


async def health_check(variables: dict[str, str], target: str) -> int:
    """`python -m voicepipe.healthcheck <target>` in the container's environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    return await healthcheck_exit_code(target, {**environment, **variables})


async def test_the_tls_stack_comes_up_healthy(
    compose: dict[str, Any], pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four services with the override's variables (stage targets on loopback instead of the
    compose network); each container health check passes over mTLS; a plaintext one does not."""
    started: list[ServiceProcess] = []

    def start(name: str, module: str, *extra: str) -> ServiceProcess:
        set_environment(monkeypatch, environment_with(compose, name, pki))
        process = ServiceProcess(module, stage_args(0, 0, *extra))
        started.append(process)
        return process

    try:
        commands = {name: module_and_flags(compose, name) for name in PARSERS}
        stages = {stage: start(stage, commands[stage][0], *commands[stage][1]) for stage in STAGES}
        targets = [f"--{stage}={process.target}" for stage, process in stages.items()]
        agent = start("orchestrator", "orchestrator", *targets)
        for name, process in [*stages.items(), ("orchestrator", agent)]:
            variables = environment_with(compose, name, pki)
            deadline = asyncio.get_running_loop().time() + HEALTHCHECK_TIMEOUT_S
            while await health_check(variables, process.target) != 0:
                assert asyncio.get_running_loop().time() < deadline, f"{name} is not healthy"
            assert await health_check({}, process.target) == 1
    finally:
        for process in reversed(started):
            await asyncio.to_thread(process.stop)
