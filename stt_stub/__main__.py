"""`python -m stt_stub`: the STT stub server on port 50052 (metrics on 9602) by default."""

from __future__ import annotations

import argparse

from stt_stub.service import build_service
from voicepipe import latency
from voicepipe.config import FlagParser, ServerSettings
from voicepipe.faults import FaultSettings
from voicepipe.server import run, serve_until_signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("stt", "STT stub: transcribes audio spoken in the stub audio code.")
    ServerSettings.add_flags(flags, port=50052, metrics_port=9602)
    latency.add_flags(flags, "stt")
    FaultSettings.add_flags(flags)
    return flags.parse(argv)


async def serve(args: argparse.Namespace) -> None:
    # Built inside the running loop: grpc.aio binds a server to the loop it was created in.
    service = build_service(
        ServerSettings.from_args(args), latency.from_args(args, "stt"), FaultSettings.from_args(args)
    )
    await serve_until_signal(service)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run(serve(args), "stt_stub", args.log_level)


if __name__ == "__main__":
    main()
