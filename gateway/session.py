"""One WebSocket bridged to one Converse call through the client library: the socket's frames
go to the call, the call's events come back as JSON and binary frames, and the socket is closed
with a code that says how the conversation ended (gateway.protocol)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from aiohttp import WSMsgType, web

from gateway import metrics
from gateway.protocol import (
    GOING_AWAY,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    ClientConfig,
    ProtocolError,
    close_code,
    close_reason,
    event_text,
    parse_message,
)
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe_client import Conversation, ConversationEnded, Microphone, TurnAssembler

log = logging.getLogger(__name__)

# What the event queue holds: a frame to send, an error that ends the session, or the call's end.
_Outgoing = str | bytes | ProtocolError | None


@dataclass(frozen=True)
class SessionLimits:
    """What one socket may do, and how long the gateway waits for it and for the orchestrator."""

    max_frame_bytes: int
    max_messages_per_second: float
    config_timeout_s: float
    connect_timeout_s: float
    session_timeout_s: float
    max_pending_events: int


class MessageRate:
    """A token bucket: bursts of up to one second's allowance, `per_second` on average."""

    def __init__(self, per_second: float) -> None:
        self._per_second = per_second
        self._tokens = per_second
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._per_second, self._tokens + (now - self._at) * self._per_second)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class SocketSession:
    """One caller: `run()` bridges the socket to a Converse call until either ends."""

    def __init__(
        self,
        socket: web.WebSocketResponse,
        channel: grpc.aio.Channel,
        limits: SessionLimits,
        *,
        token: str,
        shutting_down: asyncio.Event,
    ) -> None:
        """`token` is the bearer token to use when the config brings none (a reverse proxy's
        header, or the gateway's own); once `shutting_down` is set the socket is closed with
        1001."""
        self._socket = socket
        self._channel = channel
        self._limits = limits
        self._token = token
        self._shutting_down = shutting_down
        self._rate = MessageRate(limits.max_messages_per_second)
        self._outgoing: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._input_ended = False

    async def run(self) -> None:
        code, reason = NORMAL_CLOSURE, ""
        conversation: Conversation | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            config = await self._first_config()
            await self._connect()
            conversation = self._conversation(config)
            await conversation.open()
            tasks = [
                asyncio.create_task(self._forward_input(conversation), name="gateway-input"),
                asyncio.create_task(self._forward_events(), name="gateway-events"),
                asyncio.create_task(self._going_away(), name="gateway-going-away"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a protocol error of either direction, or the shutdown
            if tasks[1] in done:  # the call ended: say how
                assert conversation.code is not None
                code, reason = close_code(conversation.code), conversation.details
        except ProtocolError as error:
            code, reason = error.code, str(error)
        finally:
            await cancel_and_wait(*tasks)
            if conversation is not None:
                await conversation.close()
            await self._socket.close(code=code, message=close_reason(reason).encode())
        metrics.CLOSES.labels(str(code)).inc()
        session_id = conversation.assembler.session_id if conversation is not None else ""
        log.info("socket closed", extra={"session_id": session_id, "close_code": code, "reason": reason})

    async def _going_away(self) -> None:
        await self._shutting_down.wait()
        raise ProtocolError(GOING_AWAY, "the gateway is shutting down")

    async def _first_config(self) -> ClientConfig:
        try:
            async with asyncio.timeout(self._limits.config_timeout_s):
                message = await self._socket.receive()
        except TimeoutError:
            raise ProtocolError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no config within {self._limits.config_timeout_s:g} s"
            ) from None
        if message.type == WSMsgType.BINARY:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "audio before config")
        if message.type != WSMsgType.TEXT:
            raise ProtocolError(grpc.StatusCode.CANCELLED, "the socket closed before config")
        self._check_size(len(message.data.encode()))
        parsed = parse_message(message.data)
        if parsed["type"] != "config":
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f'"{parsed["type"]}" before config')
        return ClientConfig.parse(parsed)

    async def _connect(self) -> None:
        """Waits (bounded) for the orchestrator's channel: a caller never waits on a dead one."""
        try:
            async with asyncio.timeout(self._limits.connect_timeout_s):
                await self._channel.channel_ready()
        except TimeoutError:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, "the orchestrator is unreachable") from None

    def _conversation(self, config: ClientConfig) -> Conversation:
        token = config.token or self._token
        return Conversation(
            self._channel,
            config.settings,
            microphone=Microphone(realtime=False),  # audio comes from the socket (send_audio)
            timeout_s=self._limits.session_timeout_s,
            assembler=TurnAssembler(config.settings.output_format, keep_audio=False, listener=self),
            metadata=(("authorization", f"Bearer {token}"),) if token else (),
        )

    def _check_size(self, size: int) -> None:
        if size > self._limits.max_frame_bytes:
            raise ProtocolError(
                MESSAGE_TOO_BIG, f"a frame of {size} bytes; at most {self._limits.max_frame_bytes}"
            )

    # --- socket -> call -----------------------------------------------------------------------

    async def _forward_input(self, conversation: Conversation) -> None:
        """Returns when the client closes the socket."""
        async for message in self._socket:
            if message.type == WSMsgType.ERROR:  # past aiohttp's own size bound: it has closed
                return
            if not self._rate.allow():
                raise ProtocolError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {self._limits.max_messages_per_second:g} messages per second",
                )
            if self._input_ended:
                raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "input after end_of_input")
            if message.type == WSMsgType.BINARY:
                self._check_size(len(message.data))
                metrics.AUDIO_IN.inc()
                await conversation.send_audio(message.data)
            elif message.type == WSMsgType.TEXT:
                self._check_size(len(message.data.encode()))
                await self._control(conversation, parse_message(message.data))

    async def _control(self, conversation: Conversation, message: dict[str, object]) -> None:
        kind = message["type"]
        if kind == "text":
            text = message.get("text")
            if not isinstance(text, str):
                raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, '"text" needs a string "text"')
            try:
                await conversation.type(text)
            except ConversationEnded:
                return  # as audio after the call's end: the socket closes with the call's status
        elif kind == "barge_in":
            await conversation.interrupt()
        elif kind == "end_of_input":
            self._input_ended = True
            await conversation.end_input()
        elif kind == "config":
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "a second config")
        else:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f'unknown message type "{kind}"')

    # --- call -> socket -----------------------------------------------------------------------

    # EventListener: told of each event by the conversation's reader, in order.
    def on_event(self, response: pb.ConverseResponse) -> None:
        if self._outgoing.qsize() >= self._limits.max_pending_events:
            self._outgoing.put_nowait(
                ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the client reads too slowly")
            )
        elif response.WhichOneof("event") == "reply_audio":
            self._outgoing.put_nowait(response.reply_audio.audio)
        elif (text := event_text(response)) is not None:
            self._outgoing.put_nowait(text)

    def on_end(self) -> None:
        self._outgoing.put_nowait(None)

    async def _forward_events(self) -> None:
        """Returns once every event of the call has been sent."""
        while (item := await self._outgoing.get()) is not None:
            if isinstance(item, ProtocolError):
                raise item
            if isinstance(item, bytes):
                metrics.AUDIO_OUT.inc()
                await self._socket.send_bytes(item)
            else:
                await self._socket.send_str(item)
