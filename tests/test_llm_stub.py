"""The LLM stub: its reply rules (a contract for tests of other services), and the real server
streaming them, sampling, pacing. What every stage server does (bad input, correlation ids, the
session limit, health, cancellation, fault knobs) is in test_stage_runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from stubs import replies
from tests.conftest import StartService
from tests.helpers import (
    open_channel,
    running,
)
from voice.v1 import common_pb2, language_model_pb2, language_model_pb2_grpc
from voicepipe.processes import ServiceProcess
from voicepipe.stage.llm import Message

if TYPE_CHECKING:
    from voice.v1.language_model_pb2_grpc import LanguageModelServiceAsyncStub as Stub

pb = language_model_pb2


# --- the reply rules ---------------------------------------------------------------------------


def said(*texts: str) -> list[Message]:
    """A conversation in which the user says each text in turn and the assistant answers."""
    messages: list[Message] = []
    for text in texts:
        if messages:
            messages.append(Message("assistant", "OK."))
        messages.append(Message("user", text))
    return messages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", replies.GREETING),
        ("Hi there!", replies.GREETING),
        ("hey", replies.GREETING),
        ("what is 2 plus 3", "2 plus 3 is 5."),
        ("What is 2 plus 3?", "2 plus 3 is 5."),
        ("2+3", "2 plus 3 is 5."),
        ("what's 7 times 6?", "7 times 6 is 42."),
        ("4 x 2.5", "4 times 2.5 is 10."),
        ("10 minus 12", "10 minus 12 is -2."),
        ("2 - -3", "2 minus -3 is 5."),
        ("7 divided by 2", "7 divided by 2 is 3.5."),
        ("1/3", "1 divided by 3 is 0.3333."),
        ("0.1 + 0.2 =", "0.1 plus 0.2 is 0.3."),
        ("5 divided by 0", "5 divided by 0 is undefined."),
        ("my name is Ada", "Nice to meet you, Ada."),
        ("Hello, my name is Ada Lovelace.", "Nice to meet you, Ada Lovelace."),
        ("please remember the door code is 42", "OK, I will remember the door code is 42."),
        ("what is my name", replies.UNKNOWN_NAME),
        ("what did I ask you to remember?", replies.NOTHING_TO_REMEMBER),
        ("The weather is nice today.", "You said: The weather is nice today."),
        ("call me at 555-1234", "You said: call me at 555-1234."),
        ("  café\tau   lait!! ", "You said: cafe au lait."),
        ("", replies.EMPTY),
        ("???", replies.EMPTY),
    ],
)
def test_reply_to_a_single_message(text: str, expected: str) -> None:
    assert replies.reply(said(text)) == expected


def test_recalls_the_most_recent_name_from_earlier_user_messages() -> None:
    conversation = said("my name is Ada", "the sky is blue", "actually my name is Grace", "What's my name?")
    assert replies.reply(conversation) == "Your name is Grace."


def test_recalls_what_to_remember() -> None:
    conversation = said("remember to buy milk", "hello", "what did I ask you to remember")
    assert replies.reply(conversation) == "You asked me to remember to buy milk."


def test_ignores_names_said_by_the_assistant_or_the_system() -> None:
    conversation = [
        Message("system", "my name is System"),
        Message("user", "hi"),
        Message("assistant", "Hello! My name is Bot and I was interrup"),
        Message("user", "what is my name"),
    ]
    assert replies.reply(conversation) == replies.UNKNOWN_NAME


def test_a_story_is_long_enough_to_interrupt() -> None:
    for request in ("tell me a story", "Please give me a long answer about boats"):
        story = replies.reply(said(request))
        assert story == replies.STORY
        assert story.count(". ") + 1 >= 6
        assert len(story.split()) >= 60


def test_replies_are_printable_ascii() -> None:
    for text in ("héllo wörld ✓ 😀", "line\nbreak\ttab\x00nul", "tell me a story", "2+2"):
        reply = replies.reply(said(text))
        assert reply.isascii() and reply.isprintable(), reply


def test_tokens_are_words_with_their_punctuation_and_space() -> None:
    tokens = replies.tokenize("Hello! How are you?")
    assert tokens == ["Hello! ", "How ", "are ", "you?"]
    assert "".join(replies.tokenize(replies.STORY)) == replies.STORY


# --- the server --------------------------------------------------------------------------------


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=text)


def assistant(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=text)


def system(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_SYSTEM, content=text)


@dataclass
class Generation:
    deltas: list[pb.TextDelta]
    complete: pb.GenerationComplete
    correlations: list[common_pb2.Correlation]

    @property
    def text(self) -> str:
        return "".join(delta.text for delta in self.deltas)


async def generate(stub: Stub, request: pb.GenerateRequest, timeout_s: float = 10.0) -> Generation:
    deltas: list[pb.TextDelta] = []
    completes: list[pb.GenerationComplete] = []
    correlations: list[common_pb2.Correlation] = []
    async for response in stub.Generate(request, timeout=timeout_s):
        assert not completes, "a response arrived after `complete`"
        correlations.append(response.correlation)
        if response.HasField("delta"):
            deltas.append(response.delta)
        else:
            completes.append(response.complete)
    assert len(completes) == 1, "the stream did not end with one `complete`"
    return Generation(deltas, completes[0], correlations)


@asynccontextmanager
async def connect(process: ServiceProcess) -> AsyncIterator[Stub]:
    async with open_channel(process.target) as channel:
        yield language_model_pb2_grpc.LanguageModelServiceStub(channel)


@pytest.fixture(scope="module")
def llm() -> Iterator[ServiceProcess]:
    """One instant-profile server shared by the tests that need no special flags."""
    with running("llm_stub", "--latency-profile", "instant") as process:
        yield process


@pytest.fixture
async def stub(llm: ServiceProcess) -> AsyncIterator[Stub]:
    async with connect(llm) as connected:
        yield connected


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([user("hello")], replies.GREETING),
        ([system("Be brief."), user("what is 12 times 12")], "12 times 12 is 144."),
        (
            [user("My name is Ada."), assistant("Nice to meet you, Ada."), user("What is my name?")],
            "Your name is Ada.",
        ),
        (
            [
                user("remember the blue door"),
                assistant("OK, I will rem"),
                user("what did I ask you to remember"),
            ],
            "You asked me to remember the blue door.",
        ),
        ([user("tell me a story")], replies.STORY),
        ([user("The train leaves at noon.")], "You said: The train leaves at noon."),
    ],
)
async def test_streams_each_kind_of_reply_exactly(
    stub: Stub, messages: list[pb.ChatMessage], expected: str
) -> None:
    generation = await generate(stub, pb.GenerateRequest(messages=messages))
    assert generation.text == expected
    assert [delta.text for delta in generation.deltas] == replies.tokenize(expected)
    assert generation.complete.finish_reason == pb.FINISH_REASON_STOP


async def test_deltas_then_one_complete_with_usage_and_timing(stub: Stub) -> None:
    request = pb.GenerateRequest(messages=[system("You are a calculator."), user("what is 2 plus 3")])
    generation = await generate(stub, request)
    assert [delta.text for delta in generation.deltas] == ["2 ", "plus ", "3 ", "is ", "5."]
    elapsed = [delta.elapsed.ToTimedelta() for delta in generation.deltas]
    assert elapsed == sorted(elapsed)
    complete = generation.complete
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert complete.usage.prompt_tokens == 4 + 5
    assert complete.usage.completion_tokens == 5
    assert complete.HasField("time_to_first_token")
    assert complete.time_to_first_token.ToTimedelta() == elapsed[0]
    assert complete.total_time.ToTimedelta() == elapsed[-1]


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(stub: Stub) -> None:
    request = pb.GenerateRequest(
        messages=[user("tell me a story")], parameters=pb.GenerationParameters(max_tokens=5)
    )
    generation = await generate(stub, request)
    assert generation.text == "Once upon a time, a "
    assert generation.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert generation.complete.usage.completion_tokens == 5


async def test_limits_themselves_are_accepted(stub: Stub) -> None:
    request = pb.GenerateRequest(
        # Each limit at its maximum; together they stay under the 4 MiB message size limit.
        messages=[system("x" * 16_384), *([assistant("ok")] * 998), user("hello")],
        parameters=pb.GenerationParameters(max_tokens=4096, temperature=2.0),
    )
    generation = await generate(stub, request)
    assert generation.text == replies.GREETING


async def test_a_sampling_request_gets_another_reply_each_time_it_is_repeated(stub: Stub) -> None:
    """Temperature above 0: the stub plays a sampling model, so a regeneration (the same request
    of the same turn again) differs; another turn's request starts again from the plain reply."""
    sampled = pb.GenerationParameters(temperature=0.7)

    def request(turn_id: str, *, parameters: pb.GenerationParameters = sampled) -> pb.GenerateRequest:
        correlation = common_pb2.Correlation(session_id="session-sampled", turn_id=turn_id)
        return pb.GenerateRequest(
            messages=[user("what is 2 plus 3")], parameters=parameters, correlation=correlation
        )

    texts = [(await generate(stub, request("1"))).text for _ in range(3)]
    assert texts == ["2 plus 3 is 5.", "Take 2: 2 plus 3 is 5.", "Take 3: 2 plus 3 is 5."]
    assert (await generate(stub, request("2"))).text == "2 plus 3 is 5."
    # Greedy (temperature 0, this server's default): the same request gives the same reply.
    greedy = [
        (await generate(stub, request("3", parameters=pb.GenerationParameters()))).text for _ in range(2)
    ]
    assert greedy == ["2 plus 3 is 5.", "2 plus 3 is 5."]


async def test_the_temperature_flag_applies_to_requests_that_leave_it_at_0(
    start_service: StartService,
) -> None:
    process = start_service("llm_stub", "--temperature", "0.7")
    request = pb.GenerateRequest(messages=[user("hello")])
    async with connect(process) as stub:
        texts = [(await generate(stub, request)).text for _ in range(2)]
    assert texts == [replies.GREETING, f"Take 2: {replies.GREETING}"]


async def test_realistic_profile_reports_the_first_token_after_250_ms(start_service: StartService) -> None:
    process = start_service("llm_stub", "--latency-profile", "realistic")
    async with connect(process) as stub:
        generation = await generate(stub, pb.GenerateRequest(messages=[user("hello")]))
    assert generation.text == replies.GREETING
    ttft = generation.complete.time_to_first_token.ToTimedelta().total_seconds()
    total = generation.complete.total_time.ToTimedelta().total_seconds()
    assert ttft >= 0.25
    # ~40 tokens/s after the first: six more tokens take about 150 ms.
    assert total - ttft >= 6 / 40 * 0.9
