"""grpc.health.v1 from the command line (for container health checks) and for scripts.

    python -m voicepipe.healthcheck 127.0.0.1:50052 [--service voice.v1.SpeechToTextService]
                                    [--tls-ca ca.pem [--tls-cert c.pem --tls-key c-key.pem]]

Exits 0 when the service reports SERVING, 1 otherwise. The TLS flags also read
VOICEPIPE_HEALTHCHECK_TLS_CA etc., so a container's environment can configure its health check."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voicepipe.config import FlagParser
from voicepipe.tls import ChannelTls, open_channel


async def check(
    target: str, service: str = "", timeout_s: float = 2.0, tls: ChannelTls | None = None
) -> bool:
    async with open_channel(target, tls) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_until_serving(
    target: str, timeout_s: float, service: str = "", tls: ChannelTls | None = None
) -> None:
    """Follows the server's health Watch until it reports SERVING; TimeoutError after timeout_s."""
    async with asyncio.timeout(timeout_s), open_channel(target, tls) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
        try:
            async for response in call:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        finally:
            call.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("healthcheck", __doc__.split("\n\n")[0], module="voicepipe.healthcheck")
    flags.parser.add_argument("target", help="gRPC target, e.g. 127.0.0.1:50051")
    flags.add("--service", type=str, default="", help="service name; empty means the whole server")
    flags.add("--timeout", type=float, default=2.0, help="seconds")
    ChannelTls.add_flags(flags)
    return flags.parse(argv)


def main() -> None:
    args = parse_args()
    healthy = asyncio.run(check(args.target, args.service, args.timeout, ChannelTls.from_args(args)))
    raise SystemExit(0 if healthy else 1)


if __name__ == "__main__":
    main()
