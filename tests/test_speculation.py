"""Speculative transcripts and speculative generation, exactly, on the stub stack: the STT stub
sends the utterance so far when the stub code pauses, then confirms it (the final) or withdraws
it (the code resumed); the orchestrator answers early but releases nothing until the final
confirms the same words, and the history never holds a speculative turn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from stubs import audio_code
from tests.helpers import collect, open_channel, read_metric
from tests.stack_fixtures import Caller, RecordingLlmProxy, processes, serving
from voice.v1 import language_model_pb2, speech_to_text_pb2, speech_to_text_pb2_grpc
from voicepipe import durations
from voicepipe.pcm import Samples
from voicepipe.processes import ServiceProcess
from voicepipe_client import PCM_16K, Utterance

pb = speech_to_text_pb2
RATE = PCM_16K.sample_rate
USER = language_model_pb2.ROLE_USER
# Longer than the stub's pause for speculation (80 ms), shorter than its endpointing (120 ms).
PAUSE_MS = 100


def paused(*parts: str) -> Samples:
    """The stub code of `parts`, a PAUSE_MS pause between them, the utterance's end after."""
    rendered = [
        audio_code.encode(part, RATE, trailing_silence_ms=PAUSE_MS if n < len(parts) else 250)
        for n, part in enumerate(parts, 1)
    ]
    return np.concatenate(rendered)


# --- the STT stub's contract ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def stt() -> AsyncIterator[ServiceProcess]:
    async with processes() as group:
        yield await serving(await group.start("stt_stub"))


async def transcribe(stt: ServiceProcess, audio: Samples, *, speculative: bool) -> list[str]:
    """Every response of one call, as `kind text @end_ms`, the audio sent in 20 ms messages."""
    config = pb.TranscriptionConfig(
        audio_format=PCM_16K.to_proto(), interim_results=True, speculative_results=speculative
    )
    data = PCM_16K.encode(audio)
    async with open_channel(stt.target) as channel:
        call = speech_to_text_pb2_grpc.SpeechToTextServiceStub(channel).Transcribe(timeout=30)
        await call.write(pb.TranscribeRequest(config=config))
        for start in range(0, len(data), 640):
            await call.write(pb.TranscribeRequest(audio=data[start : start + 640]))
        await call.done_writing()
        return [describe(response) for response in (await collect(call)).assert_ok()]


def describe(response: pb.TranscribeResponse) -> str:
    if response.HasField("speech_event"):
        event = response.speech_event
        name = pb.SpeechEventType.Name(event.type).removeprefix("SPEECH_EVENT_TYPE_")
        return f"{name} @{durations.to_seconds(event.audio_offset) * 1000:.0f}"
    result = response.result
    kind = "final" if result.is_final else "speculative" if result.speculative else "interim"
    return f"{kind} {result.transcript} @{durations.to_seconds(result.audio_end_offset) * 1000:.0f}"


async def test_a_pause_is_speculated_on_and_the_final_confirms_it(stt: ServiceProcess) -> None:
    responses = await transcribe(stt, paused("hi yo"), speculative=True)
    # "hi yo" in the code: h 0-30, i 40-70, y 130-160, o 170-200 ms (see stubs/audio_code.py).
    assert responses == [
        "SPEECH_STARTED @0",
        "interim hi @70",
        "interim hi yo @200",
        "speculative hi yo @200",
        "final hi yo @200",
        "END_OF_UTTERANCE @200",
    ]


# "hi" ends at 70 ms; "yo" starts after the 100 ms pause: y 170-200, o 210-240.
RESUMED = [
    "SPEECH_STARTED @0",
    "interim hi @70",
    "speculative hi @70",
    "SPECULATION_WITHDRAWN @70",
    "interim hi yo @240",
    "speculative hi yo @240",
    "final hi yo @240",
    "END_OF_UTTERANCE @240",
]


async def test_speech_resuming_withdraws_the_speculative_transcript(stt: ServiceProcess) -> None:
    assert await transcribe(stt, paused("hi", "yo"), speculative=True) == RESUMED


async def test_a_client_that_did_not_ask_gets_no_speculation(stt: ServiceProcess) -> None:
    unasked = [r for r in RESUMED if not r.startswith(("speculative", "SPECULATION"))]
    assert await transcribe(stt, paused("hi", "yo"), speculative=False) == unasked
    assert len(unasked) == 5


# --- speculative generation in the orchestrator ----------------------------------------------


@dataclass
class Stack:
    orchestrator: ServiceProcess
    llm: RecordingLlmProxy

    async def speculative(self, outcome: str) -> float:
        assert self.orchestrator.metrics_port is not None
        return await read_metric(
            self.orchestrator.metrics_port, "voicepipe_speculative_total", outcome=outcome
        )


@asynccontextmanager
async def stub_stack(*orchestrator_flags: str) -> AsyncIterator[Stack]:
    """The stub stages, the orchestrator, and a proxy that records its Generate requests."""
    async with processes() as group:
        stages = [await group.start(module) for module in ("stt_stub", "llm_stub", "tts_stub")]
        for stage in stages:
            await serving(stage)
        stt, llm, tts = stages
        async with RecordingLlmProxy(llm.target) as proxy:
            orchestrator = await group.start_orchestrator(
                stt.target, proxy.target, tts.target, *orchestrator_flags
            )
            yield Stack(await serving(orchestrator), proxy)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with stub_stack() as started:
        yield started


def user_texts(requests: Sequence[language_model_pb2.GenerateRequest]) -> list[list[str]]:
    return [[m.content for m in request.messages if m.role == USER] for request in requests]


async def converse(stack: Stack, *utterances: Samples) -> Caller:
    """One conversation: each utterance, then its turn's end."""
    async with open_channel(stack.orchestrator.target) as channel, Caller(channel) as caller:
        await caller.open()
        for number, audio in enumerate(utterances, 1):
            await caller.conversation.speak(Utterance.from_samples(audio, PCM_16K))
            await caller.turn_ended(str(number))
        await caller.end_input()
        await caller.ended()
        return caller


def kinds(caller: Caller) -> list[str]:
    """The events of the conversation, by kind (interim transcripts and audio left out)."""
    out: list[str] = []
    for event in caller.events:
        kind = event.WhichOneof("event")
        if kind == "user_transcript" and not event.user_transcript.is_final:
            continue
        if kind == "reply_audio" and out[-1] == "reply_audio":
            continue
        out.append(kind or "")
    return out


async def test_a_confirmed_speculation_is_the_turn_and_nothing_leaves_before_the_final(stack: Stack) -> None:
    confirmed = await stack.speculative("confirmed")
    stack.llm.requests.clear()
    caller = await converse(stack, paused("hello there"))
    # One Generate call: the speculative turn's, adopted when the final confirmed its words.
    assert user_texts(stack.llm.requests) == [["hello there"]]
    assert await stack.speculative("confirmed") == confirmed + 1
    # Its reply left only after the final transcript and the turn's start.
    assert kinds(caller)[:4] == ["session_started", "user_transcript", "turn_started", "agent_text"]
    assert caller.final_transcripts() == ["hello there"]
    [completed] = caller.of_kind("turn_completed")
    assert completed.turn_completed.agent_text == "Hello! How can I help you today?"


async def test_a_withdrawn_speculation_is_cancelled_and_the_history_never_holds_it(stack: Stack) -> None:
    withdrawn, confirmed = await stack.speculative("withdrawn"), await stack.speculative("confirmed")
    stack.llm.requests.clear()
    caller = await converse(stack, paused("my name", "is ada"), paused("what is my name"))
    # The LLM was asked about "my name" at the pause (unless speech resumed before the request
    # left); that answer never reached the caller, and the history has the whole sentence only.
    asked = user_texts(stack.llm.requests)
    assert asked[:-2] in ([], [["my name"]]), asked
    assert asked[-2:] == [["my name is ada"], ["my name is ada", "what is my name"]]
    assert await stack.speculative("withdrawn") == withdrawn + 1
    assert await stack.speculative("confirmed") == confirmed + 2
    assert [e.turn_started.user_text for e in caller.of_kind("turn_started")] == [
        "my name is ada",
        "what is my name",
    ]
    replies = [e.turn_completed.agent_text for e in caller.of_kind("turn_completed")]
    assert replies == ["Nice to meet you, ada.", "Your name is ada."]
    assert "".join(e.agent_text.text for e in caller.of_kind("agent_text")) == "".join(replies)
    assert not caller.of_kind("turn_interrupted")


async def test_speculation_can_be_turned_off() -> None:
    async with stub_stack("--speculative-generation=false") as stack:
        await converse(stack, paused("my name", "is ada"))
        assert user_texts(stack.llm.requests) == [["my name is ada"]]
        assert await stack.speculative("withdrawn") == 0
