"""`python -m llm_stub`: the LLM stub server on port 50053 (metrics on 9603) by default."""

from __future__ import annotations

import argparse

from llm_stub.service import build_service
from voicepipe.stub_entry import parse_stage_args, run_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_stage_args(
        "llm",
        "LLM stub: deterministic streamed replies for tests, demos and benchmarks.",
        port=50053,
        metrics_port=9603,
        argv=argv,
    )


def main(argv: list[str] | None = None) -> None:
    run_stage(parse_args(argv), "llm", build_service)


if __name__ == "__main__":
    main()
