"""What a new connection costs with TLS against plaintext, side by side in one run.

    python -m bench.handshake [--connections 300]

One LLM stub per mode (plaintext, TLS, mutual TLS) on loopback. Each sample opens a new channel
with a connection of its own and times its first health Check (TCP connect, the TLS handshake
if any, HTTP/2 set-up, one RPC); the modes alternate sample by sample, so a busy spell of the
shared machine falls on all of them. A Check on an already open connection is timed as the
floor. The server's CPU per new connection is read from /proc: each mode has its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import procstat
from bench.variants import local_certificates
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe.tls import ChannelTls, open_channel
from voicepipe_client import channel_options
from voicepipe_tools.stack import StackCertificates

CONNECTIONS = 300
CHECK_TIMEOUT_S = 10.0


@dataclass
class Mode:
    name: str
    server_flags: list[str]
    client: ChannelTls | None
    process: ServiceProcess | None = None
    new_connection_ms: list[float] = field(default_factory=list)
    open_connection_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0


def modes(certificates: StackCertificates) -> list[Mode]:
    ca = certificates.ca
    server, key = certificates.directory / "llm.pem", certificates.directory / "llm-key.pem"
    return [
        Mode("plaintext", [], None),
        Mode("TLS", [f"--tls-cert={server}", f"--tls-key={key}"], ChannelTls(ca)),
        Mode("mutual TLS", certificates.server_flags("llm"), certificates.channel("client")),
    ]


async def _check(stub: Any) -> float:
    started = time.perf_counter()
    await stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S, wait_for_ready=True)
    return (time.perf_counter() - started) * 1000


async def new_connection_ms(mode: Mode) -> float:
    assert mode.process is not None
    options = channel_options(own_connection=True)
    async with open_channel(mode.process.target, mode.client, options) as channel:
        return await _check(health_pb2_grpc.HealthStub(channel))


def _summary(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(ordered):.2f} / {p90:.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="new connections per mode")
    args = parser.parse_args()
    with local_certificates() as certificates:
        measured = modes(certificates)
        try:
            for mode in measured:
                mode.process = await asyncio.to_thread(
                    ServiceProcess, "llm_stub", stage_args(0, -1, *mode.server_flags)
                )
            machine_before = procstat.machine_cpu_s()
            wall_before = time.monotonic()
            for mode in measured:
                assert mode.process is not None
                async with open_channel(mode.process.target, mode.client, channel_options()) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    await _check(stub)  # connected
                    mode.open_connection_ms = [await _check(stub) for _ in range(args.connections)]
            for mode in measured:
                assert mode.process is not None
                mode.cpu_s = -procstat.sample(mode.process.process.pid).cpu_s
            for _ in range(args.connections):
                for mode in measured:
                    mode.new_connection_ms.append(await new_connection_ms(mode))
            for mode in measured:
                assert mode.process is not None
                mode.cpu_s += procstat.sample(mode.process.process.pid).cpu_s
            machine = (procstat.machine_cpu_s() - machine_before) / (time.monotonic() - wall_before)
        finally:
            for mode in measured:
                if mode.process is not None:
                    await asyncio.to_thread(mode.process.stop)

    baseline = statistics.median(measured[0].new_connection_ms)
    print(f"\n{args.connections} new connections per mode, alternating; machine busy {machine:.2f} cores\n")
    print(
        "| mode | new connection + first Check, median / p90 | over plaintext (median) |"
        " Check on an open connection, median / p90 | server CPU per new connection |"
    )
    print("|---|---|---|---|---|")
    for mode in measured:
        median = statistics.median(mode.new_connection_ms)
        print(
            f"| {mode.name} | {_summary(mode.new_connection_ms)} ms | +{median - baseline:.2f} ms"
            f" (x{median / baseline:.2f}) | {_summary(mode.open_connection_ms)} ms |"
            f" {mode.cpu_s * 1000 / args.connections:.2f} ms |"
        )


if __name__ == "__main__":
    asyncio.run(main())
