"""The turn model's cost per check: Smart Turn v3.2 on the test recordings (the last 8 s of each,
as the Whisper stage runs it at a pause), one thread, in this process.

    python -m bench.turn_model [--checks 50]

Reports the wall time per check (median, p95) and the CPU seconds per check."""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

from bench.recordings import all_recordings, cards
from stt_whisper.turn_model import DEFAULT_PATH, TurnModel


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_model", description=__doc__)
    parser.add_argument("--checks", type=int, default=50)
    args = parser.parse_args()
    model = TurnModel(DEFAULT_PATH)
    audios = [r.audio for r in [*all_recordings(), *cards()]]
    model.complete(audios[0])  # the first run allocates the session's buffers
    walls = []
    cpu_before = time.process_time()
    for audio in itertools.islice(itertools.cycle(audios), args.checks):
        started = time.perf_counter()
        model.complete(audio)
        walls.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu_before) / args.checks
    walls.sort()
    p95 = walls[min(len(walls) - 1, round(0.95 * (len(walls) - 1)))]
    print(
        f"{args.checks} checks on {os.cpu_count()} cores: wall {statistics.median(walls) * 1000:.1f} ms"
        f" median, {p95 * 1000:.1f} ms p95; CPU {cpu * 1000:.1f} ms per check"
    )


if __name__ == "__main__":
    main()
