"""Runs measurements: starts load-generator processes against a target, reads the CPU time and
memory of every process of the design from /proc over the measured window, and collects the
callers' records. Also the memory check (idle sessions, then thousands of sessions in batches)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import procstat
from bench.loadgen import LoadConfig
from bench.summary import CpuWindow, StepResult, summarize
from voicepipe.processes import PROJECT_ROOT, ServiceProcess

# Callers per load-generator process: one asyncio loop keeps real time comfortably for this many.
SESSIONS_PER_PROCESS = 100
READY_TIMEOUT_S = 60.0
RESULT_GRACE_S = 120.0


class LoadProcess:
    """One `python -m bench.loadgen` child: JSON lines on stdout, commands on stdin."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            json.dumps(asdict(self.config)),
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # the result line holds every turn record
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name=f"loadgen-{self.pid}-stderr")

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """The next JSON line on stdout, which must be event `name`."""
        assert self.process is not None and self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = await self.process.stdout.readline()
        if not line:
            tail = "\n".join(list(self.stderr)[-15:])
            raise RuntimeError(f"load generator exited before {name!r}:\n{tail}")
        event: dict[str, Any] = json.loads(line)
        if event.get("event") != name:
            raise RuntimeError(f"load generator sent {event.get('event')!r}, expected {name!r}")
        return event

    async def send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        if self.process is not None:
            await self.process.wait()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            await asyncio.gather(self._stderr_task, return_exceptions=True)


@dataclass
class Design:
    """A system under test: where callers connect, and its processes."""

    name: str  # voicepipe | relay | http
    target: str
    server: ServiceProcess  # the process whose CPU is "the orchestrator's"
    others: list[ServiceProcess] = field(default_factory=list)  # its stages


@dataclass
class Snapshot:
    at: float
    server: procstat.ProcSample
    others: dict[int, float]  # CPU seconds per pid
    loadgens: dict[int, float]
    machine: float


def _cpu_of(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            found[pid] = procstat.sample(pid).cpu_s
    return found


def _used(first: dict[int, float], last: dict[int, float]) -> float:
    """CPU seconds used between two readings by the processes present in both."""
    return sum(last[pid] - first[pid] for pid in first.keys() & last.keys())


def snapshot(design: Design, loadgen_pids: list[int]) -> Snapshot:
    return Snapshot(
        at=time.monotonic(),
        server=procstat.sample(design.server.process.pid),
        others=_cpu_of([p.process.pid for p in design.others]),
        loadgens=_cpu_of(loadgen_pids),
        machine=procstat.machine_cpu_s(),
    )


def cpu_window(first: Snapshot, last: Snapshot) -> CpuWindow:
    wall = max(1e-6, last.at - first.at)
    return CpuWindow(
        server=(last.server.cpu_s - first.server.cpu_s) / wall,
        stages=_used(first.others, last.others) / wall,
        loadgen=_used(first.loadgens, last.loadgens) / wall,
        machine=(last.machine - first.machine) / wall,
        server_rss_mb=last.server.rss_bytes / 2**20,
    )


class QuietGate:
    """Waits, before a measurement, until the rest of the machine is nearly idle: the machine is
    shared, and another program's burst would be measured as our latency. Bounded: at most
    `total_s` of waiting over the whole run, then measurements go ahead regardless."""

    def __init__(self, total_s: float, threshold_cores: float = 0.3) -> None:
        self.remaining_s = total_s
        self.threshold = threshold_cores

    async def wait(self, design: Design) -> float:
        """Returns the other processes' load (cores) seen last."""
        ours = [design.server.process.pid, *(p.process.pid for p in design.others)]
        while True:
            started = time.monotonic()
            machine, mine = procstat.machine_cpu_s(), _cpu_of(ours)
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            busy = procstat.machine_cpu_s() - machine - _used(mine, _cpu_of(ours))
            others = max(0.0, busy / elapsed)
            self.remaining_s -= elapsed
            if others < self.threshold or self.remaining_s <= 0:
                return others
            await asyncio.sleep(min(2.0, max(0.0, self.remaining_s)))
            self.remaining_s -= 2.0


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def split_sessions(total: int) -> list[tuple[int, int]]:
    """(first index, count) of each load-generator process."""
    processes = max(1, math.ceil(total / SESSIONS_PER_PROCESS))
    base, extra = divmod(total, processes)
    ranges = []
    first = 0
    for i in range(processes):
        count = base + (1 if i < extra else 0)
        ranges.append((first, count))
        first += count
    return ranges


async def measure(
    design: Design,
    sessions: int,
    *,
    workload: str,
    window_s: float,
    label: str,
    seed: int = 1,
    phase_spread_s: float = 2.0,
    on_window: Any = None,
    gate: QuietGate | None = None,
) -> StepResult:
    """`sessions` callers for `window_s` seconds; CPU is read at the window's two ends.
    `on_window(start, end)` (a coroutine function) runs during the window, e.g. a profiler."""
    others_before = await gate.wait(design) if gate is not None else float("nan")
    mode = {"voicepipe": "voice", "relay": "relay", "http": "http"}[design.name]
    loadgens = [
        LoadProcess(
            LoadConfig(
                mode=mode,
                target=design.target,
                sessions=count,
                first_index=first,
                workload=workload,
                window_s=window_s,
                phase_spread_s=phase_spread_s,
                seed=seed,
            )
        )
        for first, count in split_sessions(sessions)
    ]
    try:
        await asyncio.gather(*(lg.start() for lg in loadgens))
        await asyncio.gather(*(lg.event("ready", READY_TIMEOUT_S) for lg in loadgens))
        # Sessions open one after another before the window, about 100 per second.
        go = time.monotonic() + 0.5 + min(5.0, sessions / 100)
        await asyncio.gather(*(lg.send(f"go {go}") for lg in loadgens))
        pids = [lg.pid for lg in loadgens]
        await _sleep_until(go)
        first = snapshot(design, pids)
        extra = (
            asyncio.create_task(on_window(go, go + window_s), name="bench-on-window") if on_window else None
        )
        try:
            await _sleep_until(go + window_s)
            last = snapshot(design, pids)
            timeout = window_s + RESULT_GRACE_S
            results = await asyncio.gather(*(lg.event("result", timeout) for lg in loadgens))
        finally:
            if extra is not None:
                extra.cancel()
                await asyncio.gather(extra, return_exceptions=True)
    finally:
        await asyncio.gather(*(lg.stop() for lg in loadgens))
    step = summarize(design.name, label, workload, sessions, window_s, results, cpu_window(first, last))
    step.others_before = others_before
    return step


# --- memory ----------------------------------------------------------------------------------


def read_metrics(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled gauges from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    return found


@dataclass
class MemoryReading:
    sessions: int  # sessions opened and closed so far
    rss_mb: float
    tasks: float
    fds: int
    threads: int


@dataclass
class MemoryResult:
    idle_sessions: int  # in each of the two idle steps
    rss_before_idle_mb: float
    rss_first_idle_mb: float  # with one step of idle sessions open
    rss_with_idle_mb: float  # with both steps open
    readings: list[MemoryReading]
    statuses: dict[str, int]
    problems: list[str]

    @property
    def per_idle_session_kb(self) -> float:
        """The second step's cost: by then the heap has grown past one-off allocations."""
        return (self.rss_with_idle_mb - self.rss_first_idle_mb) * 1024 / max(1, self.idle_sessions)

    @property
    def first_step_kb(self) -> float:
        return (self.rss_first_idle_mb - self.rss_before_idle_mb) * 1024 / max(1, self.idle_sessions)

    def growth(self, first: int, last: int) -> float | None:
        """RSS growth from the reading after `first` sessions to the one after `last`."""
        by_count = {r.sessions: r for r in self.readings}
        if first not in by_count or last not in by_count:
            return None
        return by_count[last].rss_mb / by_count[first].rss_mb - 1

    def slope_kb_per_1000(self) -> float | None:
        """Least-squares RSS trend over the readings after sessions were closed, in KiB per
        1,000 sessions: a leak shows as a steady slope, allocator noise as scatter around 0."""
        points = [(r.sessions, r.rss_mb) for r in self.readings if r.sessions]
        if len(points) < 5:  # fewer readings say nothing about a trend
            return None
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        spread = sum((x - mean_x) ** 2 for x, _ in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
        return slope * 1024 * 1000

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_idle_session_kb"] = self.per_idle_session_kb
        data["first_step_kb"] = self.first_step_kb
        data["slope_kb_per_1000"] = self.slope_kb_per_1000()
        return data


async def _settled_reading(server: ServiceProcess, sessions: int) -> MemoryReading:
    """Waits (bounded) until the server reports no active session, then reads its memory."""
    deadline = time.monotonic() + 15
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = await asyncio.to_thread(
            read_metrics, server.metrics_port, ("voicepipe_active_sessions", "voicepipe_asyncio_tasks")
        )
        if values.get("voicepipe_active_sessions", 0) == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let closed connections be reaped
    pid = server.process.pid
    sample = procstat.sample(pid)
    return MemoryReading(
        sessions=sessions,
        rss_mb=procstat.rss_bytes(pid) / 2**20,
        tasks=values.get("voicepipe_asyncio_tasks", float("nan")),
        fds=procstat.open_fds(pid),
        threads=sample.threads,
    )


async def memory_check(
    server: ServiceProcess, target: str, *, idle: int, batch: int, checkpoints: tuple[int, ...]
) -> MemoryResult:
    """On a freshly started orchestrator, after a few warm-up sessions: `idle` sessions held open
    with nothing said, in two steps (RSS per idle session is the second step's growth, when the
    heap is past its one-off growth); then, once they are closed, sessions opened and closed in
    sequential batches of `batch`, each speaking one phrase, with a reading after each
    checkpoint count."""
    statuses: collections.Counter[str] = collections.Counter()
    problems: list[str] = []

    async def run(config: LoadConfig, on_checkpoint: Any) -> None:
        process = LoadProcess(config)
        try:
            await process.start()
            await process.event("ready", READY_TIMEOUT_S)
            await process.send("go 0")
            for _ in range(len(config.checkpoints) or (1 if config.mode == "idle" else 0)):
                event = await process.event("checkpoint", 600)
                await on_checkpoint(int(event["sessions"]))
                await process.send("continue")
            result = await process.event("result", 600)
            statuses.update(result["statuses"])
            problems.extend(result.get("problems", []))
        finally:
            await process.stop()

    async def nothing(_sessions: int) -> None:
        return None

    # A few sessions first, so that lazily created state (channels, caches) is not counted.
    await run(LoadConfig(mode="churn", target=target, sessions=20, churn_total=20), nothing)
    step = max(1, idle // 2)
    rss: list[float] = []

    async def rss_now() -> None:
        await asyncio.sleep(1.0)  # the last sessions' first messages settle
        rss.append(procstat.rss_bytes(server.process.pid) / 2**20)

    async def second_step(_sessions: int) -> None:
        await rss_now()
        await run(LoadConfig(mode="idle", target=target, sessions=step), lambda _n: rss_now())

    before = await _settled_reading(server, 0)
    await run(LoadConfig(mode="idle", target=target, sessions=step), second_step)
    readings = [await _settled_reading(server, 0)]

    async def read(sessions: int) -> None:
        readings.append(await _settled_reading(server, sessions))

    await run(
        LoadConfig(
            mode="churn", target=target, sessions=batch, churn_total=max(checkpoints), checkpoints=checkpoints
        ),
        read,
    )
    return MemoryResult(
        idle_sessions=step,
        rss_before_idle_mb=before.rss_mb,
        rss_first_idle_mb=rss[0] if rss else float("nan"),
        rss_with_idle_mb=rss[1] if len(rss) > 1 else float("nan"),
        readings=readings,
        statuses=dict(statuses),
        problems=problems[:20],
    )
