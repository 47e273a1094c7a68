"""Baseline 2: the transport floor. A bare grpc.aio relay with no pipeline logic: each Converse
call gets one Transcribe call to the STT stage; audio frames go through unchanged and STT
results come back as transcripts. No interceptors, metrics, health watches, breakers, replay
buffers or turns: what remains is the cost of moving the same frames through a grpc.aio process.

    python -m bench.relay --stt 127.0.0.1:50052 --port 0

For the load generator to time it the same way, a final result is followed by a TurnCompleted
whose latency carries only the STT's finalisation time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from voice.v1 import speech_to_text_pb2, speech_to_text_pb2_grpc, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.logs import configure_logging
from voicepipe.server import wait_for_shutdown_signal

log = logging.getLogger(__name__)


class RelayServicer(voice_agent_pb2_grpc.VoiceAgentServiceServicer):
    def __init__(self, stt: grpc.aio.Channel) -> None:
        self._stt: Any = speech_to_text_pb2_grpc.SpeechToTextServiceStub(stt)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ConverseResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be config")
        call = self._stt.Transcribe()
        await call.write(
            speech_to_text_pb2.TranscribeRequest(
                config=speech_to_text_pb2.TranscriptionConfig(
                    audio_format=first.config.input_audio_format, interim_results=True
                )
            )
        )
        pump = asyncio.create_task(self._pump(requests, call), name="relay-pump")
        try:
            yield pb.ConverseResponse(session_started=pb.SessionStarted(session_id="relay"))
            async for response in call:
                if not response.HasField("result"):
                    continue
                result = response.result
                yield pb.ConverseResponse(
                    user_transcript=pb.UserTranscript(text=result.transcript, is_final=result.is_final)
                )
                if result.is_final:
                    latency = pb.LatencyBreakdown(stt_finalization=result.finalization_time)
                    yield pb.ConverseResponse(turn_completed=pb.TurnCompleted(latency=latency))
            await pump
        finally:
            pump.cancel()
            call.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    @staticmethod
    async def _pump(requests: AsyncIterator[pb.ConverseRequest], call: Any) -> None:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "audio":
                await call.write(speech_to_text_pb2.TranscribeRequest(audio=request.audio))
            elif kind == "control":
                break
        await call.done_writing()


async def serve(args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(args.stt) as stt:
        server = grpc.aio.server()
        voice_agent_pb2_grpc.add_VoiceAgentServiceServicer_to_server(RelayServicer(stt), server)
        port = server.add_insecure_port(f"{args.host}:{args.port}")
        await server.start()
        log.info("ready", extra={"port": port})
        try:
            await wait_for_shutdown_signal()
        finally:
            await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--stt", required=True, help="gRPC target of the STT stage")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    configure_logging("relay", "info")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
