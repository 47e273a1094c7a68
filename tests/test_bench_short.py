"""`python -m bench --short` works: N=1 and N=10 against the orchestrator, both baselines and the
memory check each produce a row, and no caller saw an error."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from voicepipe.processes import PROJECT_ROOT

BENCH_TIMEOUT_S = 85
STOP_TIMEOUT_S = 10


def _rows(report: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`."""
    section = report.split(heading, 1)[1]
    rows: list[list[str]] = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def _column(rows: list[list[str]], header: list[str], name: str) -> list[str]:
    return [row[header.index(name)] for row in rows]


def stop_group(bench: subprocess.Popen[str]) -> None:
    """Ctrl-C to the bench's process group (the bench stops its stack), then SIGKILL to what is left."""
    if bench.poll() is None:
        os.killpg(bench.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bench.communicate(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(bench.pid, signal.SIGKILL)
    bench.wait()


@pytest.mark.timeout(BENCH_TIMEOUT_S + STOP_TIMEOUT_S + 10)
def test_short_benchmark_measures_every_mode_without_errors(tmp_path: Path) -> None:
    output = tmp_path / "bench.md"
    # A session of its own, so that a bench that overruns is stopped with every service it started.
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--short", "--output", str(output)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = bench.communicate(timeout=BENCH_TIMEOUT_S)
    finally:
        stop_group(bench)
    assert bench.returncode == 0, stderr[-3000:]
    report = output.read_text()

    sweep = _rows(report, "### Sweep")
    # On a noisy machine the bench runs a step again ("10 (repeat)"): every row is N=10.
    assert sweep and all(row[0] in ("10", "10 (repeat)") for row in sweep), sweep
    header = ["N", "turns", "errors"]
    assert all(int(turns) > 0 for turns in _column(sweep, header, "turns")), sweep
    assert all(errors == "0" for errors in _column(sweep, header, "errors")), sweep

    single = _rows(report, "### One session")
    assert single and all(row[1] != "0" and row[2] == "0" for row in single), single

    baseline = _rows(report, "Request/response runs, one session:")
    assert baseline and all(row[1] != "0" and row[2] == "0" for row in baseline), baseline
    ratios = dict((row[0], row[3]) for row in _rows(report, "### TTFA"))
    assert re.fullmatch(r"\d+\.\d\dx", ratios["all turns"]), ratios

    relay = _rows(report, "Relay runs:")
    assert len(relay) == 1 and relay[0][1] != "0" and relay[0][2] == "0", relay

    memory = report.split("### Memory", 1)[1]
    assert re.search(r"\d+\.\d KiB per idle session", memory), memory
    assert re.search(r"^Session outcomes: OK: [\d,]+\.$", memory, re.MULTILINE), memory
    assert "Problems seen" not in memory, memory
    assert "### Errors seen" not in report, report
