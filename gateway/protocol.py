"""The gateway's WebSocket protocol: JSON text frames for config, control and events, binary
frames for PCM audio both ways. README.md ("The WebSocket protocol") documents it for clients.

Client -> gateway:
    {"type": "config", "input_sample_rate": 16000, "output_sample_rate": 48000,
     "token": "...", "session_id": "...", "system_prompt": "..."}     first, exactly once
    binary: caller audio, PCM16 little-endian mono at input_sample_rate (20 ms per frame typical)
    {"type": "text", "text": "What is 2 plus 3?"}                      a typed turn
    {"type": "barge_in"}                                               the caller interrupts the agent
    {"type": "end_of_input"}                                           finish, then the call ends

Gateway -> client: one JSON event per orchestrator event (`event_json`), reply audio as binary
frames at output_sample_rate, and a close code when the conversation ends (`close_code`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from voice.v1 import common_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, PcmFormat
from voicepipe_client import PCM_16K, SessionSettings

# A conversation that ended normally; every other end is 4000 + the gRPC status code's value
# (4003 INVALID_ARGUMENT, 4007 PERMISSION_DENIED, 4008 RESOURCE_EXHAUSTED, 4014 UNAVAILABLE,
# 4016 UNAUTHENTICATED), with the status details as the reason. 1009 is WebSocket's own code
# for a message too big, 1001 the gateway going away.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
MESSAGE_TOO_BIG = 1009
STATUS_CLOSE_BASE = 4000
# RFC 6455: a close frame's reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


class ProtocolError(Exception):
    """Input that breaks the protocol: the socket is closed with `code` (a close code, or the
    one of a gRPC status) and this message."""

    def __init__(self, code: grpc.StatusCode | int, message: str) -> None:
        super().__init__(message)
        self.code = code if isinstance(code, int) else close_code(code)


def close_code(status: grpc.StatusCode) -> int:
    return NORMAL_CLOSURE if status == grpc.StatusCode.OK else STATUS_CLOSE_BASE + int(status.value[0])


def close_reason(message: str) -> str:
    """`message` cut to what a close frame can carry, on a character boundary."""
    return message.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def parse_message(data: str) -> dict[str, Any]:
    """A client's text frame as a JSON object with a string `type`."""
    try:
        message = json.loads(data)
    except json.JSONDecodeError as error:
        raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"not JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(
            grpc.StatusCode.INVALID_ARGUMENT, 'a text frame must be a JSON object with a "type"'
        )
    return message


def _field(message: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = message.get(name, default)
    # bool is an int in Python; neither a rate nor a text is ever a bool.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f'config "{name}" must be a {kind.__name__}')
    return value


def _rate(message: dict[str, Any], name: str) -> PcmFormat:
    rate = _field(message, name, int, PCM_16K.sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'config "{name}" must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {rate}',
        )
    return PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, rate)


@dataclass(frozen=True)
class ClientConfig:
    """What the client's config message says."""

    settings: SessionSettings
    token: str

    @classmethod
    def parse(cls, message: dict[str, Any]) -> ClientConfig:
        settings = SessionSettings(
            input_format=_rate(message, "input_sample_rate"),
            output_format=_rate(message, "output_sample_rate"),
            session_id=_field(message, "session_id", str, ""),
            system_prompt=_field(message, "system_prompt", str, ""),
        )
        return cls(settings, _field(message, "token", str, ""))


def _ms(duration: duration_pb2.Duration) -> float:
    return round(duration.seconds * 1000 + duration.nanos / 1e6, 3)


def event_text(response: pb.ConverseResponse) -> str | None:
    """The text frame of an orchestrator event; None for reply audio (sent as binary)."""
    event = event_json(response)
    return None if event is None else json.dumps(event, separators=(",", ":"))


def event_json(response: pb.ConverseResponse) -> dict[str, Any] | None:
    kind = response.WhichOneof("event")
    turn_id = response.correlation.turn_id
    if kind == "session_started":
        return {"type": "session_started", "session_id": response.session_started.session_id}
    if kind == "user_transcript":
        transcript = response.user_transcript
        return {"type": "transcript", "text": transcript.text, "final": transcript.is_final}
    if kind == "turn_started":
        return {"type": "turn_started", "turn_id": turn_id, "user_text": response.turn_started.user_text}
    if kind == "agent_text":
        return {"type": "agent_text", "turn_id": turn_id, "text": response.agent_text.text}
    if kind == "turn_completed":
        completed = response.turn_completed
        latency = {
            f"{field.name}_ms": _ms(getattr(completed.latency, field.name))
            for field in completed.latency.DESCRIPTOR.fields
        }
        return {
            "type": "turn_completed",
            "turn_id": turn_id,
            "agent_text": completed.agent_text,
            "reply_audio_ms": _ms(completed.reply_audio_duration),
            "latency": latency,
        }
    if kind == "turn_interrupted":
        interrupted = response.turn_interrupted
        return {
            "type": "interrupted",
            "turn_id": turn_id,
            "heard_text": interrupted.heard_text,
            "withdrawn": interrupted.withdrawn,
        }
    if kind == "error":
        error = response.error
        stage = pb.Stage.Name(error.stage).removeprefix("STAGE_").lower()
        return {
            "type": "error",
            "turn_id": turn_id,
            "stage": stage,
            "code": error.code,
            "message": error.message,
        }
    return None
