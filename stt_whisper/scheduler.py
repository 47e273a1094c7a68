"""Every call's decodes share one model: they wait here, the most urgent first (finals before
interims), and one whose caller has stopped waiting (speech resumed, the call ended) is dropped
before it starts, so stale work never delays a final.

Finals are remembered by their audio for a while: a call resumed after a broken one replays the
audio since its last final from the same point, so it asks for the same finals again, and gets
them at once (the decode its broken call had started finishes and is kept), rather than every
resumption decoding them afresh and, if the link keeps breaking, none ever getting through."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
from dataclasses import dataclass
from enum import IntEnum

import grpc

from stt_whisper.decoder import Hypothesis, WhisperDecoder
from voicepipe.aio import cancel_and_wait
from voicepipe.pcm import Samples
from voicepipe.stage import StageError
from voicepipe.stage.blocking import BlockingWorker

# Finals remembered (process-wide); only the latest few of each call are ever asked again.
REMEMBERED_FINALS = 64


class Urgency(IntEnum):
    FINAL = 0
    INTERIM = 1


@dataclass
class _Job:
    audio: Samples
    language: str
    prefix: str
    result: asyncio.Future[Hypothesis]
    final_key: bytes | None  # a final's audio and language, by which it is remembered


class DecodeQueue:
    def __init__(self, decoder: WhisperDecoder, workers: int, max_queued: int) -> None:
        self.decoder = decoder
        self._max_queued = max_queued
        self._worker = BlockingWorker("whisper", workers=workers, max_queued=0)
        self._queue: asyncio.PriorityQueue[tuple[int, int, _Job]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._busy = 0
        self._unanswered = 0  # jobs whose caller still waits: queued or running
        self._finals: collections.OrderedDict[bytes, Hypothesis] = collections.OrderedDict()
        self._runners = [asyncio.create_task(self._run(), name=f"whisper-runner-{n}") for n in range(workers)]

    @property
    def idle(self) -> bool:
        return self._busy == 0 and self._queue.empty()

    async def decode(self, audio: Samples, language: str, prefix: str, urgency: Urgency) -> Hypothesis:
        final_key = _final_key(audio, language, prefix) if urgency == Urgency.FINAL else None
        if final_key is not None and (known := self._finals.get(final_key)) is not None:
            self._finals.move_to_end(final_key)
            return known
        if self._unanswered >= self._max_queued:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._unanswered} decodes are already waiting for the speech model; retry later",
            )
        job = _Job(audio, language, prefix, asyncio.get_running_loop().create_future(), final_key)
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
                if job.final_key is not None:
                    self._remember(job.final_key, hypothesis)
                if not job.result.done():
                    job.result.set_result(hypothesis)
            finally:
                self._busy -= 1

    def _remember(self, key: bytes, hypothesis: Hypothesis) -> None:
        self._finals[key] = hypothesis
        self._finals.move_to_end(key)
        while len(self._finals) > REMEMBERED_FINALS:
            self._finals.popitem(last=False)

    async def close(self) -> None:
        await cancel_and_wait(*self._runners)
        self._worker.close()


def _final_key(audio: Samples, language: str, prefix: str) -> bytes:
    digest = hashlib.blake2b(f"{language}\0{prefix}\0".encode(), digest_size=16)
    digest.update(audio.tobytes())
    return digest.digest()
