"""`make up`: the four services as local processes. The stages start first; the orchestrator
starts once they report SERVING and is itself waited on until SERVING. Ctrl-C stops them all.

    python -m orchestrator.stack [--latency-profile realistic] [--ephemeral-ports]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass, field

from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe.server import wait_for_shutdown_signal

STAGES = (
    ("stt", "stt_stub", 50052, 9602),
    ("llm", "llm_stub", 50053, 9603),
    ("tts", "tts_stub", 50054, 9604),
)


@dataclass
class LocalStack:
    """The running processes; `stop()` stops them, orchestrator first."""

    stages: dict[str, ServiceProcess] = field(default_factory=dict)
    orchestrator: ServiceProcess | None = None

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*([self.orchestrator] if self.orchestrator else []), *self.stages.values()]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


async def start_stack(
    latency_profile: str,
    *,
    ephemeral: bool,
    stage_flags: dict[str, list[str]] | None = None,
    orchestrator_flags: list[str] | None = None,
) -> LocalStack:
    stack = LocalStack()
    try:
        for name, module, port, metrics in STAGES:
            extra = ["--latency-profile", latency_profile, *(stage_flags or {}).get(name, [])]
            stack.stages[name] = await asyncio.to_thread(
                ServiceProcess,
                module,
                stage_args(0 if ephemeral else port, 0 if ephemeral else metrics, *extra),
            )
        await asyncio.gather(*(wait_until_serving(p.target, 30) for p in stack.stages.values()))
        targets = [f"--{name}={process.target}" for name, process in stack.stages.items()]
        stack.orchestrator = await asyncio.to_thread(
            ServiceProcess,
            "orchestrator",
            stage_args(
                0 if ephemeral else 50051, 0 if ephemeral else 9601, *targets, *(orchestrator_flags or [])
            ),
        )
        await wait_until_serving(stack.orchestrator.target, 30)
    except BaseException:
        stack.stop()
        raise
    return stack


async def run(args: argparse.Namespace) -> None:
    stack = await start_stack(args.latency_profile, ephemeral=args.ephemeral_ports)
    try:
        summary = {p.module: {"grpc": p.target, "metrics": p.metrics_port} for p in stack.processes}
        print(json.dumps({"event": "stack ready", "services": summary}), file=sys.stderr, flush=True)
        await wait_for_shutdown_signal()
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.stack", description=__doc__)
    parser.add_argument("--latency-profile", default="realistic", choices=("instant", "realistic"))
    parser.add_argument("--ephemeral-ports", action="store_true", help="let the OS choose every port")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
