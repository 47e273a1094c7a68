"""`python -m tts_stub`: the TTS stub server on port 50054 (metrics on 9604) by default."""

from __future__ import annotations

import argparse

from tts_stub.service import build_service
from voicepipe.stub_entry import parse_stage_args, run_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_stage_args(
        "tts", "TTS stub: speaks text in the stub audio code.", port=50054, metrics_port=9604, argv=argv
    )


def main(argv: list[str] | None = None) -> None:
    run_stage(parse_args(argv), "tts", build_service)


if __name__ == "__main__":
    main()
