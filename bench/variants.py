"""Side by side: the same workload against stacks that differ in one setting, in one run.

    python -m bench.variants event-loops   the orchestrator (and the stages) on uvloop or asyncio
    python -m bench.variants grpc-io       gRPC core's I/O: EventEngine (default) or the older iomgr
    python -m bench.variants tls           plaintext or mutual TLS on every link (callers too)

Each round starts one stack per variant and measures one N=1 run of the `compare` workload on
each; rounds alternate the variants so that a quiet or a busy spell of the machine falls on all of
them. A last round measures one N=60 step of `mixed` per variant for CPU and the latency tail.
Environment variables of a variant apply to every process: the stack and the load generators.
`--loaded-rounds` repeats the N=60 steps, alternating the variants too; `--loaded-sessions` sets
their N (a saturated machine starves the orchestrator and hides its own CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from bench.__main__ import ORCHESTRATOR_FLAGS
from bench.runner import Design, measure
from bench.summary import StepResult
from bench.workload import ADDED_PARTS
from voicepipe_tools.certs import write_local_pki
from voicepipe_tools.stack import StackCertificates, start_stack

ROUNDS = 4
SINGLE_WINDOW_S = 16.0
LOADED_SESSIONS = 60
LOADED_WINDOW_S = 15.0


@dataclass(frozen=True)
class Variant:
    name: str
    orchestrator_flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    mutual_tls: bool = False  # every link, the callers' included


@contextlib.contextmanager
def local_certificates() -> Iterator[StackCertificates]:
    """A CA and the services' certificates for one run, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-certs-") as directory:
        write_local_pki(Path(directory))
        yield StackCertificates(Path(directory))


def _client_tls_env(certificates: StackCertificates) -> dict[str, str]:
    """What makes the load generators connect with the client certificate (bench.loadgen)."""
    client = certificates.channel("client")
    return {
        "VOICEPIPE_CLIENT_TLS_CA": str(client.ca),
        "VOICEPIPE_CLIENT_TLS_CERT": str(client.certificate),
        "VOICEPIPE_CLIENT_TLS_KEY": str(client.key),
    }


def _stage_loops(loop: str) -> dict[str, str]:
    return {f"VOICEPIPE_{stage}_EVENT_LOOP": loop for stage in ("STT", "LLM", "TTS")}


# gRPC core experiments that move a channel's and a server's sockets from the EventEngine back to
# the iomgr poller (grpcio 1.85; see GRPC_EXPERIMENTS in gRPC's environment_variables.md).
IOMGR = "-event_engine_client,-event_engine_listener"

COMPARISONS = {
    "event-loops": (
        Variant("asyncio (everything)", ("--event-loop", "asyncio"), _stage_loops("asyncio")),
        Variant("uvloop (orchestrator)", ("--event-loop", "uvloop"), _stage_loops("asyncio")),
        Variant("uvloop (everything, the default)", ("--event-loop", "uvloop"), _stage_loops("uvloop")),
    ),
    "grpc-io": (
        Variant("EventEngine (grpcio default)"),
        Variant("iomgr (GRPC_EXPERIMENTS)", env={"GRPC_EXPERIMENTS": IOMGR}),
    ),
    "tls": (
        Variant("plaintext (the default)"),
        Variant("mutual TLS on every link", mutual_tls=True),
    ),
}


async def _measure(variant: Variant, sessions: int, seed: int, certificates: StackCertificates) -> StepResult:
    tls = certificates if variant.mutual_tls else None
    env = {**variant.env, **(_client_tls_env(certificates) if tls else {})}
    with mock.patch.dict(os.environ, env):
        flags = [*ORCHESTRATOR_FLAGS, *variant.orchestrator_flags]
        stack = await start_stack("realistic", ephemeral=True, orchestrator_flags=flags, certificates=tls)
        try:
            assert stack.orchestrator is not None
            design = Design(
                "voicepipe", stack.orchestrator.target, stack.orchestrator, list(stack.stages.values())
            )
            if sessions == 1:
                return await measure(
                    design,
                    1,
                    workload="compare",
                    window_s=SINGLE_WINDOW_S,
                    label="single",
                    seed=seed,
                    phase_spread_s=0.5,
                )
            return await measure(
                design, sessions, workload="mixed", window_s=LOADED_WINDOW_S, label=f"n{sessions}"
            )
        finally:
            stack.stop()


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("comparison", choices=tuple(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--loaded-rounds", type=int, default=1)
    parser.add_argument("--loaded-sessions", type=int, default=LOADED_SESSIONS, help="N of the loaded steps")
    args = parser.parse_args()
    if args.rounds < 1 or args.loaded_rounds < 1:
        parser.error("--rounds and --loaded-rounds must be at least 1")
    variants = COMPARISONS[args.comparison]
    singles: dict[str, list[StepResult]] = {v.name: [] for v in variants}
    loaded: dict[str, list[StepResult]] = {v.name: [] for v in variants}
    with local_certificates() as certificates:
        for round_index in range(args.rounds):
            for variant in variants:
                step = await _measure(variant, 1, round_index + 1, certificates)
                singles[variant.name].append(step)
                added = step.added_ms["p50"] or 0.0
                print(f"round {round_index + 1} {variant.name}: added p50 {added:.2f} ms", flush=True)
        for round_index in range(args.loaded_rounds):
            for variant in variants:
                step = await _measure(variant, args.loaded_sessions, 1, certificates)
                loaded[variant.name].append(step)
                print(
                    f"loaded round {round_index + 1} {variant.name}: added p50/p99"
                    f" {step.added_ms['p50'] or 0:.2f}/{step.added_ms['p99'] or 0:.2f} ms,"
                    f" orchestrator {step.cpu.server:.3f} cores, machine {step.cpu.machine:.2f} cores,"
                    f" errors {step.errors}, late chunks {step.late_chunks}",
                    flush=True,
                )

    parts = " | ".join(part.replace("_", " ") for part in ADDED_PARTS)
    n = args.loaded_sessions
    print(
        f"\n| variant | N=1 added p50 per run | median | {parts} |"
        f" N={n} added p50 / p99 (medians) | orchestrator CPU at N={n} | CPU per session |"
    )
    print("|---|---|---|" + "---|" * len(ADDED_PARTS) + "---|---|---|")
    for variant in variants:
        steps = singles[variant.name]
        p50s = [s.added_ms["p50"] or 0.0 for s in steps]
        split = " | ".join(
            f"{statistics.median(s.added_parts_ms[part] or 0.0 for s in steps):.2f}" for part in ADDED_PARTS
        )
        under_load = loaded[variant.name]
        print(
            f"| {variant.name} | {_ms(p50s)} ms | {statistics.median(p50s):.2f} ms | {split} |"
            f" {statistics.median(s.added_ms['p50'] or 0 for s in under_load):.2f} /"
            f" {statistics.median(s.added_ms['p99'] or 0 for s in under_load):.2f} ms |"
            f" {_ms([s.cpu.server for s in under_load])} cores |"
            f" {statistics.median(s.cpu_per_session_ms for s in under_load):.2f} ms/s |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
