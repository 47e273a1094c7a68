"""`python -m tts_stub`: the TTS stub server on port 50054 (metrics on 9604) by default."""

from __future__ import annotations

import argparse

from tts_stub.service import build_service
from voicepipe import latency
from voicepipe.config import FlagParser, ServerSettings
from voicepipe.faults import FaultSettings
from voicepipe.server import run, serve_until_signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("tts", "TTS stub: speaks text in the stub audio code.")
    ServerSettings.add_flags(flags, port=50054, metrics_port=9604)
    latency.add_flags(flags, "tts")
    FaultSettings.add_flags(flags)
    return flags.parse(argv)


async def serve(args: argparse.Namespace) -> None:
    # Built inside the running loop: grpc.aio binds a server to the loop it was created in.
    service = build_service(
        ServerSettings.from_args(args), latency.from_args(args, "tts"), FaultSettings.from_args(args)
    )
    await serve_until_signal(service)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run(serve(args), "tts_stub", args.log_level)


if __name__ == "__main__":
    main()
