"""Helpers for the gateway's tests: a gateway process in front of an orchestrator, a WebSocket
caller speaking the gateway's protocol (aiohttp's client), and a headless chromium whose
microphone plays a WAV file."""

from __future__ import annotations

import asyncio
import json
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
from playwright.async_api import Browser, async_playwright

from voicepipe.processes import ServiceProcess, stage_args

CHROMIUM = "/usr/bin/chromium"
EVENT_TIMEOUT_S = 10.0


@asynccontextmanager
async def gateway(orchestrator: str, *flags: str) -> AsyncIterator[ServiceProcess]:
    """`python -m gateway` on ephemeral ports in front of `orchestrator`; stopped on exit."""
    process = await asyncio.to_thread(
        ServiceProcess, "gateway", stage_args(0, 0, "--orchestrator", orchestrator, *flags)
    )
    try:
        yield process
    finally:
        await asyncio.to_thread(process.stop)


def ws_url(process: ServiceProcess) -> str:
    return f"ws://127.0.0.1:{process.port}/ws"


def page_url(process: ServiceProcess) -> str:
    return f"http://127.0.0.1:{process.port}/"


class SocketCaller:
    """One WebSocket conversation: JSON events and reply audio kept in arrival order."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self.audio = bytearray()
        self.close_code: int | None = None
        self.close_reason = ""

    async def send(self, message: dict[str, Any]) -> None:
        await self.socket.send_str(json.dumps(message))

    async def configure(self, **fields: Any) -> None:
        await self.send({"type": "config", **fields})

    async def until(self, kind: str, timeout_s: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        """Reads until an event of `kind` arrives (returned); fails if the socket closes first."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self._next(kind)
                if event is not None and event["type"] == kind:
                    return event

    async def until_audio(self, size: int, timeout_s: float = EVENT_TIMEOUT_S) -> None:
        """Reads until `size` bytes of reply audio have arrived; fails if the socket closes first."""
        async with asyncio.timeout(timeout_s):
            while len(self.audio) < size:
                await self._next(f"{size} bytes of audio")

    async def _next(self, awaited: str) -> dict[str, Any] | None:
        """One message, kept: an event (returned) or reply audio (None); fails if the socket
        closes before what is `awaited`."""
        message = await self.socket.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            event: dict[str, Any] = json.loads(message.data)
            self.events.append(event)
            return event
        if message.type == aiohttp.WSMsgType.BINARY:
            self.audio += message.data
            return None
        self._closed(message)
        raise AssertionError(f"closed ({self.close_code} {self.close_reason!r}) before {awaited}")

    async def closed(self, timeout_s: float = EVENT_TIMEOUT_S) -> tuple[int | None, str]:
        """Reads until the gateway closes the socket: its close code and reason."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.socket.receive()
                if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    continue
                self._closed(message)
                return self.close_code, self.close_reason

    def _closed(self, message: aiohttp.WSMessage) -> None:
        self.close_code = self.socket.close_code
        self.close_reason = (message.extra or "") if message.type == aiohttp.WSMsgType.CLOSE else ""


@asynccontextmanager
async def socket_caller(url: str, **options: Any) -> AsyncIterator[SocketCaller]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, **options) as socket:
        yield SocketCaller(socket)


def write_wav(path: Path, samples: npt.NDArray[np.int16], sample_rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return path


@asynccontextmanager
async def chromium(microphone: Path) -> AsyncIterator[Browser]:
    """Debian's chromium, headless, whose fake microphone plays `microphone` (an absolute path)
    once per page (then its last 10 ms again: the WAV should end with silence)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}%noloop",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()
