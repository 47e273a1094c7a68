"""`python -m bench.stt_whisper_batch`: do several sessions' finals decode faster as one batch?

    python -m bench.stt_whisper_batch [--burst 4,8] [--rounds 5] [engine flags...]

A burst of N finals (N recordings, as when N sessions stop speaking at once) is decoded on the
engine's worker threads (--workers, one model) two ways, alternated round by round so that both
see the same machine load: as N single decodes (what the stage does today), and as one batched
model call per worker (the burst split evenly between the workers, each utterance padded to the
longest of its batch). Reported: when each final of the burst is ready (p50, p95, last), the CPU
the burst took, and whether the batched texts are the single decodes' texts."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench import recordings
from stt_whisper.decoder import Hypothesis, ModelSettings, WhisperDecoder
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples

Ready = list[tuple[float, Hypothesis]]  # each final: seconds from the burst's start, what it heard
Burst = Callable[[ThreadPoolExecutor, list[Samples]], Ready]


def single(pool: ThreadPoolExecutor, decoder: WhisperDecoder, audios: list[Samples]) -> Ready:
    start = time.monotonic()

    def one(audio: Samples) -> tuple[float, Hypothesis]:
        hypothesis = decoder.decode(audio, "en")
        return time.monotonic() - start, hypothesis

    return list(pool.map(one, audios))


def batched(pool: ThreadPoolExecutor, decoder: WhisperDecoder, audios: list[Samples], workers: int) -> Ready:
    start = time.monotonic()
    parts = [audios[n::workers] for n in range(workers) if audios[n::workers]]

    def batch(part: list[Samples]) -> list[tuple[float, Hypothesis]]:
        hypotheses = decoder.decode_batch(part, "en")
        done = time.monotonic() - start
        return [(done, h) for h in hypotheses]

    ready: dict[int, tuple[float, Hypothesis]] = {}
    for n, results in enumerate(pool.map(batch, parts)):
        for k, result in enumerate(results):
            ready[n + k * workers] = result
    return [ready[i] for i in range(len(audios))]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> None:
    flags = FlagParser("stt_whisper", __doc__ or "")
    ModelSettings.add_flags(flags)
    flags.add("--burst", type=str, default="4,8", help="finals decoded at once")
    flags.add("--rounds", type=int, default=5, help="rounds of each way, alternated")
    args = flags.parse(argv)
    settings = ModelSettings.from_args(args)
    decoder = WhisperDecoder(settings)
    decoder.decode(np.zeros(16_000, np.int16), "en")
    played = [r.audio for r in recordings.all_recordings()]
    print(f"workers={settings.workers} cpu_threads={settings.cpu_threads}; load average"
          f" {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print("burst  way      final p50 ms  final p95 ms  last ms  CPU s/burst  texts as single  load")
    with ThreadPoolExecutor(settings.workers) as pool:
        for size in (int(n) for n in args.burst.split(",")):
            audios = [played[i % len(played)] for i in range(size)]
            ways: dict[str, Burst] = {
                "single": lambda p, a: single(p, decoder, a),
                "batched": lambda p, a: batched(p, decoder, a, settings.workers),
            }
            ready: dict[str, list[float]] = {way: [] for way in ways}
            last: dict[str, list[float]] = {way: [] for way in ways}
            cpu: dict[str, list[float]] = {way: [] for way in ways}
            texts: dict[str, list[str]] = {}
            same = True
            for _ in range(args.rounds):
                for way, burst in ways.items():
                    before = _cpu_s()
                    results = burst(pool, audios)
                    cpu[way].append(_cpu_s() - before)
                    ready[way] += [1000 * s for s, _ in results]
                    last[way].append(1000 * max(s for s, _ in results))
                    heard = [h.text for _, h in results]
                    same = same and texts.setdefault(way, heard) == heard
            for way in ways:
                p50, p95 = (float(np.percentile(ready[way], q)) for q in (50, 95))
                matches = "yes" if texts[way] == texts["single"] else "no"
                print(
                    f"{size:5d}  {way:7s}  {p50:12.0f}  {p95:12.0f}  {statistics.median(last[way]):7.0f}"
                    f"  {statistics.median(cpu[way]):11.2f}  {matches:15s}  {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            if not same:
                print("  (a way's texts differed between rounds)")


if __name__ == "__main__":
    main(sys.argv[1:])
