"""`make bench` / `python -m bench`: every figure of BENCHMARKS.md, measured in one run.

    python -m bench            the full run (bounded to about 15 minutes)
    python -m bench --short    N=1 and N=10, both baselines and a short memory check (< 1 minute)

Everything runs on loopback; every process started is stopped; every loop is bounded."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from bench import profiling, report
from bench.plan import FULL, SHORT, Plan, Run
from bench.runner import Design, QuietGate, measure, memory_check
from bench.summary import StepResult
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import PROJECT_ROOT, ServiceProcess, stage_args
from voicepipe_tools.stack import LocalStack, start_stack

RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
ORCHESTRATOR_FLAGS = ["--max-sessions", "20000"]


class Budget:
    def __init__(self, seconds: float, quiet_wait_s: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.gate = QuietGate(quiet_wait_s)

    def allows(self, seconds: float) -> bool:
        return time.monotonic() + seconds <= self.deadline


def _step_cost_s(window_s: float, sessions: int) -> float:
    """Rough wall time of one measured step: start, ramp, window, closing."""
    return window_s + 8 + sessions / 50


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _brief(step: StepResult) -> str:
    added = step.added_ms.get("p99")
    return (
        f"{step.design} N={step.sessions} {step.label}: turns={step.turns} errors={step.errors}"
        f" ttfa p50={step.ttfa_ms.get('p50') or 0:.0f} ms added p50/p99="
        f"{step.added_ms.get('p50') or 0:.1f}/{added or 0:.1f} ms late={step.late_chunks}"
        f" server cpu={step.cpu.server:.2f} cores machine={step.cpu.machine:.2f}"
    )


async def run_voicepipe(plan: Plan, run: Run, stack: LocalStack, budget: Budget, *, profile: bool) -> None:
    assert stack.orchestrator is not None
    design = Design("voicepipe", stack.orchestrator.target, stack.orchestrator, list(stack.stages.values()))
    for i in range(plan.single_runs):
        step = await measure(
            design,
            1,
            workload="compare",
            window_s=plan.single_window_s,
            label=f"single #{i + 1}",
            seed=i + 1,
            phase_spread_s=0.5,
            gate=budget.gate,
        )
        _log(_brief(step))
        run.single.append(step)
    await sweep(plan, run, design, budget)
    if profile and plan.profile_sessions:
        best = report.capacity(run.sweep)
        await profile_orchestrator(
            plan, run, design, budget, best.sessions if best else plan.profile_sessions
        )


async def sweep(plan: Plan, run: Run, design: Design, budget: Budget) -> None:
    """Up N until one fails the capacity criteria. An N whose first attempt fails is measured
    again (at most twice more) and the majority of its attempts decides, so that one disturbance
    (of a shared machine, of a p99 taken from a few hundred turns) neither ends the sweep nor,
    alone, lets an N pass."""
    for sessions in plan.sweep:
        results: list[bool] = []
        while not (results == [True] or results.count(True) >= 2 or results.count(False) >= 2):
            if not budget.allows(_step_cost_s(plan.sweep_window_s, sessions) + plan.reserve_s):
                run.sweep_stopped = f"Stopped by the time budget at N={sessions}"
                return
            label = "sweep" if not results else "sweep (repeat)"
            step = await measure(
                design,
                sessions,
                workload="mixed",
                window_s=plan.sweep_window_s,
                label=label,
                gate=budget.gate,
            )
            _log(_brief(step))
            run.sweep.append(step)
            results.append(step.passes)
        if not report.n_passes(results):
            run.sweep_stopped = f"Stopped at N={sessions}: it failed the capacity criteria"
            return
    run.sweep_stopped = "Every planned N passed"


async def profile_orchestrator(plan: Plan, run: Run, design: Design, budget: Budget, sessions: int) -> None:
    py_spy = profiling.find_py_spy()
    if py_spy is None:
        run.notes.append("py-spy is not installed: no profile (pip install py-spy to get one)")
        return
    if not budget.allows(_step_cost_s(plan.sweep_window_s, sessions) + plan.reserve_s):
        run.notes.append("no profile: time budget")
        return
    output = RESULTS_DIR / "profile-orchestrator.txt"
    output.unlink(missing_ok=True)

    async def sample(start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await profiling.record(py_spy, design.server.process.pid, end - time.monotonic(), output)

    step = await measure(
        design,
        sessions,
        workload="mixed",
        window_s=plan.sweep_window_s,
        label="profiled",
        on_window=sample,
        gate=budget.gate,
    )
    _log(_brief(step))
    run.profile_step = step
    if output.exists():
        run.profile = profiling.summarize(output)


async def run_http(plan: Plan, run: Run, budget: Budget) -> None:
    stages = [
        await asyncio.to_thread(ServiceProcess, "bench.http_baseline", ["--role", role])
        for role in ("stt", "llm", "tts")
    ]
    processes = list(stages)
    try:
        stt, llm, tts = (p.target for p in stages)
        server = await asyncio.to_thread(
            ServiceProcess,
            "bench.http_baseline",
            ["--role", "orchestrator", "--stt", stt, "--llm", llm, "--tts", tts],
        )
        processes.append(server)
        design = Design("http", server.target, server, stages)
        for i in range(plan.single_runs):
            step = await measure(
                design,
                1,
                workload="compare",
                window_s=plan.http_window_s,
                label=f"single #{i + 1}",
                seed=i + 1,
                phase_spread_s=0.5,
                gate=budget.gate,
            )
            _log(_brief(step))
            run.http_single.append(step)
        for sessions in plan.http_sessions:
            if not budget.allows(_step_cost_s(plan.sweep_window_s, sessions) + plan.reserve_s * 0.7):
                break
            step = await measure(
                design,
                sessions,
                workload="mixed",
                window_s=plan.sweep_window_s,
                label="load",
                gate=budget.gate,
            )
            _log(_brief(step))
            run.http.append(step)
    finally:
        for process in reversed(processes):
            process.stop()


async def run_relay(plan: Plan, run: Run, stack: LocalStack, budget: Budget) -> None:
    relay = await asyncio.to_thread(ServiceProcess, "bench.relay", ["--stt", stack.stages["stt"].target])
    try:
        design = Design("relay", relay.target, relay, [stack.stages["stt"]])
        for sessions in plan.relay_sessions:
            if not budget.allows(_step_cost_s(plan.relay_window_s, sessions) + plan.reserve_s * 0.5):
                break
            step = await measure(
                design,
                sessions,
                workload="mixed",
                window_s=plan.relay_window_s,
                label="floor",
                gate=budget.gate,
            )
            _log(_brief(step))
            run.relay.append(step)
    finally:
        relay.stop()


async def run_memory(plan: Plan, run: Run, stack: LocalStack) -> None:
    targets = [f"--{name}={process.target}" for name, process in stack.stages.items()]
    fresh = await asyncio.to_thread(
        ServiceProcess, "orchestrator", stage_args(0, 0, *targets, *ORCHESTRATOR_FLAGS)
    )
    try:
        await wait_until_serving(fresh.target, 30)
        run.memory = await memory_check(
            fresh,
            fresh.target,
            idle=plan.idle_sessions,
            batch=plan.churn_batch,
            checkpoints=plan.churn_checkpoints,
        )
        _log(f"memory: {run.memory.as_dict()}")
    finally:
        fresh.stop()


async def main_async(args: argparse.Namespace) -> int:
    plan = SHORT if args.short else FULL
    if args.sweep:
        plan = dataclasses.replace(plan, sweep=tuple(int(n) for n in args.sweep.split(",")))
    budget = Budget(plan.budget_s, plan.quiet_wait_s)
    run = Run(command=" ".join(["python -m bench", *sys.argv[1:]]), short=args.short)
    began = time.monotonic()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _log("starting the stack (realistic latency profile)")
    stack = await start_stack("realistic", ephemeral=True, orchestrator_flags=ORCHESTRATOR_FLAGS)
    try:
        await run_voicepipe(plan, run, stack, budget, profile=not args.no_profile)
        await run_http(plan, run, budget)
        await run_relay(plan, run, stack, budget)
        await run_memory(plan, run, stack)
    finally:
        stack.stop()
    run.elapsed_s = time.monotonic() - began
    machine = report.machine_info()
    if args.short:  # a check of the harness: nothing in the repository is touched
        output: Path | None = Path(args.output) if args.output else PROJECT_ROOT / "out" / "bench-short.md"
        assert output is not None
        output.parent.mkdir(parents=True, exist_ok=True)
        plot_path, raw_path = output.with_suffix(".png"), output.with_suffix(".json")
    else:
        output = Path(args.output) if args.output else None
        plot_path, raw_path = RESULTS_DIR / "sweep.png", RESULTS_DIR / "results.json"
    raw_path.write_text(json.dumps(report.as_json(run, machine), indent=1))
    plot = report.plot(run, plot_path)
    if plot is None:
        run.notes.append("matplotlib is not installed: no plot (make bench installs it)")
    report_path = output or PROJECT_ROOT / "BENCHMARKS.md"
    text = report.markdown(run, machine, plot, relative_to=report_path.parent)
    if output is not None:
        output.write_text(text)
    else:
        report.update_benchmarks(report_path, text)
    print(text)
    _log(f"done in {run.elapsed_s:.0f} s; report: {report_path}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the quick check (N=1, N=10, both baselines)")
    parser.add_argument(
        "--output",
        help="write the report to this file (default: the generated section of BENCHMARKS.md)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--sweep", help="comma-separated N to sweep instead of the plan's (e.g. 100,200)", default=""
    )
    args = parser.parse_args()
    if platform.system() != "Linux":
        raise SystemExit("the benchmark reads /proc: Linux only")
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
