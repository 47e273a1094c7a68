"""Resident memory of each service once it is ready and idle: what the Kubernetes manifests'
memory requests start from (deploy/kubernetes; the per-session growth is in BENCHMARKS.md).

    python -m bench.idle_rss [module ...]     # default: every service and the LLM backend
"""

from __future__ import annotations

import argparse

from bench.procstat import rss_bytes
from llm_openai import backend
from voicepipe.processes import ServiceProcess, stage_args

SERVICES = (
    "orchestrator",
    "stt_stub",
    "llm_stub",
    "tts_stub",
    "stt_whisper",
    "llm_openai",
    "tts_espeak",
    "llm_openai.backend",
)
READY_TIMEOUT_S = 120.0


def start(module: str) -> ServiceProcess:
    if module == "llm_openai.backend":
        return backend.start(0)
    return ServiceProcess(module, stage_args(0, 0), ready_timeout_s=READY_TIMEOUT_S)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_rss", description=__doc__)
    parser.add_argument("modules", nargs="*", default=SERVICES, help="services to measure, one at a time")
    args = parser.parse_args()
    print("| service | RSS idle (MiB) |\n|---|---|")
    for module in args.modules:
        process = start(module)
        try:
            print(f"| `{module}` | {rss_bytes(process.process.pid) / 2**20:.0f} |", flush=True)
        finally:
            process.stop()


if __name__ == "__main__":
    main()
