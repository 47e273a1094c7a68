"""CPU time and memory of a process, read from /proc (Linux), so that the orchestrator's own
cost is measured apart from the stages and the load generator that share the machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # user + system time of every thread since the process started
    rss_bytes: int
    threads: int


def sample(pid: int) -> ProcSample:
    """One reading; raises ProcessLookupError if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError as error:
        raise ProcessLookupError(pid) from error
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss_pages = int(fields[21])  # field 24
    threads = 0
    for line in status.splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
            break
    return ProcSample((utime + stime) / _CLOCK_TICKS, rss_pages * _PAGE_BYTES, threads)


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status (resident memory: anonymous, file and shared)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_cpu_s() -> float:
    """Busy CPU time of the whole machine (all cores, every state but idle and iowait)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLOCK_TICKS
