"""`python -m stt_stub`: the STT stub server on port 50052 (metrics on 9602) by default."""

from __future__ import annotations

import argparse

from stt_stub.service import build_service
from voicepipe.stub_entry import parse_stage_args, run_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_stage_args(
        "stt",
        "STT stub: transcribes audio spoken in the stub audio code.",
        port=50052,
        metrics_port=9602,
        argv=argv,
    )


def main(argv: list[str] | None = None) -> None:
    run_stage(parse_args(argv), "stt", build_service)


if __name__ == "__main__":
    main()
