"""The gateway's HTTP side: the page, the WebSocket endpoint, the health endpoint, and the
drain on shutdown (health says not ready, new connections stop, open sockets get a grace)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from gateway import metrics
from gateway.protocol import close_code, close_reason
from gateway.session import SessionLimits, SocketSession
from voicepipe.tls import ServerTls

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# aiohttp's own bound on one message: past it aiohttp closes with 1009 itself, without reading
# the message; below it the gateway's --max-frame-bytes check closes with a reason.
AIOHTTP_SIZE_FACTOR = 4


@dataclass(frozen=True)
class Admission:
    """Who may open a conversation, and with which token."""

    allowed_origins: frozenset[str]  # empty: the page's own origin only; "*": any
    token_header: str  # a reverse proxy's header with the caller's token ("" : none)
    default_token: str  # the token of callers that bring none
    max_sessions: int

    def origin_allowed(self, request: web.Request) -> bool:
        """Clients without an Origin (not browsers) are let in; a browser's page must come from
        the gateway itself or an allowed origin."""
        origin = request.headers.get("Origin")
        if origin is None or "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        return not self.allowed_origins and urlsplit(origin).netloc == request.host

    def token(self, request: web.Request) -> str:
        value = request.headers.get(self.token_header, "") if self.token_header else ""
        return value.removeprefix("Bearer ").strip() or self.default_token


class Gateway:
    """The aiohttp application and its listener."""

    def __init__(self, channel: grpc.aio.Channel, limits: SessionLimits, admission: Admission) -> None:
        self._channel = channel
        self._limits = limits
        self._admission = admission
        self._sessions: set[asyncio.Task[object]] = set()
        self._draining = False
        self.shutting_down = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/ws", self._websocket)
        self.app.router.add_get("/healthz", self._health)
        self.app.router.add_static("/static/", STATIC)
        self._runner = web.AppRunner(self.app, access_log=None)
        self._site: web.TCPSite | None = None

    async def start(self, host: str, port: int, tls: ServerTls | None) -> int:
        """Listens; returns the bound port."""
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context(tls) if tls else None)
        await self._site.start()
        bound: int = self._runner.addresses[0][1]
        return bound

    async def stop(self, drain_delay_s: float, grace_s: float) -> None:
        """Health says not ready for `drain_delay_s` (load balancers stop sending callers), then
        no new connections; open sockets get `grace_s` to finish, then are closed with 1001."""
        self._draining = True
        log.info("draining", extra={"drain_delay_s": drain_delay_s, "grace_s": grace_s})
        await asyncio.sleep(drain_delay_s)
        if self._site is not None:
            await self._site.stop()
        if self._sessions:
            await asyncio.wait(set(self._sessions), timeout=grace_s)
        self.shutting_down.set()
        if self._sessions:
            await asyncio.wait(set(self._sessions))
        await self._runner.cleanup()
        log.info("stopped")

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _health(self, request: web.Request) -> web.Response:
        if self._draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "serving"})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(
            max_msg_size=self._limits.max_frame_bytes * AIOHTTP_SIZE_FACTOR,
            heartbeat=20.0,
            # PCM hardly compresses: permessage-deflate (which browsers offer) would cost CPU for nothing.
            compress=False,
        )
        await socket.prepare(request)
        origin = request.headers.get("Origin", "")
        if not self._admission.origin_allowed(request):
            await close_refused(socket, grpc.StatusCode.PERMISSION_DENIED, f"origin {origin} is not allowed")
            return socket
        if len(self._sessions) >= self._admission.max_sessions:
            await close_refused(
                socket,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway is at its limit of {self._admission.max_sessions} conversations",
            )
            return socket
        session = SocketSession(
            socket,
            self._channel,
            self._limits,
            token=self._admission.token(request),
            shutting_down=self.shutting_down,
        )
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        metrics.OPENED.inc()
        metrics.SESSIONS.inc()
        try:
            await session.run()
        finally:
            self._sessions.discard(task)
            metrics.SESSIONS.dec()
        return socket


async def close_refused(socket: web.WebSocketResponse, status: grpc.StatusCode, reason: str) -> None:
    code = close_code(status)
    metrics.CLOSES.labels(str(code)).inc()
    log.info("socket refused", extra={"close_code": code, "reason": reason})
    await socket.close(code=code, message=close_reason(reason).encode())


def ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """The listener's TLS (wss) from the same flags as every server's; with a client CA, callers
    must present a certificate it issued."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certificate, tls.key)
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as error:
        raise SystemExit(f"cannot serve TLS: {error}") from None
    return context
