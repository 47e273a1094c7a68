"""`python -m llm_stub`: the LLM stub server on port 50053 (metrics on 9603) by default."""

from __future__ import annotations

import argparse

from llm_stub.service import build_service
from voicepipe import latency
from voicepipe.config import FlagParser, ServerSettings
from voicepipe.faults import FaultSettings
from voicepipe.server import run, serve_until_signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("llm", "LLM stub: deterministic streamed replies for tests, demos and benchmarks.")
    ServerSettings.add_flags(flags, port=50053, metrics_port=9603)
    latency.add_flags(flags, "llm")
    FaultSettings.add_flags(flags)
    return flags.parse(argv)


async def serve(args: argparse.Namespace) -> None:
    # Built inside the running loop: grpc.aio binds a server to the loop it was created in.
    service = build_service(
        ServerSettings.from_args(args), latency.from_args(args, "llm"), FaultSettings.from_args(args)
    )
    await serve_until_signal(service)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run(serve(args), "llm_stub", args.log_level)


if __name__ == "__main__":
    main()
