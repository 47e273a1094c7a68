"""Side by side, one stack per variant: the orchestrator (and optionally the stages) on uvloop
against asyncio. Two N=1 runs of the `compare` workload and one N=60 step of `mixed` each.

    python -m bench.event_loops
"""

from __future__ import annotations

import asyncio
import os

from bench.__main__ import ORCHESTRATOR_FLAGS
from bench.runner import Design, measure
from orchestrator.stack import start_stack

# name, orchestrator's event loop, stages' event loop
VARIANTS = (
    ("asyncio (everything)", "asyncio", "asyncio"),
    ("uvloop (orchestrator)", "uvloop", "asyncio"),
    ("uvloop (orchestrator and stages)", "uvloop", "uvloop"),
)


async def main() -> None:
    print("| variant | N=1 added p50 (two runs) | N=1 added p99 | N=60 added p50 / p99 | CPU at N=60 |")
    print("|---|---|---|---|---|")
    for name, orchestrator_loop, stage_loop in VARIANTS:
        for stage in ("STT", "LLM", "TTS"):  # the stage processes inherit this environment
            os.environ[f"VOICEPIPE_{stage}_EVENT_LOOP"] = stage_loop
        flags = [*ORCHESTRATOR_FLAGS, "--event-loop", orchestrator_loop]
        stack = await start_stack("realistic", ephemeral=True, orchestrator_flags=flags)
        try:
            assert stack.orchestrator is not None
            design = Design(
                "voicepipe", stack.orchestrator.target, stack.orchestrator, list(stack.stages.values())
            )
            singles = [
                await measure(
                    design, 1, workload="compare", window_s=12, label="single", seed=i + 1, phase_spread_s=0.5
                )
                for i in range(2)
            ]
            loaded = await measure(design, 60, workload="mixed", window_s=15, label="n60")
        finally:
            stack.stop()
        p50s = ", ".join(f"{s.added_ms['p50']:.2f}" for s in singles)
        p99s = ", ".join(f"{s.added_ms['p99']:.2f}" for s in singles)
        under_load = f"{loaded.added_ms['p50']:.2f} / {loaded.added_ms['p99']:.2f}"
        print(
            f"| {name} | {p50s} ms | {p99s} ms | {under_load} ms | {loaded.cpu.server:.3f} cores |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
