"""grpc.health.v1 from the command line (for container health checks) and for scripts.

    python -m voicepipe.healthcheck 127.0.0.1:50052 [--service voice.v1.SpeechToTextService]

Exits 0 when the service reports SERVING, 1 otherwise."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(target: str, service: str = "", timeout_s: float = 2.0) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_until_serving(target: str, timeout_s: float, service: str = "") -> None:
    """Follows the server's health Watch until it reports SERVING; TimeoutError after timeout_s."""
    async with asyncio.timeout(timeout_s), grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
        try:
            async for response in call:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        finally:
            call.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m voicepipe.healthcheck", description=__doc__)
    parser.add_argument("target", help="gRPC target, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args()
    raise SystemExit(0 if asyncio.run(check(args.target, args.service, args.timeout)) else 1)


if __name__ == "__main__":
    main()
