"""Side by side: this checkout against another one (an earlier commit, say), in one run.

    git worktree add ../before <commit> && make -C ../before install
    python -m bench.versus ../before [--rounds 3]

Each round measures one N=1 run of the `compare` workload and one N=60 step of `mixed` in each
checkout, alternating which goes first, every step with that checkout's own code, stack and load
generator (its `bench.variants` step); so a quiet or a busy spell of the machine falls on both.
Prints the medians of orchestrator CPU per session and of the added latency, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.workload import ADDED_PARTS
from voicepipe.processes import PROJECT_ROOT

# Runs inside a checkout: one step of its bench.variants, printed as one JSON line. Checkouts
# from before the TLS work have no `certificates` parameter.
STEP = """
import asyncio, inspect, json, sys
from bench import variants
sessions, seed = int(sys.argv[1]), int(sys.argv[2])
if "certificates" in inspect.signature(variants._measure).parameters:
    with variants.local_certificates() as certificates:
        step = asyncio.run(variants._measure(variants.Variant("here"), sessions, seed, certificates))
else:
    step = asyncio.run(variants._measure(variants.Variant("here"), sessions, seed=seed))
print(json.dumps({"turns": step.turns, "errors": step.errors, "late": step.late_chunks,
    "added_p50": step.added_ms["p50"], "added_p99": step.added_ms["p99"],
    "cpu_per_session_ms": step.cpu_per_session_ms, **step.added_parts_ms}))
"""
# The orchestrator's split of the added latency (bench.workload.ADDED_PARTS) follows the totals.
FIGURES = ("cpu_per_session_ms", "added_p50", "added_p99", *ADDED_PARTS)
STEP_TIMEOUT_S = 300


def step(checkout: Path, sessions: int, seed: int) -> dict[str, float]:
    python = checkout / ".venv" / "bin" / "python"
    completed = subprocess.run(
        [str(python), "-c", STEP, str(sessions), str(seed)],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=True,
    )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__)
    parser.add_argument("other", type=Path, help="the other checkout (with its .venv installed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sessions", type=lambda v: [int(n) for n in v.split(",")], default=[1, 60], help="N of the steps"
    )
    args = parser.parse_args()
    checkouts = {"this": PROJECT_ROOT, "other": args.other.resolve()}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for sessions in args.sessions:
            order = list(checkouts) if round_index % 2 == 0 else list(reversed(checkouts))
            for name in order:
                result = step(checkouts[name], sessions, seed=round_index + 1)
                results.setdefault((name, sessions), []).append(result)
                print(f"round {round_index + 1} N={sessions} {name}: {json.dumps(result)}", file=sys.stderr)
    print(f"| figure | {args.other} | this checkout | this / other |\n|---|---|---|---|")
    for sessions in args.sessions:
        for figure in FIGURES:
            other = statistics.median(r[figure] for r in results[("other", sessions)])
            this = statistics.median(r[figure] for r in results[("this", sessions)])
            print(f"| N={sessions} {figure} | {other:.2f} | {this:.2f} | {this / other:.3f} |")


if __name__ == "__main__":
    main()
