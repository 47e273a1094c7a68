"""The LLM stage in front of a real llama.cpp server (the local default backend with the bundled
SmolLM2-135M): replies stream over gRPC, the history reaches the model, cancelling stops the
backend's generation, backend failures reach the caller as statuses it can act on, health
follows the backend, and the API key is never logged."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2

from llm_openai import backend
from llm_openai.engine import SPEECH_SYSTEM_PROMPT, Endpoint, OpenAIEngine, ReplySettings
from llm_openai.errors import backend_error
from tests.helpers import NOT_SERVING, SERVING, open_channel, running, wait_for_log, watch_health
from voice.v1 import common_pb2, language_model_pb2, language_model_pb2_grpc
from voicepipe.aio import cancel_and_wait
from voicepipe.processes import ServiceProcess
from voicepipe.stage.llm import SERVICE_NAME, Generation, Message

if TYPE_CHECKING:
    from voice.v1.language_model_pb2_grpc import LanguageModelServiceAsyncStub as Stub

pb = language_model_pb2

API_KEY = "sk-test-0123456789abcdef"
# Generous: the model runs on CPU on a machine that may be busy with other work.
GENERATE_TIMEOUT_S = 60.0
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def llama() -> Iterator[ServiceProcess]:
    """One llama.cpp server for the module, on a free port, requiring API_KEY."""
    process = backend.start(0, "--api-key", API_KEY)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llm") / "api-key"
    path.write_text(API_KEY + "\n")
    return path


def stage_flags(url: str, key_file: Path | None, *extra: str) -> list[str]:
    key = ["--api-key-file", str(key_file)] if key_file else []
    return ["--base-url", url, *key, "--health-interval", "0.1", *extra]


@pytest.fixture(scope="module")
def stage(llama: ServiceProcess, key_file: Path) -> Iterator[ServiceProcess]:
    with running("llm_openai", *stage_flags(backend.base_url(llama), key_file)) as process:
        yield process


@pytest.fixture
async def stub(stage: ServiceProcess) -> AsyncIterator[Stub]:
    async with open_channel(stage.target) as channel:
        yield language_model_pb2_grpc.LanguageModelServiceStub(channel)


def request(*turns: tuple[pb.Role.ValueType, str], max_tokens: int = 32) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=role, content=content) for role, content in turns],
        parameters=pb.GenerationParameters(max_tokens=max_tokens),
        correlation=common_pb2.Correlation(session_id="s-llm", turn_id="t-1"),
    )


Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]
Watch = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


async def next_response(call: Call) -> pb.GenerateResponse:
    response = await call.read()
    assert isinstance(response, pb.GenerateResponse), f"the stream ended: {response!r}"
    return response


async def next_status(watch: Watch) -> int:
    response = await watch.read()
    assert isinstance(response, health_pb2.HealthCheckResponse), f"the watch ended: {response!r}"
    return response.status


async def generate(stub: Stub, req: pb.GenerateRequest) -> tuple[str, list[pb.GenerateResponse]]:
    responses = [r async for r in stub.Generate(req, timeout=GENERATE_TIMEOUT_S)]
    return "".join(r.delta.text for r in responses if r.HasField("delta")), responses


async def test_a_reply_streams_as_deltas_then_completes(stub: Stub) -> None:
    text, responses = await generate(stub, request((pb.ROLE_USER, "What is the capital of France?")))
    deltas = [r.delta for r in responses[:-1]]
    complete = responses[-1]
    assert complete.HasField("complete") and all(r.HasField("delta") for r in responses[:-1])
    assert len(deltas) > 2 and text.strip()
    # Streamed as produced: each delta was stamped later than the one before it.
    elapsed = [d.elapsed.ToTimedelta() for d in deltas]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0]
    summary = complete.complete
    assert summary.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert summary.usage.completion_tokens == len(deltas)  # this backend streams one token a chunk
    assert summary.time_to_first_token.ToTimedelta() == elapsed[0]
    assert all(r.correlation.session_id == "s-llm" and r.correlation.turn_id == "t-1" for r in responses)


async def test_the_token_budget_ends_a_reply_with_length(stub: Stub) -> None:
    _, responses = await generate(
        stub, request((pb.ROLE_USER, "Tell me a long story about a dragon."), max_tokens=3)
    )
    assert len(responses) == 4
    assert responses[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH


async def test_the_history_reaches_the_model(stub: Stub) -> None:
    question = (pb.ROLE_USER, "What is my name?")
    with_history, _ = await generate(
        stub,
        request(
            (pb.ROLE_USER, "My name is Zorblax."),
            (pb.ROLE_ASSISTANT, "Nice to meet you, Zorblax."),
            question,
        ),
    )
    without, _ = await generate(stub, request(question))
    assert "Zorblax" in with_history
    assert "Zorblax" not in without


async def test_a_greedy_reply_repeats_exactly(stub: Stub) -> None:
    # What the orchestrator's resumption relies on with this backend: regenerated after a broken
    # stream, a reply at temperature 0 (the contract's default) starts with what was delivered.
    asked = request((pb.ROLE_USER, "Tell me about the ocean."), max_tokens=48)
    first, _ = await generate(stub, asked)
    await generate(stub, request((pb.ROLE_USER, "Something else entirely."), max_tokens=8))
    again, _ = await generate(stub, asked)
    assert first == again and len(first) > 40


def test_the_speech_prompt_is_added_only_when_the_conversation_has_no_system_message() -> None:
    engine = OpenAIEngine(
        Endpoint("http://127.0.0.1:9/v1", "m", "none", 1, 1, 1), ReplySettings(SPEECH_SYSTEM_PROMPT, 0, 0)
    )

    def roles(*messages: Message) -> list[tuple[str, str]]:
        sent = engine.messages(Generation(messages, 10, 0.0, common_pb2.Correlation()))
        return [(m["role"], str(m.get("content"))) for m in sent]

    assert roles(Message("user", "hi")) == [("system", SPEECH_SYSTEM_PROMPT), ("user", "hi")]
    own = (Message("system", "Be terse."), Message("user", "hi"))
    assert roles(*own) == [("system", "Be terse."), ("user", "hi")]


async def test_cancelling_the_call_stops_the_backend_generating(
    stub: Stub, stage: ServiceProcess, llama: ServiceProcess
) -> None:
    long_reply = request((pb.ROLE_USER, "Count from 1 to 2000, separated by commas."), max_tokens=1500)
    call = stub.Generate(long_reply, timeout=GENERATE_TIMEOUT_S)
    assert (await next_response(call)).HasField("delta")
    first = time.monotonic()
    for _ in range(5):
        assert (await next_response(call)).HasField("delta")
    rate = 5 / (time.monotonic() - first)  # the backend's pace, tokens/s
    call.cancel()
    # The backend says it dropped the request because its client went away ...
    disconnected = re.compile(r"Disconnected from client")
    deadline = time.monotonic() + GENERATE_TIMEOUT_S
    while not any(disconnected.search(line) for line in list(llama.log_lines)):
        assert time.monotonic() < deadline, "the backend never noticed the cancelled call"
        await asyncio.sleep(0.02)
    # ... and it is free: it serves one request at a time, so had it kept generating the 1500
    # tokens, the next reply would wait for them.
    asked = time.monotonic()
    await generate(stub, request((pb.ROLE_USER, "Say hi."), max_tokens=2))
    assert time.monotonic() - asked < 1495 / rate / 2
    await wait_for_log(stage, lambda e: e.get("event") == "generation cancelled")


async def test_the_stage_stays_serving_while_the_backend_is_busy_generating(
    stub: Stub, stage: ServiceProcess
) -> None:
    # The backend answers its model list only between generations: a long reply must not make
    # the stage look down (the orchestrator would stop sending it turns).
    async with open_channel(stage.target) as channel:
        watch = watch_health(channel, SERVICE_NAME, timeout_s=4 * GENERATE_TIMEOUT_S)
        assert await next_status(watch) == SERVING
        statuses: list[int] = []

        async def follow() -> None:
            while True:
                statuses.append(await next_status(watch))

        follower = asyncio.create_task(follow(), name="health-follower")
        try:
            # Several seconds of generation at this backend's pace, many health checks' worth.
            long_reply = request((pb.ROLE_USER, "Count from 1 to 2000, separated by commas."), max_tokens=500)
            _, responses = await generate(stub, long_reply)
            assert responses[-1].complete.usage.completion_tokens == 500
        finally:
            await cancel_and_wait(follower)
            watch.cancel()
        assert statuses == []


async def test_a_conversation_too_long_for_the_model_is_an_error_not_an_empty_reply(stub: Stub) -> None:
    # llama-cpp-python answers a streamed request it cannot fit with an empty 200 stream (the
    # reason only in its log): the caller gets a status, never a reply that silently says nothing.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stub, request((pb.ROLE_USER, "word " * 3000)))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ended the stream without finishing the reply" in str(raised.value.details())


def status_error(status: int, body: object) -> openai.APIStatusError:
    url = "http://127.0.0.1:9/v1/chat/completions"
    response = httpx2.Response(status, request=httpx2.Request("POST", url))
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "body", "code", "said"),
    [
        (
            400,
            {"message": "context too long", "type": "invalid_request_error"},
            "INVALID_ARGUMENT",
            "context too long",
        ),
        (422, {"detail": "bad field"}, "INVALID_ARGUMENT", "bad field"),
        (404, {"message": "The model `gpt-9` does not exist"}, "FAILED_PRECONDITION", "gpt-9"),
        (429, {"message": "Rate limit reached"}, "RESOURCE_EXHAUSTED", "Rate limit reached"),
        (500, None, "UNAVAILABLE", "HTTP 500"),
        (503, {"message": "overloaded"}, "UNAVAILABLE", "overloaded"),
        (504, None, "DEADLINE_EXCEEDED", "HTTP 504"),
        (
            401,
            {"message": "Incorrect API key provided: sk-abc***xyz"},
            "UNAUTHENTICATED",
            "API key was refused",
        ),
        (403, {"message": "key sk-abc***xyz lacks access"}, "PERMISSION_DENIED", "key was refused"),
    ],
)
def test_backend_statuses_map_to_codes_a_caller_can_act_on(
    status: int, body: object, code: str, said: str
) -> None:
    error = backend_error(status_error(status, body), "http://backend/v1")
    assert error.code.name == code
    assert said in error.message and "http://backend/v1" in error.message
    assert "sk-abc" not in error.message


async def test_a_base_url_without_the_api_path_is_failed_precondition(
    llama: ServiceProcess, key_file: Path
) -> None:
    wrong = f"http://{llama.target}/v2"
    with running("llm_openai", *stage_flags(wrong, key_file)) as stage:
        async with open_channel(stage.target) as channel:
            stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate(stub, request((pb.ROLE_USER, "hello")))
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert wrong in str(raised.value.details()) and "Not Found" in str(raised.value.details())
            watch = watch_health(channel, SERVICE_NAME)
            assert await next_status(watch) == NOT_SERVING
            watch.cancel()


async def test_a_refused_api_key_is_unauthenticated_and_no_key_is_ever_logged(
    llama: ServiceProcess, stage: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_key = "sk-wrong-fedcba9876543210"
    monkeypatch.setenv("VOICEPIPE_LLM_API_KEY", wrong_key)  # the other way to give a key
    with running(
        "llm_openai", *stage_flags(backend.base_url(llama), None, "--log-level", "debug")
    ) as refused:
        async with open_channel(refused.target) as channel:
            stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate(stub, request((pb.ROLE_USER, "hello")))
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key was refused" in str(raised.value.details())
            assert wrong_key not in str(raised.value.details())
            watch = watch_health(channel, SERVICE_NAME)
            assert await next_status(watch) == NOT_SERVING
            watch.cancel()
        await wait_for_log(refused, lambda e: e.get("event") == "rejected request")
    for process, key in ((refused, wrong_key), (stage, API_KEY)):
        assert process.log_lines, "no log lines to check"
        assert not [line for line in process.log_lines if key in line or key[-8:] in line]


async def test_health_and_calls_follow_the_backend_down_and_up(key_file: Path) -> None:
    own = await asyncio.to_thread(backend.start, 0, "--api-key", API_KEY)
    port = own.port
    try:
        with running("llm_openai", *stage_flags(backend.base_url(own), key_file)) as stage:
            async with open_channel(stage.target) as channel:
                stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
                # Starting the backend again loads the model: longer than an ordinary call.
                watch = watch_health(channel, SERVICE_NAME, timeout_s=4 * GENERATE_TIMEOUT_S)
                try:
                    assert await next_status(watch) == SERVING
                    await asyncio.to_thread(own.stop)
                    assert await next_status(watch) == NOT_SERVING
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await generate(stub, request((pb.ROLE_USER, "hello")))
                    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "unreachable" in str(raised.value.details())

                    own = await asyncio.to_thread(backend.start, port, "--api-key", API_KEY)
                    assert await next_status(watch) == SERVING
                finally:
                    watch.cancel()
                text, _ = await generate(stub, request((pb.ROLE_USER, "hello")))
                assert text.strip()
    finally:
        own.stop()
