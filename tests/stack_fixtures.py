"""Helpers for end-to-end tests of the orchestrator: whole stacks of real processes, a caller on
the client library that also keeps every event of a Converse call in arrival order, and an LLM
proxy that records what the orchestrator asked the language model."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from stubs import audio_code
from voice.v1 import language_model_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe_client import (
    PCM_16K,
    Conversation,
    Microphone,
    SessionSettings,
    Turn,
    TurnAssembler,
    Utterance,
)
from voicepipe_tools.stack import LocalStack, StackCertificates, start_stack

T = TypeVar("T")

# Deadline of every Converse call a test makes, and how long a test waits for an expected event.
CONVERSE_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 10.0


# --- processes ------------------------------------------------------------------------------------


@asynccontextmanager
async def instant_stack(
    *,
    stage_flags: dict[str, list[str]] | None = None,
    orchestrator_flags: Sequence[str] = (),
    certificates: StackCertificates | None = None,
) -> AsyncIterator[LocalStack]:
    """The four services on ephemeral ports with the `instant` latency profile (mutual TLS on
    every link with `certificates`); stopped on exit."""
    stack = await start_stack(
        "instant",
        ephemeral=True,
        stage_flags=stage_flags,
        orchestrator_flags=list(orchestrator_flags),
        certificates=certificates,
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


async def own_orchestrator(group: Processes, stack: LocalStack, *flags: str, port: int = 0) -> ServiceProcess:
    """An orchestrator of the test's own (one it may kill) in front of `stack`'s stages, SERVING."""
    stages = [f"--{role}={process.target}" for role, process in stack.stages.items()]
    return await serving(await group.start("orchestrator", *stages, *flags, port=port))


# --- audio ------------------------------------------------------------------------------------------


def heard(audio: bytes | bytearray, fmt: PcmFormat) -> list[str]:
    """What a listener decodes from reply audio: the final text of each utterance. The TTS ends
    a reply with a word gap only, so the stream's end closes the last utterance (`finish`)."""
    return audio_code.decode_utterances(fmt.decode(bytes(audio)), fmt.sample_rate)


# --- a Converse call ----------------------------------------------------------------------------


class Caller:
    """One Converse call driven step by step through the client library, its audio sent in 20 ms
    frames as fast as the server takes it. Every response is also kept, in the order it arrived,
    in `events`; `wait_for` waits (bounded) until the events satisfy a condition."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        input_format: PcmFormat = PCM_16K,
        output_format: PcmFormat = PCM_16K,
        session_id: str = "",
        timeout_s: float = CONVERSE_TIMEOUT_S,
        resumption_ticket: bytes = b"",
    ) -> None:
        self.input_format = input_format
        self.events: list[pb.ConverseResponse] = []
        self._changed = asyncio.Event()
        self._over = False
        self.conversation = Conversation(
            channel,
            SessionSettings(input_format, output_format, session_id, resumption_ticket=resumption_ticket),
            microphone=Microphone(realtime=False),
            timeout_s=timeout_s,
            assembler=TurnAssembler(output_format, listener=self),
        )

    # EventListener: the assembler tells of each event once it has assembled it.
    def on_event(self, response: pb.ConverseResponse) -> None:
        self.events.append(response)
        self._wake()

    def on_end(self) -> None:
        self._over = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def code(self) -> grpc.StatusCode | None:
        return self.conversation.code

    @property
    def details(self) -> str:
        return self.conversation.details

    async def open(self, *, read: bool = True) -> Caller:
        """Sends the config and, if `read`, starts reading the events."""
        await self.conversation.open(read=read)
        return self

    def start_reading(self) -> None:
        self.conversation.start_reading()

    async def close(self) -> None:
        """Cancels the call (if still open) and the reader."""
        await self.conversation.close()

    async def __aenter__(self) -> Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- input -----------------------------------------------------------------------------

    async def speak(self, text: str) -> Turn:
        """`text` in the stub audio code, with its end-of-utterance silence; returns its turn
        once every frame has left."""
        return await self.conversation.speak(Utterance.spoken(audio_code.render, text, self.input_format))

    async def type(self, text: str) -> Turn:
        return await self.conversation.type(text)

    async def end_input(self) -> None:
        await self.conversation.end_input()

    # --- output ----------------------------------------------------------------------------

    async def wait_for(
        self, condition: Callable[[], T | None], *, what: str, timeout_s: float = EVENT_TIMEOUT_S
    ) -> T:
        """The first truthy value of `condition()`, re-evaluated after every event; fails after
        `timeout_s`, or when the call ended without it."""
        try:
            async with asyncio.timeout(timeout_s):
                while not (condition() or self._over):
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout_s} s; events: {self.summary()}") from None
        result = condition()
        assert result, f"the call ended ({self.code}: {self.details}) before {what}; events: {self.summary()}"
        return result

    async def turn_ended(self, turn_id: str, timeout_s: float = EVENT_TIMEOUT_S) -> Turn:
        def ended() -> Turn | None:
            turn = self.conversation.turn(turn_id)
            return turn if turn is not None and turn.ended else None

        return await self.wait_for(ended, what=f"end of turn {turn_id}", timeout_s=timeout_s)

    def audio_received(self, turn_id: str) -> int:
        """Bytes of reply audio received for the turn so far (0 before it started)."""
        turn = self.conversation.turn(turn_id)
        return 0 if turn is None else turn.audio_bytes

    async def ended(self, timeout_s: float = EVENT_TIMEOUT_S) -> tuple[grpc.StatusCode, str]:
        """The call's final status (waits for the server to end the call)."""
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.conversation.ended()
        except TimeoutError:
            raise AssertionError(f"the call did not end within {timeout_s} s: {self.summary()}") from None
        return code, self.details

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
