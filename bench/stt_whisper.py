"""`python -m bench.stt_whisper`: the Whisper stage on real speech (pocketsphinx-testdata).

    python -m bench.stt_whisper [--sessions 1,2,4,8] [--silence-ms 200] [engine flags...]

- WER (jiwer, normalised) of every recording, each sent at full speed in 20 ms frames;
- RTF: decode time of a whole recording over its duration (one decode, nothing else running);
- finalisation time, end of speech (the send time of the frame holding the final's last voiced
  sample) -> the final received, p50/p95, with N concurrent sessions each sending 20 ms frames
  in real time (every session plays all the recordings, in its own order, 1 s of silence apart),
  and the process's CPU per session.

The engine runs in this process behind its SDK interface, without the gRPC hop (as
bench.tts_espeak); the load generator's own cost is included in the CPU figure and is small
(pacing frames). Engine flags (--workers, --cpu-threads, --encoder-seconds,
--beam-size, --model ...) are passed through."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jiwer
import numpy as np

from bench import recordings
from bench.recordings import Recording, normalise
from stt_whisper.decoder import Hypothesis
from stt_whisper.engine import WhisperEngine
from voice.v1 import common_pb2
from voicepipe.aio import cancel_and_wait
from voicepipe.audio_format import LINEAR16, PcmFormat
from voicepipe.config import FlagParser
from voicepipe.pcm import Samples
from voicepipe.stage.stt import Transcript, TranscriptionSettings

RATE = 16_000
FRAME = RATE // 50
GAP = np.zeros(RATE, np.int16)


def _settings(silence_ms: int) -> TranscriptionSettings:
    return TranscriptionSettings(
        PcmFormat(LINEAR16, RATE),
        "en-US",
        False,
        False,
        silence_ms,
        20,
        common_pb2.Correlation(session_id="bench"),
    )


async def _frames(audio: Samples) -> AsyncIterator[Samples]:
    for start in range(0, len(audio), FRAME):
        yield audio[start : start + FRAME]


async def word_error_rate(engine: WhisperEngine, silence_ms: int) -> tuple[float, list[tuple[str, str]]]:
    pairs = []
    for recording in recordings.all_recordings():
        audio = np.concatenate([GAP, recording.audio, GAP])
        finals = [
            e.text
            async for e in engine.transcribe(_settings(silence_ms), _frames(audio))
            if isinstance(e, Transcript) and e.is_final
        ]
        pairs.append((normalise(recording.reference), normalise(" ".join(finals))))
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])), pairs


def real_time_factor(engine: WhisperEngine) -> tuple[float, float]:
    """Median wall time and process CPU time of one whole-recording decode over its duration,
    with nothing else running in this process (CPU time is what contention cannot inflate)."""
    decoder = engine._loaded().decodes.decoder
    walls, cpus = [], []
    for recording in recordings.all_recordings():
        started, cpu = time.perf_counter(), _cpu_s()
        decoder.decode(recording.audio, "en")
        walls.append((time.perf_counter() - started) / recording.seconds)
        cpus.append((_cpu_s() - cpu) / recording.seconds)
    return statistics.median(walls), statistics.median(cpus)


@dataclass
class Level:
    sessions: int
    finalisation_ms: list[float]
    cpu_per_session: float
    errors: int
    decode_ms: list[float]


class DecodeTimes:
    """Wraps the engine's decoder to time every decode that ran (what bounds finalisation)."""

    def __init__(self, engine: WhisperEngine) -> None:
        self.ms: list[float] = []
        decoder = engine._loaded().decodes.decoder
        decode = decoder.decode

        def timed(audio: Samples, language: str, prefix: str = "") -> Hypothesis:
            started = time.perf_counter()
            try:
                return decode(audio, language, prefix)
            finally:
                self.ms.append((time.perf_counter() - started) * 1000)

        decoder.decode = timed  # type: ignore[method-assign]


class PacedSession:
    """One caller sending its audio in 20 ms frames on a real-time schedule."""

    def __init__(self, audio: Samples) -> None:
        self.audio = audio
        self.sent_at: list[float] = []  # wall time each frame was sent
        self.queue: asyncio.Queue[Samples | None] = asyncio.Queue()

    async def send(self) -> None:
        start = time.monotonic()
        for index, first in enumerate(range(0, len(self.audio), FRAME)):
            await asyncio.sleep(max(0.0, start + index * FRAME / RATE - time.monotonic()))
            self.sent_at.append(time.monotonic())
            self.queue.put_nowait(self.audio[first : first + FRAME])
        self.queue.put_nowait(None)

    async def frames(self) -> AsyncIterator[Samples]:
        while (frame := await self.queue.get()) is not None:
            yield frame

    async def run(self, engine: WhisperEngine, silence_ms: int) -> list[float]:
        sender = asyncio.create_task(self.send(), name="bench-sender")
        latencies = []
        try:
            async for event in engine.transcribe(_settings(silence_ms), self.frames()):
                if isinstance(event, Transcript) and event.is_final and event.text:
                    spoken = self.sent_at[max(0, event.end - 1) // FRAME]
                    latencies.append((time.monotonic() - spoken) * 1000)
            await sender
        finally:
            await cancel_and_wait(sender)
        return latencies


async def concurrent(engine: WhisperEngine, sessions: int, silence_ms: int, times: DecodeTimes) -> Level:
    played = recordings.all_recordings()
    plans = []
    for index in range(sessions):
        order = played[index % len(played) :] + played[: index % len(played)]
        plans.append(np.concatenate([np.zeros(FRAME * (7 * index % 50), np.int16), *_spaced(order)]))
    times.ms.clear()
    cpu_before, wall_before = _cpu_s(), time.monotonic()
    results = await asyncio.gather(
        *(PacedSession(audio).run(engine, silence_ms) for audio in plans), return_exceptions=True
    )
    wall = time.monotonic() - wall_before
    cpu = _cpu_s() - cpu_before
    latencies = [ms for r in results if isinstance(r, list) for ms in r]
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return Level(sessions, latencies, cpu / wall / sessions, errors, list(times.ms))


def _spaced(order: list[Recording]) -> list[Samples]:
    return [part for r in order for part in (r.audio, GAP)]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def main(argv: list[str]) -> None:
    flags = FlagParser("stt_whisper", __doc__ or "")
    WhisperEngine.add_flags(flags)
    flags.add("--max-sessions", type=int, default=0, help="what the server's limit would be (sizes queues)")
    flags.add("--sessions", type=str, default="1,2,4,8", help="concurrent real-time sessions")
    flags.add("--silence-ms", type=int, default=200, help="end-of-utterance silence")
    args = flags.parse(argv)
    engine = WhisperEngine.from_args(args)
    await engine.start()
    try:
        print(f"model {args.model}: workers={args.workers} cpu_threads={args.cpu_threads}"
              f" beam={args.beam_size} encoder_seconds={args.encoder_seconds} silence={args.silence_ms} ms"
              f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
        wer, pairs = await word_error_rate(engine, args.silence_ms)
        for reference, heard in pairs:
            if reference != heard:
                print(f"  ref: {reference}\n  hyp: {heard}")
        print(f"WER {wer * 100:.1f} % over {len(pairs)} recordings")
        wall_rtf, cpu_rtf = real_time_factor(engine)
        print(f"RTF {wall_rtf:.3f} wall, {cpu_rtf:.3f} CPU (median, one whole-recording decode)")
        print("sessions  finals  final p50 ms  final p95 ms  CPU cores/session  errors  decodes"
              "  decode p50 ms  load")  # fmt: skip
        times = DecodeTimes(engine)
        for sessions in (int(n) for n in args.sessions.split(",")):
            level = await concurrent(engine, sessions, args.silence_ms, times)
            p50, p95 = (_percentile(level.finalisation_ms, q) for q in (50, 95))
            print(
                f"{sessions:8d}  {len(level.finalisation_ms):6d}  {p50:12.0f}  {p95:12.0f}"
                f"  {level.cpu_per_session:17.3f}  {level.errors:6d}  {len(level.decode_ms):7d}"
                f"  {_percentile(level.decode_ms, 50):13.0f}  {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
