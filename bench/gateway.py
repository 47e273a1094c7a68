"""The WebSocket gateway's cost: the latency it adds, side by side with direct gRPC, and the
sessions one gateway core carries in real time.

    python -m bench.gateway [--turns 200] [--sessions 10,40] [--window 15]

One stub stack (`instant` profile) and one gateway in front of its orchestrator, all on loopback.

Added latency: a typed turn's time to first audio as the caller sees it (from sending the text
to the first reply audio byte), once over a WebSocket to the gateway and once over gRPC straight
to the orchestrator (the client library), alternating turn by turn; each turn on a new
conversation (a typed turn waits for the previous reply to finish playing). The gateway adds the
difference, quoted at p50 and p99.

Capacity: N WebSocket callers at once, each sending 20 ms frames in real time (a phrase in the
stub audio code, then silence, over and over) and receiving every reply. The gateway's CPU time
over the window (from /proc) gives its cores used, CPU per session and sessions per core; the
callers' TTFA p99 and their frames sent late say whether it kept real time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from bench import procstat
from bench.workload import percentile
from orchestrator.stack import LocalStack, start_gateway, start_stack
from stubs import audio_code
from voicepipe_client import PCM_16K, Conversation, Microphone, SessionSettings, Utterance, connect

QUESTION = "What is 2 plus 3?"
EVENT_TIMEOUT_S = 10.0
FRAME_S = 0.02
# A caller's cycle: the phrase, then silence while the reply (about 1.5 s) plays, and a pause.
CYCLE_SILENCE_S = 3.0
# A frame sent this much after its due time counts as late (the caller could not keep up).
LATE_S = 0.02


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
    """One real-time WebSocket caller's record."""

    ttfa_s: list[float] = field(default_factory=list)
    frames: int = 0
    late_frames: int = 0
    replies: int = 0


async def real_time_caller(http: aiohttp.ClientSession, url: str, until: float, offset_s: float) -> Caller:
    phrase = audio_code.render(QUESTION, PCM_16K.sample_rate)
    cycle = np.concatenate([phrase.samples, np.zeros(int(CYCLE_SILENCE_S * PCM_16K.sample_rate), np.int16)])
    utterance = Utterance.from_samples(cycle, PCM_16K, phrase.speech_end_samples)
    record = Caller()
    speech_ended: list[float] = []
    await asyncio.sleep(offset_s)  # spread the callers' phases
    async with http.ws_connect(url) as socket:
        await socket.send_str(json.dumps({"type": "config"}))

        async def read() -> None:
            awaiting_audio = False
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY and awaiting_audio and speech_ended:
                    record.ttfa_s.append(time.monotonic() - speech_ended[-1])
                    awaiting_audio = False
                elif message.type == aiohttp.WSMsgType.TEXT:
                    kind = json.loads(message.data)["type"]
                    awaiting_audio = awaiting_audio or kind == "turn_started"
                    record.replies += kind == "turn_completed"

        reader = asyncio.create_task(read(), name="bench-reader")
        try:
            start = time.monotonic()
            while (due := start + record.frames * FRAME_S) < until:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif -delay > LATE_S:
                    record.late_frames += 1
                position = record.frames % len(utterance.frames)
                await socket.send_bytes(utterance.frames[position])
                if position == utterance.speech_end_frame:
                    speech_ended.append(time.monotonic())
                record.frames += 1
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return record


async def capacity(stack: LocalStack, sessions: int, window_s: float) -> dict[str, float]:
    assert stack.gateway is not None
    url = f"ws://127.0.0.1:{stack.gateway.port}/ws"
    pid = stack.gateway.process.pid
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        until = time.monotonic() + window_s + 1.2
        callers = [
            asyncio.create_task(real_time_caller(http, url, until, i / sessions)) for i in range(sessions)
        ]
        await asyncio.sleep(1.2)  # every caller has connected (offsets < 1 s); measure from here
        before, started = procstat.sample(pid).cpu_s, time.monotonic()
        records = await asyncio.gather(*callers)
        cpu_s, elapsed = procstat.sample(pid).cpu_s - before, time.monotonic() - started
    cores = cpu_s / elapsed
    ttfa = [t for record in records for t in record.ttfa_s]
    frames = sum(record.frames for record in records)
    return {
        "sessions": sessions,
        "replies": sum(record.replies for record in records),
        "ttfa_p50_ms": _ms(ttfa, 50),
        "ttfa_p99_ms": _ms(ttfa, 99),
        "late_frames_pct": round(100 * sum(r.late_frames for r in records) / max(frames, 1), 2),
        "gateway_cores": round(cores, 3),
        "cpu_ms_per_session_second": round(1000 * cores / sessions, 2),
        "sessions_per_core": round(sessions / cores, 0) if cores else 0.0,
    }


async def main(args: argparse.Namespace) -> None:
    stack = await start_stack("instant", ephemeral=True, orchestrator_flags=["--max-sessions", "5000"])
    try:
        await start_gateway(stack, ephemeral=True, certificates=None)
        print(json.dumps({"added_latency": await added_latency(stack, args.turns)}), flush=True)
        for sessions in args.sessions:
            print(json.dumps({"capacity": await capacity(stack, sessions, args.window)}), flush=True)
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
