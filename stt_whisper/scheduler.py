"""Every call's decodes share one model: they wait here, the most urgent first (finals before
interims), and one whose caller has stopped waiting (speech resumed, the call ended) is dropped
before it starts, so stale work never delays a final."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from enum import IntEnum

import grpc

from stt_whisper.decoder import Hypothesis, WhisperDecoder
from voicepipe.aio import cancel_and_wait
from voicepipe.pcm import Samples
from voicepipe.stage import StageError
from voicepipe.stage.blocking import BlockingWorker


class Urgency(IntEnum):
    FINAL = 0
    INTERIM = 1


@dataclass
class _Job:
    audio: Samples
    language: str
    prefix: str
    result: asyncio.Future[Hypothesis]


class DecodeQueue:
    def __init__(self, decoder: WhisperDecoder, workers: int, max_queued: int) -> None:
        self.decoder = decoder
        self._max_queued = max_queued
        self._worker = BlockingWorker("whisper", workers=workers, max_queued=0)
        self._queue: asyncio.PriorityQueue[tuple[int, int, _Job]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._busy = 0
        self._unanswered = 0  # jobs whose caller still waits: queued or running
        self._runners = [asyncio.create_task(self._run(), name=f"whisper-runner-{n}") for n in range(workers)]

    @property
    def idle(self) -> bool:
        return self._busy == 0 and self._queue.empty()

    async def decode(self, audio: Samples, language: str, prefix: str, urgency: Urgency) -> Hypothesis:
        if self._unanswered >= self._max_queued:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._unanswered} decodes are already waiting for the speech model; retry later",
            )
        job = _Job(audio, language, prefix, asyncio.get_running_loop().create_future())
        self._unanswered += 1
        job.result.add_done_callback(self._answered)
        self._queue.put_nowait((urgency, next(self._order), job))
        return await job.result  # cancelling the wait drops the job unless it has started

    def _answered(self, _: object) -> None:
        self._unanswered -= 1

    async def _run(self) -> None:
        while True:
            _, _, job = await self._queue.get()
            if job.result.done():
                continue
            self._busy += 1
            try:
                hypothesis = await self._worker.run(self.decoder.decode, job.audio, job.language, job.prefix)
            except Exception as error:  # the waiting call raises it
                if not job.result.done():
                    job.result.set_exception(error)
            else:
                if not job.result.done():
                    job.result.set_result(hypothesis)
            finally:
                self._busy -= 1

    async def close(self) -> None:
        await cancel_and_wait(*self._runners)
        self._worker.close()
