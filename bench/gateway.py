"""The WebSocket gateway's cost: the latency it adds, side by side with direct gRPC, and the
sessions one gateway core carries in real time.

    python -m bench.gateway [--turns 200] [--sessions 10,40] [--window 15]

One stub stack (`instant` profile) and one gateway in front of its orchestrator, all on loopback.

Added latency: a typed turn's time to first audio as the caller sees it (from sending the text
to the first reply audio byte), once over a WebSocket to the gateway and once over gRPC straight
to the orchestrator (the client library), alternating turn by turn; each turn on a new
conversation (a typed turn waits for the previous reply to finish playing). The gateway adds the
difference, quoted at p50 and p99.

Capacity: N callers at once, each sending 20 ms frames in real time (a phrase in the stub audio
code, then silence, over and over) and receiving every reply, first over WebSockets through the
gateway, then the same N over gRPC straight to the orchestrator. The gateway's CPU time over the
window (from /proc) gives its cores used, CPU per session and sessions per core; the callers'
TTFA, side by side with the direct path's, and their frames sent late say whether it kept real
time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import grpc
import numpy as np

from bench import procstat
from bench.workload import percentile
from stubs import audio_code
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe_client import (
    PCM_16K,
    Conversation,
    Microphone,
    SessionSettings,
    TurnAssembler,
    Utterance,
    connect,
)
from voicepipe_tools.stack import LocalStack, start_gateway, start_stack

QUESTION = "What is 2 plus 3?"
EVENT_TIMEOUT_S = 10.0
FRAME_S = 0.02
# A caller's cycle: the phrase, then silence while the reply (about 1.5 s) plays, and a pause.
CYCLE_SILENCE_S = 3.0
# A frame sent this much after its due time counts as late (the caller could not keep up).
LATE_S = 0.02
# The callers start spread over this long; the window is measured after it.
RAMP_S = 1.5


def _ms(values: list[float], q: float) -> float:
    result = percentile(values, q)
    return round((result or 0.0) * 1000, 2)


async def grpc_turn(target: str) -> float:
    async with connect(target) as channel:
        conversation = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False))
        async with conversation:
            await conversation.assembler.session_started.wait()
            turn = await conversation.type(QUESTION)
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                await turn.first_audio.wait()
    assert turn.ttfa_s is not None, turn.errors
    return turn.ttfa_s


async def websocket_turn(http: aiohttp.ClientSession, url: str) -> float:
    async with http.ws_connect(url) as socket:
        await socket.send_str(json.dumps({"type": "config"}))
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while json.loads((await socket.receive()).data)["type"] != "session_started":
                pass
            sent = time.monotonic()
            await socket.send_str(json.dumps({"type": "text", "text": QUESTION}))
            while (await socket.receive()).type != aiohttp.WSMsgType.BINARY:
                pass
            return time.monotonic() - sent


async def added_latency(stack: LocalStack, turns: int) -> dict[str, float]:
    assert stack.orchestrator is not None and stack.gateway is not None
    url = f"ws://127.0.0.1:{stack.gateway.port}/ws"
    direct: list[float] = []
    gateway: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm-up
            await grpc_turn(stack.orchestrator.target)
            await websocket_turn(http, url)
        for i in range(turns):
            if i % 2:
                direct.append(await grpc_turn(stack.orchestrator.target))
                gateway.append(await websocket_turn(http, url))
            else:
                gateway.append(await websocket_turn(http, url))
                direct.append(await grpc_turn(stack.orchestrator.target))
    return {
        "turns": turns,
        "direct_p50_ms": _ms(direct, 50),
        "gateway_p50_ms": _ms(gateway, 50),
        "added_p50_ms": round(_ms(gateway, 50) - _ms(direct, 50), 2),
        "direct_p99_ms": _ms(direct, 99),
        "gateway_p99_ms": _ms(gateway, 99),
        "added_p99_ms": round(_ms(gateway, 99) - _ms(direct, 99), 2),
    }


@dataclass
class Caller:
    """One real-time caller's record: it hears a turn start, then times its first reply audio."""

    ttfa_s: list[float] = field(default_factory=list)
    frames: int = 0
    late_frames: int = 0
    replies: int = 0
    speech_ended_at: float = 0.0
    awaiting_audio: bool = False

    def event(self, kind: str) -> None:
        """An event of the conversation ("audio" for reply audio), as it arrives."""
        if kind == "audio":
            if self.awaiting_audio:
                self.ttfa_s.append(time.monotonic() - self.speech_ended_at)
                self.awaiting_audio = False
        elif kind == "turn_started":
            self.awaiting_audio = True
        elif kind == "turn_completed":
            self.replies += 1


class GrpcListener:
    """The client library's EventListener feeding a Caller (the direct path)."""

    def __init__(self, record: Caller) -> None:
        self.record = record

    def on_event(self, response: pb.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        self.record.event("audio" if kind == "reply_audio" else kind or "")

    def on_end(self) -> None:
        pass


Send = Callable[[bytes], Awaitable[object]]


@contextlib.asynccontextmanager
async def websocket_path(http: aiohttp.ClientSession, url: str, record: Caller) -> AsyncIterator[Send]:
    async with http.ws_connect(url) as socket:
        await socket.send_str(json.dumps({"type": "config"}))

        async def read() -> None:
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY:
                    record.event("audio")
                elif message.type == aiohttp.WSMsgType.TEXT:
                    record.event(json.loads(message.data)["type"])

        reader = asyncio.create_task(read(), name="bench-reader")
        try:
            yield socket.send_bytes
        finally:
            await cancel_and_wait(reader)


@contextlib.asynccontextmanager
async def grpc_path(channel: grpc.aio.Channel, record: Caller) -> AsyncIterator[Send]:
    assembler = TurnAssembler(PCM_16K, keep_audio=False, listener=GrpcListener(record))
    conversation = Conversation(
        channel, SessionSettings(), microphone=Microphone(realtime=False), assembler=assembler
    )
    async with conversation:
        yield conversation.send_audio


async def real_time_caller(
    path: contextlib.AbstractAsyncContextManager[Send], record: Caller, until: float
) -> None:
    """Sends the phrase-and-silence cycle in real time, 20 ms per frame, until `until`."""
    phrase = audio_code.render(QUESTION, PCM_16K.sample_rate)
    cycle = np.concatenate([phrase.samples, np.zeros(int(CYCLE_SILENCE_S * PCM_16K.sample_rate), np.int16)])
    utterance = Utterance.from_samples(cycle, PCM_16K, phrase.speech_end_samples)
    async with path as send:
        start = time.monotonic()
        while (due := start + record.frames * FRAME_S) < until:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > LATE_S:
                record.late_frames += 1
            position = record.frames % len(utterance.frames)
            await send(utterance.frames[position])
            if position == utterance.speech_end_frame:
                record.speech_ended_at = time.monotonic()
            record.frames += 1


async def capacity_step(
    stack: LocalStack, sessions: int, window_s: float, via: str
) -> dict[str, float | str]:
    """N callers at once over one path; the CPU of the process the path adds (the gateway's, or
    for the direct path the orchestrator's, for scale)."""
    assert stack.gateway is not None and stack.orchestrator is not None
    url = f"ws://127.0.0.1:{stack.gateway.port}/ws"
    pid = (stack.gateway if via == "gateway" else stack.orchestrator).process.pid
    records = [Caller() for _ in range(sessions)]
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        connect(stack.orchestrator.target) as channel,
    ):
        until = time.monotonic() + RAMP_S + window_s

        async def call(i: int) -> None:
            await asyncio.sleep(i * RAMP_S / sessions)  # spread the callers' phases
            path = (
                websocket_path(http, url, records[i]) if via == "gateway" else grpc_path(channel, records[i])
            )
            await real_time_caller(path, records[i], until)

        callers = [asyncio.create_task(call(i), name=f"bench-caller-{i}") for i in range(sessions)]
        try:
            await asyncio.sleep(RAMP_S)  # every caller is talking: measure from here
            gateway_before = procstat.sample(stack.gateway.process.pid).cpu_s
            callers_before = procstat.sample(os.getpid()).cpu_s
            before, started = procstat.sample(pid).cpu_s, time.monotonic()
            await asyncio.gather(*callers)
            cpu_s, elapsed = procstat.sample(pid).cpu_s - before, time.monotonic() - started
            gateway_cpu_s = procstat.sample(stack.gateway.process.pid).cpu_s - gateway_before
            callers_cpu_s = procstat.sample(os.getpid()).cpu_s - callers_before
        finally:
            await cancel_and_wait(*callers)
    ttfa = [t for record in records for t in record.ttfa_s]
    frames = sum(record.frames for record in records)
    gateway_cores = gateway_cpu_s / elapsed
    return {
        "via": via,
        "sessions": sessions,
        "replies": sum(record.replies for record in records),
        "ttfa_p50_ms": _ms(ttfa, 50),
        "ttfa_p99_ms": _ms(ttfa, 99),
        "late_frames_pct": round(100 * sum(r.late_frames for r in records) / max(frames, 1), 2),
        # The callers' own process: a saturated load generator delays what it reads.
        "callers_cores": round(callers_cpu_s / elapsed, 3),
        "orchestrator_cores" if via == "direct" else "gateway_cores": round(cpu_s / elapsed, 3),
        **(
            {
                "cpu_ms_per_session_second": round(1000 * gateway_cores / sessions, 2),
                "sessions_per_core": round(sessions / gateway_cores) if gateway_cores else 0,
            }
            if via == "gateway"
            else {}
        ),
    }


async def main(args: argparse.Namespace) -> None:
    stack = await start_stack("instant", ephemeral=True, orchestrator_flags=["--max-sessions", "5000"])
    try:
        await start_gateway(stack, ephemeral=True, certificates=None)
        print(json.dumps({"added_latency": await added_latency(stack, args.turns)}), flush=True)
        for sessions in args.sessions:
            for via in ("gateway", "direct"):
                step = await capacity_step(stack, sessions, args.window, via)
                print(json.dumps({"capacity": step}), flush=True)
    finally:
        await asyncio.to_thread(stack.stop)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--turns", type=int, default=200, help="turns per path for the added latency")
    parser.add_argument(
        "--sessions",
        type=lambda value: [int(n) for n in value.split(",")],
        default=[10, 40],
        help="concurrent WebSocket callers, one step each",
    )
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per step")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
