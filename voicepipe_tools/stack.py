"""`make up`: the services as local processes. The stages start first; the orchestrator starts
once they report SERVING and is itself waited on until SERVING; then the gateway (the web page),
whose URL is printed. Ctrl-C stops them all. Each role runs the stub or a real engine:

    python -m voicepipe_tools.stack [--stt NAME] [--llm NAME] [--tts NAME]
                                 [--latency-profile realistic] [--ephemeral-ports]
                                 [--certs out/certs]

(NAME: an engine of the role in voicepipe.engines; `stub` by default.)

With `--certs` (a directory written by `make certs`), every link is mutual TLS: each service
serves its own certificate and requires one from the same CA; the orchestrator presents its
certificate to the stages, and clients (the gateway too) present `client.pem`. The page itself
is served over plain HTTP on loopback (a browser would not trust the local CA).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from voicepipe import engines as registry
from voicepipe.engines import PORTS, STUBS
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe.server import wait_for_shutdown_signal
from voicepipe.tls import ChannelTls

# Loading a model (Whisper, espeak's voices) takes longer than a stub's start.
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StackCertificates:
    """A directory in the layout of `python -m voicepipe_tools.certs`: `ca.pem`, `<name>.pem` and
    `<name>-key.pem`."""

    directory: Path

    def _pair(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def server_flags(self, name: str) -> list[str]:
        """What makes service `name` serve its certificate and require clients of the same CA."""
        certificate, key = self._pair(name)
        return [f"--tls-cert={certificate}", f"--tls-key={key}", f"--tls-client-ca={self.ca}"]

    def channel(self, name: str) -> ChannelTls:
        """A channel that verifies servers by the CA and presents `name`'s certificate."""
        certificate, key = self._pair(name)
        return ChannelTls(self.ca, certificate, key)

    def client_flags(self, prefix: str) -> list[str]:
        """What makes a client of the services (the gateway) verify them and present `client.pem`."""
        certificate, key = self._pair("client")
        return [f"{prefix}-ca={self.ca}", f"{prefix}-cert={certificate}", f"{prefix}-key={key}"]

    def upstream_flags(self) -> list[str]:
        certificate, key = self._pair("orchestrator")
        return [
            f"--upstream-tls-ca={self.ca}",
            f"--upstream-tls-cert={certificate}",
            f"--upstream-tls-key={key}",
        ]


@dataclass
class LocalStack:
    """The running processes; `stop()` stops them, the gateway and the orchestrator first."""

    stages: dict[str, ServiceProcess] = field(default_factory=dict)
    orchestrator: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    # The local language model the openai LLM stage talks to, when the stack started one.
    llm_backend: ServiceProcess | None = None

    @property
    def processes(self) -> list[ServiceProcess]:
        return [
            *([self.gateway] if self.gateway else []),
            *([self.orchestrator] if self.orchestrator else []),
            *self.stages.values(),
            *([self.llm_backend] if self.llm_backend else []),
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


async def start_stack(
    latency_profile: str,
    *,
    ephemeral: bool,
    engines: Mapping[str, str] = STUBS,
    stage_flags: dict[str, list[str]] | None = None,
    orchestrator_flags: list[str] | None = None,
    certificates: StackCertificates | None = None,
) -> LocalStack:
    """Starts the stages (the engine `engines` names for each role; the stubs take the latency
    profile), then the orchestrator wired to them; mutual TLS on every link with `certificates`."""
    stack = LocalStack()
    health_tls = certificates.channel("orchestrator") if certificates else None
    try:
        for role in registry.ROLES:
            engine = registry.engine(role, engines[role])
            extra = [
                *(["--latency-profile", latency_profile] if engine.is_stub else []),
                *(certificates.server_flags(role) if certificates else []),
                *(stage_flags or {}).get(role, []),
            ]
            if "llm_openai.backend" in engine.services and "--base-url" not in extra:
                extra += ["--base-url", await start_llm_backend(stack, ephemeral)]
            stack.stages[role] = await asyncio.to_thread(
                ServiceProcess,
                engine.module,
                listen_args(role, ephemeral, *extra),
                ready_timeout_s=READY_TIMEOUT_S,
            )
        await asyncio.gather(
            *(wait_until_serving(p.target, 30, tls=health_tls) for p in stack.stages.values())
        )
        targets = [f"--{name}={process.target}" for name, process in stack.stages.items()]
        tls_flags = (
            [*certificates.server_flags("orchestrator"), *certificates.upstream_flags()]
            if certificates
            else []
        )
        stack.orchestrator = await asyncio.to_thread(
            ServiceProcess,
            "orchestrator",
            listen_args("orchestrator", ephemeral, *targets, *tls_flags, *(orchestrator_flags or [])),
        )
        await wait_until_serving(stack.orchestrator.target, 30, tls=health_tls)
    except BaseException:
        stack.stop()
        raise
    return stack


def listen_args(service: str, ephemeral: bool, *extra: str) -> list[str]:
    """A service's flags: on loopback, on its default ports or on ports the OS chooses."""
    ports = PORTS[service]
    return stage_args(0 if ephemeral else ports.port, 0 if ephemeral else ports.metrics_port, *extra)


async def start_llm_backend(stack: LocalStack, ephemeral: bool) -> str:
    """Starts the bundled local model (llama.cpp's OpenAI-compatible server) and returns its API
    root; imported here so a stub-only install does not need the engine's packages."""
    from llm_openai import backend

    stack.llm_backend = await asyncio.to_thread(backend.start, 0 if ephemeral else backend.DEFAULT_PORT)
    return backend.base_url(stack.llm_backend)


async def start_gateway(stack: LocalStack, *, ephemeral: bool, certificates: StackCertificates | None) -> str:
    """The web page and its WebSocket endpoint in front of the stack's orchestrator; its URL."""
    assert stack.orchestrator is not None
    tls = certificates.client_flags("--orchestrator-tls") if certificates else []
    stack.gateway = await asyncio.to_thread(
        ServiceProcess,
        "gateway",
        listen_args("gateway", ephemeral, "--orchestrator", stack.orchestrator.target, *tls),
    )
    return f"http://127.0.0.1:{stack.gateway.port}/"


async def run(args: argparse.Namespace) -> None:
    engines = {role: getattr(args, role) for role in registry.ROLES}
    certificates = StackCertificates(args.certs) if args.certs else None
    stack = await start_stack(
        args.latency_profile, ephemeral=args.ephemeral_ports, engines=engines, certificates=certificates
    )
    try:
        page = await start_gateway(stack, ephemeral=args.ephemeral_ports, certificates=certificates)
        summary = {p.module: {"port": p.port, "metrics": p.metrics_port} for p in stack.processes}
        print(json.dumps({"event": "stack ready", "services": summary}), file=sys.stderr, flush=True)
        print(f"voicepipe is SERVING: open {page} and press Start to talk", file=sys.stderr, flush=True)
        await wait_for_shutdown_signal()
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m voicepipe_tools.stack", description=__doc__)
    parser.add_argument("--latency-profile", default="realistic", choices=("instant", "realistic"))
    parser.add_argument("--ephemeral-ports", action="store_true", help="let the OS choose every port")
    parser.add_argument(
        "--certs",
        type=Path,
        default=None,
        help="mutual TLS on every link with the certificates of `make certs`",
    )
    for role in registry.ROLES:
        choices = tuple(registry.by_role(role))
        parser.add_argument(f"--{role}", default=registry.STUB, choices=choices, help=f"the {role} engine")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
