"""Helpers for end-to-end tests of the orchestrator: whole stacks of real processes, a caller that
keeps every event of a Converse call in arrival order, and an LLM proxy that records what the
orchestrator asked the language model."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from orchestrator.stack import LocalStack, start_stack
from stubs import audio_code
from voice.v1 import common_pb2, language_model_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args

if TYPE_CHECKING:
    from voice.v1.voice_agent_pb2_grpc import VoiceAgentServiceAsyncStub

T = TypeVar("T")

PCM_16K = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
FRAME_MS = 20
# Deadline of every Converse call a test makes, and how long a test waits for an expected event.
CONVERSE_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 10.0


# --- processes ------------------------------------------------------------------------------------


@asynccontextmanager
async def instant_stack(
    *, stage_flags: dict[str, list[str]] | None = None, orchestrator_flags: Sequence[str] = ()
) -> AsyncIterator[LocalStack]:
    """The four services on ephemeral ports with the `instant` latency profile; stopped on exit."""
    stack = await start_stack(
        "instant", ephemeral=True, stage_flags=stage_flags, orchestrator_flags=list(orchestrator_flags)
    )
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


class Processes:
    """Services started one by one (when a test needs to place something between them)."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    async def start(self, module: str, *extra: str, port: int = 0) -> ServiceProcess:
        process = await asyncio.to_thread(ServiceProcess, module, stage_args(port, 0, *extra))
        self.started.append(process)
        return process

    async def start_orchestrator(self, stt: str, llm: str, tts: str, *extra: str) -> ServiceProcess:
        """The orchestrator in front of the given stage targets (not waited on until SERVING)."""
        return await self.start("orchestrator", f"--stt={stt}", f"--llm={llm}", f"--tts={tts}", *extra)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()


@asynccontextmanager
async def processes() -> AsyncIterator[Processes]:
    group = Processes()
    try:
        yield group
    finally:
        await asyncio.to_thread(group.stop_all)


async def serving(process: ServiceProcess) -> ServiceProcess:
    await wait_until_serving(process.target, EVENT_TIMEOUT_S)
    return process


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- audio ------------------------------------------------------------------------------------------


def spoken(text: str, fmt: PcmFormat) -> bytes:
    """`text` in the stub audio code, in `fmt`, ending with the code's end-of-utterance silence."""
    return fmt.encode(audio_code.encode(text, fmt.sample_rate))


def heard(audio: bytes, fmt: PcmFormat) -> list[str]:
    """What a listener decodes from reply audio: the final text of each utterance. The TTS ends
    a reply with a word gap only, so the stream's end closes the last utterance (`finish`)."""
    return audio_code.decode_utterances(fmt.decode(audio), fmt.sample_rate)


# --- a Converse call ----------------------------------------------------------------------------


@dataclass
class TurnView:
    """What a caller received of one turn, assembled from the events."""

    turn_id: str
    user_text: str = ""
    agent_text: str = ""
    audio: bytes = b""
    completed: pb.TurnCompleted | None = None
    interrupted: pb.TurnInterrupted | None = None
    errors: list[pb.SessionError] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.completed is not None or self.interrupted is not None or bool(self.errors)


def turn_view(events: Sequence[pb.ConverseResponse], turn_id: str) -> TurnView:
    view = TurnView(turn_id)
    audio = bytearray()
    for event in events:
        if event.correlation.turn_id != turn_id:
            continue
        kind = event.WhichOneof("event")
        if kind == "turn_started":
            view.user_text = event.turn_started.user_text
        elif kind == "agent_text":
            view.agent_text += event.agent_text.text
        elif kind == "reply_audio":
            audio += event.reply_audio.audio
        elif kind == "turn_completed":
            view.completed = event.turn_completed
        elif kind == "turn_interrupted":
            view.interrupted = event.turn_interrupted
        elif kind == "error":
            view.errors.append(event.error)
    view.audio = bytes(audio)
    return view


class Caller:
    """One Converse call driven step by step. Every response is kept, in the order it arrived,
    in `events`; `wait_for` waits (bounded) until the events satisfy a condition. Audio is sent
    in 20 ms frames as fast as the server takes it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        input_format: PcmFormat = PCM_16K,
        output_format: PcmFormat = PCM_16K,
        session_id: str = "",
        timeout_s: float = CONVERSE_TIMEOUT_S,
    ) -> None:
        self.input_format = input_format
        self.output_format = output_format
        self.session_id = session_id
        stub: VoiceAgentServiceAsyncStub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        self.call = stub.Converse(timeout=timeout_s, wait_for_ready=True)
        self.events: list[pb.ConverseResponse] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    def config(self) -> pb.ConverseRequest:
        return pb.ConverseRequest(
            config=pb.SessionConfig(
                input_audio_format=self.input_format.to_proto(),
                output_audio_format=self.output_format.to_proto(),
                session_id=self.session_id,
            )
        )

    async def open(self, *first: pb.ConverseRequest, read: bool = True) -> Caller:
        """Sends the config (or `first` instead) and, if `read`, starts reading the events."""
        for request in first or (self.config(),):
            await self.call.write(request)
        if read:
            self.start_reading()
        return self

    def start_reading(self) -> None:
        assert self._reader is None, "already reading"
        self._reader = asyncio.create_task(self._read(), name="test-caller-reader")

    async def close(self) -> None:
        """Cancels the call (if still open) and the reader."""
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- input -----------------------------------------------------------------------------

    async def send(self, request: pb.ConverseRequest) -> None:
        await self.call.write(request)

    async def speak(self, text: str) -> None:
        """`text` in the stub audio code, with its end-of-utterance silence, in 20 ms frames."""
        data = spoken(text, self.input_format)
        frame = self.input_format.bytes_for(FRAME_MS)
        for offset in range(0, len(data), frame):
            await self.call.write(pb.ConverseRequest(audio=data[offset : offset + frame]))

    async def type(self, text: str) -> None:
        await self.call.write(pb.ConverseRequest(text=pb.TextTurn(text=text)))

    async def end_input(self) -> None:
        await self.call.write(
            pb.ConverseRequest(control=pb.ControlMessage(type=pb.CONTROL_TYPE_END_OF_INPUT))
        )
        await self.call.done_writing()

    # --- output ----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.events.append(response)
                async with self._changed:
                    self._changed.notify_all()
            self.code, self.details = await self.call.code(), await self.call.details()
        except grpc.aio.AioRpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(
        self, condition: Callable[[], T | None], *, what: str, timeout_s: float = EVENT_TIMEOUT_S
    ) -> T:
        """The first truthy value of `condition()`, re-evaluated after every event; fails after
        `timeout_s`, or when the call ended without it."""

        def ready() -> bool:
            return bool(condition()) or self.code is not None

        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(ready)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout_s} s; events: {self.summary()}") from None
        result = condition()
        assert result, f"the call ended ({self.code}: {self.details}) before {what}; events: {self.summary()}"
        return result

    async def turn_ended(self, turn_id: str, timeout_s: float = EVENT_TIMEOUT_S) -> TurnView:
        def ended() -> TurnView | None:
            view = self.turn(turn_id)
            return view if view.ended else None

        return await self.wait_for(ended, what=f"end of turn {turn_id}", timeout_s=timeout_s)

    async def ended(self, timeout_s: float = EVENT_TIMEOUT_S) -> tuple[grpc.StatusCode, str]:
        """The call's final status (waits for the server to end the call)."""
        assert self._reader is not None, "the caller is not reading"
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._reader)
        except TimeoutError:
            raise AssertionError(f"the call did not end within {timeout_s} s: {self.summary()}") from None
        assert self.code is not None
        return self.code, self.details

    def turn(self, turn_id: str) -> TurnView:
        return turn_view(self.events, turn_id)

    def of_kind(self, kind: str) -> list[pb.ConverseResponse]:
        return [event for event in self.events if event.WhichOneof("event") == kind]

    def final_transcripts(self) -> list[str]:
        return [e.user_transcript.text for e in self.of_kind("user_transcript") if e.user_transcript.is_final]

    def summary(self) -> str:
        kinds = [f"{e.WhichOneof('event')}#{e.correlation.turn_id}" for e in self.events[-30:]]
        return f"{len(self.events)} events, last: {kinds}; status {self.code} {self.details!r}"


# --- a recording LLM proxy ----------------------------------------------------------------------

_GENERATE = "/voice.v1.LanguageModelService/Generate"


class RecordingLlmProxy:
    """A gRPC server in the test process between the orchestrator and a real LLM stub: forwards
    Generate and health calls unchanged and keeps every GenerateRequest, so a test can see the
    exact history the orchestrator sent."""

    def __init__(self, upstream: str) -> None:
        self.requests: list[language_model_pb2.GenerateRequest] = []
        self._channel = grpc.aio.insecure_channel(upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((_ProxyHandler(self),))
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> RecordingLlmProxy:
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
        await self._channel.close()

    async def generate(
        self, request: language_model_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[language_model_pb2.GenerateResponse]:
        self.requests.append(request)
        forward = self._channel.unary_stream(
            _GENERATE,
            request_serializer=language_model_pb2.GenerateRequest.SerializeToString,
            response_deserializer=language_model_pb2.GenerateResponse.FromString,
        )
        call = forward(request, timeout=context.time_remaining(), metadata=context.invocation_metadata())
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # the orchestrator cancelled (barge-in): so does the stub's call

    async def unary_bytes(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        # Raw bytes both ways: no serializers, so the typed stubs do not apply.
        forward: Any = self._channel.unary_unary(method)
        return await forward(request, timeout=context.time_remaining())

    async def stream_bytes(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        forward: Any = self._channel.unary_stream(method)
        call = forward(request, timeout=context.time_remaining())
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


class _ProxyHandler(grpc.GenericRpcHandler):
    def __init__(self, proxy: RecordingLlmProxy) -> None:
        self._proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        proxy = self._proxy
        if method == _GENERATE:
            return grpc.unary_stream_rpc_method_handler(
                proxy.generate,
                request_deserializer=language_model_pb2.GenerateRequest.FromString,
                response_serializer=language_model_pb2.GenerateResponse.SerializeToString,
            )
        if method == "/grpc.health.v1.Health/Check":
            return grpc.unary_unary_rpc_method_handler(functools.partial(proxy.unary_bytes, method))
        if method == "/grpc.health.v1.Health/Watch":
            return grpc.unary_stream_rpc_method_handler(functools.partial(proxy.stream_bytes, method))
        return None
