"""Where the orchestrator's CPU goes under load: py-spy samples it during a measured window (only
when py-spy is installed: it is a profiling tool, not a dependency), and the collapsed stacks
are summarised by own time and by inclusive time."""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_LOCATION = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("py-spy")


async def record(py_spy: str, pid: int, seconds: float, output: Path) -> bool:
    """Samples `pid` for `seconds` (without pausing it) into collapsed stacks at `output`."""
    process = await asyncio.create_subprocess_exec(
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "100",
        "--native",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(seconds + 30):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        print(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
    return process.returncode == 0


# Where a sampled thread is waiting, not working.
_IDLE_LEAVES = frozenset(
    {
        "epoll_wait",
        "poll",
        "select",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "__futex_abstimed_wait_common",
        "sem_wait",
        "nanosleep",
        "clock_nanosleep",
        "EpollSelector.select",
        "_PollLikeSelector.select",
    }
)
_SYSCALL_LEAVES = {
    "sendmsg": "kernel: socket sends (sendmsg), one per gRPC message written",
    "send": "kernel: socket sends (sendmsg), one per gRPC message written",
    "writev": "kernel: socket sends (sendmsg), one per gRPC message written",
    "recv": "kernel: socket reads (recv, recvmsg, read)",
    "recvmsg": "kernel: socket reads (recv, recvmsg, read)",
    "read": "kernel: socket reads (recv, recvmsg, read)",
    "write": "kernel: wake-ups (write to an eventfd or pipe)",
    "getpid": "getpid (CPython 3.11 asyncio.get_running_loop fork check, logging)",
    "syscall": "kernel: futex and other syscalls",
}


@dataclass(frozen=True)
class ProfileSummary:
    samples: int  # busy samples (threads waiting in epoll/poll/condition variables left out)
    idle_samples: int
    by_leaf: list[tuple[str, float]]  # what the innermost frame was doing, share of busy samples
    by_owner: list[tuple[str, float]]  # innermost project frame (who caused the work)
    own: list[tuple[str, float]]  # innermost Python frame


def _function(frame: str) -> str:
    match = _LOCATION.match(frame)
    return match["func"] if match else frame


def _file(frame: str) -> str:
    match = _LOCATION.match(frame)
    return match["file"] if match else ""


def _short(frame: str) -> str:
    path = _file(frame)
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{_function(frame)} ({path})" if path else _function(frame)


def _is_python(frame: str) -> bool:
    return _file(frame).endswith(".py")


def _leaf_category(leaf: str) -> str:
    function, file = _function(leaf), _file(leaf)
    if function in _SYSCALL_LEAVES and (file.startswith("libc") or not file):
        return _SYSCALL_LEAVES[function]
    if "cygrpc" in file or "libgrpc" in file:
        return "gRPC core and its Cython layer (native)"
    if "_message" in file or "upb" in function:
        return "protobuf (native upb)"
    if "libpython" in file or file.endswith(".c") or file.endswith(".h") or file.startswith("libc"):
        return "CPython interpreter, GC and allocator (native)"
    if "/orchestrator/" in f"/{file}":
        return "Python: orchestrator pipeline code"
    if "/voicepipe/" in f"/{file}":
        return "Python: voicepipe runtime (metrics interceptor, formats)"
    if "grpc/" in file:
        return "Python: grpc.aio wrappers"
    if "asyncio/" in file:
        return "Python: asyncio event loop"
    return "Python: other libraries (tenacity, prometheus_client, logging, ...)"


def _owner(thread: str, frames: list[str]) -> str:
    for frame in reversed(frames):
        file = f"/{_file(frame)}"
        entry = file.endswith("/__main__.py") or (
            file.endswith("/voicepipe/server.py") and _function(frame) == "run"
        )
        if ("/orchestrator/" in file or "/voicepipe/" in file) and not entry:
            return _short(frame)
    if "_poll_wrapper" in thread:
        return "gRPC poller thread (completion queue)"
    if any(_function(f) == "Handle._run" for f in frames):
        return "grpc.aio machinery with no project frame (Converse receive/send, completions)"
    return "other"


def summarize(path: Path, top: int = 15) -> ProfileSummary:
    leaves: collections.Counter[str] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack_text.split(";")
        thread = next((p for p in parts if p.startswith("thread ")), "")
        frames = [p for p in parts if p and not p.startswith(("process ", "thread "))]
        if not frames:
            continue
        if _function(frames[-1]) in _IDLE_LEAVES:
            idle += count
            continue
        busy += count
        leaves[_leaf_category(frames[-1])] += count
        owners[_owner(thread, frames)] += count
        python = [f for f in frames if _is_python(f)]
        if python:
            own[_short(python[-1])] += count
    share = 1 / busy if busy else 0.0
    return ProfileSummary(
        samples=busy,
        idle_samples=idle,
        by_leaf=[(name, n * share) for name, n in leaves.most_common()],
        by_owner=[(name, n * share) for name, n in owners.most_common(top)],
        own=[(name, n * share) for name, n in own.most_common(top)],
    )
