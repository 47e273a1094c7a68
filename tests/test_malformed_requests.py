"""Bytes that do not parse as a method's request message, sent to every method of every server
(the orchestrator and the three stages, with their health and reflection services): each call ends
with INVALID_ARGUMENT naming the message type, the server logs one warning line (no traceback),
counts it, and keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tests.helpers import assert_garbage_amid_writes_rejected, assert_malformed_request_rejected
from tests.stack_fixtures import instant_stack
from voice.v1 import (  # each module registers its contract's descriptors
    common_pb2,
    language_model_pb2,  # noqa: F401
    speech_to_text_pb2,
    text_to_speech_pb2,
    voice_agent_pb2,
)
from voicepipe.processes import ServiceProcess
from voicepipe_tools.stack import LocalStack

PCM16 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
OWN_METHODS = {
    "orchestrator": "/voice.v1.VoiceAgentService/Converse",
    "stt": "/voice.v1.SpeechToTextService/Transcribe",
    "llm": "/voice.v1.LanguageModelService/Generate",
    "tts": "/voice.v1.TextToSpeechService/Synthesize",
}
# For each streaming request, a valid first message: the garbage then arrives mid-stream.
VALID_FIRST = {
    REFLECTION: reflection_pb2.ServerReflectionRequest(list_services=""),
    OWN_METHODS["orchestrator"]: voice_agent_pb2.ConverseRequest(
        config=voice_agent_pb2.SessionConfig(input_audio_format=PCM16)
    ),
    OWN_METHODS["stt"]: speech_to_text_pb2.TranscribeRequest(
        config=speech_to_text_pb2.TranscriptionConfig(audio_format=PCM16)
    ),
    OWN_METHODS["tts"]: text_to_speech_pb2.SynthesizeRequest(
        config=text_to_speech_pb2.SynthesisConfig(audio_format=PCM16)
    ),
}
# Every server answers its own method, health and reflection: each method kind the servers have.
CASES = [
    (server, path, first)
    for server, own in OWN_METHODS.items()
    for path in (own, HEALTH_CHECK, HEALTH_WATCH, REFLECTION)
    for first in (None, *([VALID_FIRST[path].SerializeToString()] if path in VALID_FIRST else []))
]


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    async with instant_stack() as local:
        yield local


def server_of(stack: LocalStack, server: str) -> ServiceProcess:
    process = stack.orchestrator if server == "orchestrator" else stack.stages[server]
    assert process is not None
    return process


@pytest.mark.parametrize(
    ("server", "path", "valid_first"),
    CASES,
    ids=[f"{s}-{p.rsplit('/', 1)[1]}{'-mid-stream' if first else ''}" for s, p, first in CASES],
)
async def test_malformed_request_is_invalid_argument_naming_the_type(
    stack: LocalStack, server: str, path: str, valid_first: bytes | None
) -> None:
    process = server_of(stack, server)
    await assert_malformed_request_rejected(process, path, valid_first)


async def test_garbage_then_more_writes_to_converse_still_reads_invalid_argument(stack: LocalStack) -> None:
    """The client keeps sending audio after its garbage (the stages' calls: test_stage_runtime)."""
    path = OWN_METHODS["orchestrator"]
    more = voice_agent_pb2.ConverseRequest(audio=bytes(640)).SerializeToString()
    first = VALID_FIRST[path].SerializeToString()
    await assert_garbage_amid_writes_rejected(server_of(stack, "orchestrator"), path, first, more)
