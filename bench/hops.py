"""The transport floor of one hop: how long grpc.aio takes to deliver a message from one process
to another on this machine, for a new server-streaming call (what each turn's Generate is) and for
a message on an open stream (STT audio, TTS text), when the receiver was busy a moment ago and
when it had been idle.

    python -m bench.hops

A client and a server (both uvloop, the server with the runtime's interceptors, as every
stage has) in two processes on loopback; the server stamps time.monotonic() (one clock for the
whole machine) when its handler sees the request and sends it back, so each hop is measured one
way. Each figure is the median of `SAMPLES` (a bounded loop), after the given gap of silence.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop

from voice.v1 import language_model_pb2 as llm_pb
from voice.v1 import language_model_pb2_grpc as llm_grpc
from voice.v1 import speech_to_text_pb2 as stt_pb
from voice.v1 import speech_to_text_pb2_grpc as stt_grpc
from voicepipe.logs import configure_logging
from voicepipe.processes import ServiceProcess
from voicepipe.server import runtime_interceptors, wait_for_shutdown_signal

log = logging.getLogger(__name__)

SAMPLES = {0.01: 200, 0.5: 30}  # gap before each sample (s): samples
WARMUP_CALLS = 30


class StampingLlm(llm_grpc.LanguageModelServiceServicer):
    async def Generate(
        self, request: llm_pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm_pb.GenerateResponse]:
        yield llm_pb.GenerateResponse(delta=llm_pb.TextDelta(text=repr(time.monotonic())))


class StampingStt(stt_grpc.SpeechToTextServiceServicer):
    async def Transcribe(
        self,
        request_iterator: AsyncIterator[stt_pb.TranscribeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[stt_pb.TranscribeResponse]:
        async for _ in request_iterator:
            stamp = repr(time.monotonic())
            yield stt_pb.TranscribeResponse(result=stt_pb.TranscriptionResult(transcript=stamp))


async def serve() -> None:
    server = grpc.aio.server(interceptors=runtime_interceptors())
    llm_grpc.add_LanguageModelServiceServicer_to_server(StampingLlm(), server)
    stt_grpc.add_SpeechToTextServiceServicer_to_server(StampingStt(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    log.info("ready", extra={"port": port})
    try:
        await wait_for_shutdown_signal()
    finally:
        await server.stop(0)


async def measure(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        llm = llm_grpc.LanguageModelServiceStub(channel)
        stt = stt_grpc.SpeechToTextServiceStub(channel)
        for _ in range(WARMUP_CALLS):
            async for _response in llm.Generate(llm_pb.GenerateRequest(), timeout=5):
                pass
        audio: asyncio.Queue[stt_pb.TranscribeRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[stt_pb.TranscribeRequest]:
            while True:
                yield await audio.get()

        stream: Any = stt.Transcribe(requests(), timeout=600)
        print(
            "| receiver idle before | new call: request to handler | response back"
            " | message on an open stream: to handler | response back |"
        )
        print("|---|---|---|---|---|")
        try:
            for gap_s, samples in SAMPLES.items():
                figures: dict[str, list[float]] = {"call": [], "call_back": [], "msg": [], "msg_back": []}
                for _ in range(samples):
                    await asyncio.sleep(gap_s)
                    sent = time.monotonic()
                    async for response in llm.Generate(llm_pb.GenerateRequest(), timeout=5):
                        stamp = float(response.delta.text)
                        figures["call"].append(stamp - sent)
                        figures["call_back"].append(time.monotonic() - stamp)
                    await asyncio.sleep(gap_s)
                    sent = time.monotonic()
                    await audio.put(stt_pb.TranscribeRequest(audio=bytes(640)))
                    result = await stream.read()
                    stamp = float(result.result.transcript)
                    figures["msg"].append(stamp - sent)
                    figures["msg_back"].append(time.monotonic() - stamp)
                row = " | ".join(f"{statistics.median(v) * 1000:.2f} ms" for v in figures.values())
                print(f"| {gap_s * 1000:g} ms | {row} |", flush=True)
        finally:
            stream.cancel()


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        configure_logging("hops", "info")
        uvloop.run(serve())
        return
    server = ServiceProcess("bench.hops", ["--serve"])
    try:
        uvloop.run(measure(server.port))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
