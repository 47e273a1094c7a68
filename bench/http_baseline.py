"""Baseline 1: the design voicepipe replaces. One HTTP/1.1 JSON request per stage per turn, over
pooled keep-alive connections: the whole utterance to STT, the whole reply from the LLM, the
whole audio from TTS. Written with the standard library only (asyncio streams and a minimal
HTTP/1.1), for the benchmark alone.

    python -m bench.http_baseline --role stt|llm|tts --port 0
    python -m bench.http_baseline --role orchestrator --stt H:P --llm H:P --tts H:P --port 0

The stages take exactly the times of the stubs' `realistic` profile (stubs.latency), where
the work is the same: STT answers `stt_processing_ms` after it has the whole audio (the caller's
own voice-activity detector already waited the end-of-utterance silence, as the streaming STT
does), the LLM answers with its whole reply when its last token would have been streamed
(first token + tokens / tokens_per_second), TTS answers with the whole audio when its last
chunk would have been streamed (first audio + duration / realtime_factor). Replies and audio
are the stubs' own (stubs.replies, the stub audio code), so every answer can be checked.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stubs import audio_code, replies
from stubs.latency import PROFILES, LatencyProfile
from voicepipe.logs import configure_logging
from voicepipe.server import wait_for_shutdown_signal
from voicepipe.stage.llm import Message

log = logging.getLogger(__name__)

Json = dict[str, Any]
Handler = Callable[[Json], Awaitable[Json]]

MAX_HEADER_LINES = 64
MAX_BODY_BYTES = 64 * 1024 * 1024
# aiohttp's default connection limit per client, a common choice for such a design.
POOL_SIZE = 100
STAGE_TIMEOUT_S = 30.0


class HttpError(Exception):
    """A malformed message or a non-200 answer."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


async def _read_message(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """Start line, headers and body of one HTTP/1.1 message; None at a clean end of stream."""
    start = await reader.readline()
    if not start:
        return None
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise HttpError("connection closed inside the headers")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError("too many header lines")
    length = int(headers.get("content-length", "0"))
    if not 0 <= length <= MAX_BODY_BYTES:
        raise HttpError(f"body of {length} bytes refused")
    body = await reader.readexactly(length) if length else b""
    return start.decode("latin-1").strip(), headers, body


def _encode(start: str, payload: Json) -> bytes:
    body = json.dumps(payload).encode()
    head = f"{start}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


class HttpServer:
    """Keep-alive HTTP/1.1 server of JSON POST routes."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self._routes = routes
        self._connections: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while (message := await _read_message(reader)) is not None:
                start, _headers, body = message
                method, path, _version = start.split(" ", 2)
                handler = self._routes.get(path) if method == "POST" else None
                if handler is None:
                    writer.write(_encode("HTTP/1.1 404 Not Found", {"error": f"no route {method} {path}"}))
                else:
                    try:
                        answer = await handler(json.loads(body))
                        writer.write(_encode("HTTP/1.1 200 OK", answer))
                    except (KeyError, ValueError, HttpError, OSError, TimeoutError) as error:
                        writer.write(_encode("HTTP/1.1 500 Internal Server Error", {"error": repr(error)}))
                await writer.drain()
        except (HttpError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class ConnectionPool:
    """Keep-alive connections to one server, at most `size` at a time, reused across requests."""

    def __init__(self, host: str, port: int, size: int = POOL_SIZE) -> None:
        self._host = host
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def post(self, path: str, payload: Json, *, timeout_s: float = STAGE_TIMEOUT_S) -> Json:
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else await self._connect()
            try:
                async with asyncio.timeout(timeout_s):
                    writer.write(_encode(f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}", payload))
                    await writer.drain()
                    message = await _read_message(reader)
            except BaseException:
                writer.close()
                raise
            if message is None:
                writer.close()
                raise HttpError(f"{path}: connection closed before the response")
            status, _headers, body = message
            self._idle.append((reader, writer))
            answer: Json = json.loads(body)
            if not status.startswith("HTTP/1.1 200"):
                raise HttpError(f"{path}: {status}: {answer.get('error')}")
            return answer

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self._host, self._port)

    async def close(self) -> None:
        for _reader, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# --- the stages ----------------------------------------------------------------------------


def stage_routes(role: str, profile: LatencyProfile) -> dict[str, Handler]:
    async def recognize(request: Json) -> Json:
        received = time.monotonic()
        samples = audio_code.bytes_to_pcm16(unb64(request["audio"]))
        texts = audio_code.decode_utterances(samples, int(request["sample_rate_hertz"]))
        await _until(received + profile.stt_processing_ms / 1000)
        return {"transcript": " ".join(texts), "processing_ms": (time.monotonic() - received) * 1000}

    async def generate(request: Json) -> Json:
        received = time.monotonic()
        messages = [Message(m["role"], m["content"]) for m in request["messages"]]
        tokens = replies.tokenize(replies.reply(messages))
        interval = 1 / profile.llm_tokens_per_second if profile.llm_tokens_per_second else 0.0
        first = profile.llm_first_token_ms / 1000
        await _until(received + first + max(0, len(tokens) - 1) * interval)
        return {
            "text": "".join(tokens),
            "completion_tokens": len(tokens),
            "first_token_ms": first * 1000,
            "total_ms": (time.monotonic() - received) * 1000,
        }

    async def synthesize(request: Json) -> Json:
        received = time.monotonic()
        rate = int(request["sample_rate_hertz"])
        rendered = audio_code.render(request["text"], rate, trailing_silence_ms=audio_code.WORD_GAP_MS)
        factor = profile.tts_realtime_factor
        produce_s = rendered.duration_seconds / factor if factor else 0.0
        await _until(received + profile.tts_first_audio_ms / 1000 + produce_s)
        return {
            "audio": b64(audio_code.pcm16_to_bytes(rendered.samples)),
            "audio_duration_ms": rendered.duration_seconds * 1000,
            "synthesis_ms": (time.monotonic() - received) * 1000,
        }

    routes: dict[str, dict[str, Handler]] = {
        "stt": {"/v1/recognize": recognize},
        "llm": {"/v1/generate": generate},
        "tts": {"/v1/synthesize": synthesize},
    }
    return routes[role]


class OldOrchestrator:
    """POST /v1/turn: the whole utterance in, then STT, LLM and TTS one after another, each one
    request on a pooled keep-alive connection, and the whole reply out."""

    def __init__(self, stt: str, llm: str, tts: str) -> None:
        self._stt, self._llm, self._tts = (ConnectionPool(*_host_port(t)) for t in (stt, llm, tts))

    def routes(self) -> dict[str, Handler]:
        return {"/v1/turn": self.turn}

    async def turn(self, request: Json) -> Json:
        received = time.monotonic()
        rate = int(request["sample_rate_hertz"])
        stt = await self._stt.post("/v1/recognize", {"audio": request["audio"], "sample_rate_hertz": rate})
        messages = [*request.get("history", []), {"role": "user", "content": stt["transcript"]}]
        llm = await self._llm.post("/v1/generate", {"messages": messages})
        tts = await self._tts.post("/v1/synthesize", {"text": llm["text"], "sample_rate_hertz": rate})
        return {
            "transcript": stt["transcript"],
            "reply": llm["text"],
            "audio": tts["audio"],
            "stage_ms": {
                "stt": stt["processing_ms"],
                "llm": llm["total_ms"],
                "llm_first_token": llm["first_token_ms"],
                "tts": tts["synthesis_ms"],
            },
            "handling_ms": (time.monotonic() - received) * 1000,
        }

    async def close(self) -> None:
        for pool in (self._stt, self._llm, self._tts):
            await pool.close()


def _host_port(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    orchestrator = OldOrchestrator(args.stt, args.llm, args.tts) if args.role == "orchestrator" else None
    routes = orchestrator.routes() if orchestrator else stage_routes(args.role, PROFILES["realistic"])
    server = HttpServer(routes)
    port = await server.start(args.host, args.port)
    log.info("ready", extra={"port": port, "role": args.role})
    try:
        await wait_for_shutdown_signal()
    finally:
        await server.stop()
        if orchestrator is not None:
            await orchestrator.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_baseline", description=__doc__)
    parser.add_argument("--role", required=True, choices=("stt", "llm", "tts", "orchestrator"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stt", default="")
    parser.add_argument("--llm", default="")
    parser.add_argument("--tts", default="")
    args = parser.parse_args()
    configure_logging(f"http_{args.role}", "info")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
