"""Bytes that do not parse as a method's request message, sent to every method of every server
(the orchestrator and the three stages, with their health and reflection services): each call ends
with INVALID_ARGUMENT naming the message type, the server logs one warning line (no traceback),
counts it, and keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from orchestrator.stack import LocalStack
from tests.helpers import (
    CALL_TIMEOUT_S,
    SERVING,
    health_status,
    open_channel,
    read_metric,
    wait_for_log,
    wait_for_metric,
)
from tests.stack_fixtures import instant_stack
from voice.v1 import (
    common_pb2,
    language_model_pb2,
    speech_to_text_pb2,
    text_to_speech_pb2,
    voice_agent_pb2,
)
from voicepipe.processes import ServiceProcess

# A field tag with wire type 7, which no protobuf message can contain.
GARBAGE = b"\xff\xff\xff\xff"
PCM16 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000)


@dataclass(frozen=True)
class Method:
    """One method as a raw-bytes client sees it: its path, the request type that must be named,
    whether requests stream, and for a streaming request a valid first message, after which the
    garbage arrives mid-stream."""

    path: str
    request_type: str
    request_streaming: bool
    response_streaming: bool
    valid_first: bytes = b""

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def name(self) -> str:
        return self.path.split("/")[2]


HEALTH_CHECK = Method(
    "/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", False, False
)
HEALTH_WATCH = Method("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest", False, True)
REFLECTION = Method(
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflectionRequest",
    True,
    True,
    reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
)
OWN_METHODS = {
    "orchestrator": Method(
        "/voice.v1.VoiceAgentService/Converse",
        "voice.v1.ConverseRequest",
        True,
        True,
        voice_agent_pb2.ConverseRequest(
            config=voice_agent_pb2.SessionConfig(input_audio_format=PCM16)
        ).SerializeToString(),
    ),
    "stt": Method(
        "/voice.v1.SpeechToTextService/Transcribe",
        "voice.v1.TranscribeRequest",
        True,
        True,
        speech_to_text_pb2.TranscribeRequest(
            config=speech_to_text_pb2.TranscriptionConfig(audio_format=PCM16)
        ).SerializeToString(),
    ),
    "llm": Method("/voice.v1.LanguageModelService/Generate", "voice.v1.GenerateRequest", False, True),
    "tts": Method(
        "/voice.v1.TextToSpeechService/Synthesize",
        "voice.v1.SynthesizeRequest",
        True,
        True,
        text_to_speech_pb2.SynthesizeRequest(
            config=text_to_speech_pb2.SynthesisConfig(audio_format=PCM16)
        ).SerializeToString(),
    ),
}
# Every server answers its own method, health and reflection; each method kind the servers have.
CASES = [
    (server, method, mid_stream)
    for server, own in OWN_METHODS.items()
    for method in (own, HEALTH_CHECK, HEALTH_WATCH, REFLECTION)
    for mid_stream in ((False, True) if method.request_streaming else (False,))
]


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    async with instant_stack() as local:
        yield local


def server_of(stack: LocalStack, server: str) -> ServiceProcess:
    process = stack.orchestrator if server == "orchestrator" else stack.stages[server]
    assert process is not None
    return process


async def send_garbage(channel: grpc.aio.Channel, method: Method, mid_stream: bool) -> grpc.aio.AioRpcError:
    """Calls `method` with raw bytes; returns the error it ends with."""
    # No serializers: the bytes go on the wire as they are, and come back as bytes.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if not method.request_streaming:
            if method.response_streaming:
                async for _ in channel.unary_stream(method.path)(GARBAGE, timeout=CALL_TIMEOUT_S):
                    pass
            else:
                await channel.unary_unary(method.path)(GARBAGE, timeout=CALL_TIMEOUT_S)
        else:
            call = channel.stream_stream(method.path)(timeout=CALL_TIMEOUT_S)
            if mid_stream:
                await call.write(method.valid_first)
            # No half-close: the server must end the call on the garbage alone.
            await call.write(GARBAGE)
            while await call.read() is not grpc.aio.EOF:
                pass
    return raised.value


@pytest.mark.parametrize(
    ("server", "method", "mid_stream"),
    CASES,
    ids=[f"{s}-{m.name}{'-mid-stream' if mid else ''}" for s, m, mid in CASES],
)
async def test_malformed_request_is_invalid_argument_naming_the_type(
    stack: LocalStack, server: str, method: Method, mid_stream: bool
) -> None:
    process = server_of(stack, server)
    labels = {"grpc_service": method.service, "grpc_method": method.name}
    counted = "voicepipe_server_malformed_messages_total"
    before = await read_metric(process.metrics_port, counted, **labels)
    logged_before = len(process.events())

    async with open_channel(process.target) as channel:
        error = await send_garbage(channel, method, mid_stream)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert method.request_type in (error.details() or "")

        warning = await wait_for_log(
            process, lambda e: e.get("event") == "malformed request" and e.get("method") == method.path
        )
        assert warning["level"] == "warning"
        assert warning["message_type"] == method.request_type
        await wait_for_metric(process.metrics_port, counted, lambda v: v == before + 1, labels=labels)
        assert await health_status(channel, "") == SERVING

    new_events = process.events()[logged_before:]
    warnings = [e for e in new_events if e.get("event") == "malformed request"]
    assert len(warnings) == 1, warnings
    assert not [e for e in new_events if e["level"] in ("error", "critical") or "exception" in e]
    assert not [line for line in process.log_lines if "Traceback" in line]
