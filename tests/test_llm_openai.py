"""The LLM stage in front of a real llama.cpp server (the local default backend with the bundled
SmolLM2-135M, four slots): replies stream over gRPC, several at once, the history reaches the
model and is trimmed to fit a slot, cancelling frees the backend's slot at once, a busy backend's
queue is bounded, backend failures reach the caller as statuses it can act on, health follows
the backend, and the API key is never logged."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
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
from tests.stack_fixtures import Caller
from voice.v1 import common_pb2, language_model_pb2, language_model_pb2_grpc, voice_agent_pb2
from voicepipe.aio import cancel_and_wait
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe.stage.llm import SERVICE_NAME, Generation, Message
from voicepipe_tools.stack import start_stack

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
    # One token a chunk; llama.cpp also counts the end-of-sequence token it did not stream.
    assert len(deltas) <= summary.usage.completion_tokens <= len(deltas) + 1
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


async def test_the_speech_prompt_is_added_only_when_the_conversation_has_no_system_message() -> None:
    engine = OpenAIEngine(
        Endpoint("http://127.0.0.1:9/v1", "m", "none", 1, 1, 1), ReplySettings(SPEECH_SYSTEM_PROMPT, 0, 0)
    )

    async def roles(*messages: Message) -> list[tuple[str, str]]:
        sent = await engine.messages(Generation(messages, 10, 0.0, common_pb2.Correlation()), 10)
        return [(m["role"], str(m.get("content"))) for m in sent]

    try:
        assert await roles(Message("user", "hi")) == [("system", SPEECH_SYSTEM_PROMPT), ("user", "hi")]
        own = (Message("system", "Be terse."), Message("user", "hi"))
        assert await roles(*own) == [("system", "Be terse."), ("user", "hi")]
    finally:
        await engine.close()


async def busy_slots(backend_process: ServiceProcess) -> int:
    """How many of the backend's slots are generating, as its own `/slots` says."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        slots = (await client.get(f"http://{backend_process.target}/slots")).json()
    return sum(1 for slot in slots if slot["is_processing"])


async def test_cancelling_the_call_frees_the_backends_slot_at_once(
    stub: Stub, stage: ServiceProcess, llama: ServiceProcess
) -> None:
    long_reply = request((pb.ROLE_USER, "Count from 1 to 2000, separated by commas."), max_tokens=1500)
    call = stub.Generate(long_reply, timeout=GENERATE_TIMEOUT_S)
    assert (await next_response(call)).HasField("delta")
    first = time.monotonic()
    for _ in range(5):
        assert (await next_response(call)).HasField("delta")
    rate = 5 / (time.monotonic() - first)  # the backend's pace, tokens/s
    assert await busy_slots(llama) == 1
    call.cancel()
    cancelled = time.monotonic()
    # The slot is free long before the 1500 tokens would have been generated.
    while await busy_slots(llama):
        assert time.monotonic() - cancelled < 1494 / rate / 4, "the backend kept generating"
        await asyncio.sleep(0.02)
    await wait_for_log(stage, lambda e: e.get("event") == "generation cancelled")


async def test_four_conversations_stream_their_replies_at_the_same_time(
    stub: Stub, llama: ServiceProcess
) -> None:
    async def reply(topic: str) -> tuple[float, float]:
        """When its first and its last delta arrived."""
        arrivals = [
            time.monotonic()
            async for r in stub.Generate(
                request((pb.ROLE_USER, f"Write a long story about {topic}."), max_tokens=60),
                timeout=GENERATE_TIMEOUT_S,
            )
            if r.HasField("delta")
        ]
        return arrivals[0], arrivals[-1]

    spans = await asyncio.gather(*(reply(t) for t in ("a dragon", "the sea", "a robot", "a city")))
    # Continuous batching: every reply had started before any of them finished.
    assert max(first for first, _ in spans) < min(last for _, last in spans)


async def test_a_busy_backends_queue_is_bounded_and_says_its_limit(
    llama: ServiceProcess, key_file: Path
) -> None:
    flags = stage_flags(backend.base_url(llama), key_file, "--backend-slots", "1", "--max-waiting", "1")
    with running("llm_openai", *flags) as one_slot:
        async with open_channel(one_slot.target) as channel:
            stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
            long_reply = request((pb.ROLE_USER, "Count from 1 to 2000."), max_tokens=400)
            generating = stub.Generate(long_reply, timeout=GENERATE_TIMEOUT_S)
            assert (await next_response(generating)).HasField("delta")
            waiting = stub.Generate(
                request((pb.ROLE_USER, "Say hi."), max_tokens=4), timeout=GENERATE_TIMEOUT_S
            )
            await wait_for_log(one_slot, lambda e: e.get("event") == "waiting for a slot")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate(stub, request((pb.ROLE_USER, "And me?"), max_tokens=4))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "all 1 slots are generating" in str(raised.value.details())
            assert "--max-waiting 1" in str(raised.value.details())
            generating.cancel()
            # The one that waited gets the slot as soon as it is free.
            answered = [r async for r in waiting]
            assert answered[-1].HasField("complete")


@pytest.mark.timeout(600)  # a hundred turns on a CPU the other tests may share
async def test_a_hundred_turn_conversation_is_trimmed_to_fit_a_slot(key_file: Path) -> None:
    # A backend of small slots (512 tokens), so that the history outgrows one within a few turns.
    small = await asyncio.to_thread(
        backend.start, 0, "--api-key", API_KEY, "--parallel", "1", "--ctx-per-slot", "512"
    )
    try:
        with running("llm_openai", *stage_flags(backend.base_url(small), key_file)) as stage:
            async with open_channel(stage.target) as channel:
                stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
                turns: list[tuple[pb.Role.ValueType, str]] = []
                prompt_tokens = []
                for number in range(1, 101):
                    turns.append((pb.ROLE_USER, f"Turn {number}: name one fact about the number {number}."))
                    text, responses = await generate(stub, request(*turns, max_tokens=8))
                    assert text.strip(), f"turn {number} got an empty reply"
                    prompt_tokens.append(responses[-1].complete.usage.prompt_tokens)
                    turns.append((pb.ROLE_ASSISTANT, text))
            # The history outgrew the slot many times over and was cut, oldest turns first.
            await wait_for_log(stage, lambda e: e.get("event") == "history trimmed")
            assert max(prompt_tokens) <= 512 - 8
    finally:
        await asyncio.to_thread(small.stop)


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
            long_reply = request((pb.ROLE_USER, "Count from 1 to 2000, separated by commas."), max_tokens=200)
            _, responses = await generate(stub, long_reply)
            assert responses[-1].complete.usage.completion_tokens == 200
        finally:
            await cancel_and_wait(follower)
            watch.cancel()
        assert statuses == []


async def test_a_user_message_too_long_for_a_slot_is_invalid_argument_naming_the_limit(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate(stub, request((pb.ROLE_USER, "word " * 3000)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 2048 tokens per conversation" in str(raised.value.details())


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


class ClosesReusedConnections:
    """An OpenAI-compatible HTTP/1.1 server that answers every request on a new connection but
    closes a kept-alive connection, without a response byte, when a completion request arrives
    on it: the race of a server whose keep-alive ends just as the client reuses the connection
    ("Server disconnected without sending a response"), made to happen every time."""

    def __init__(self) -> None:
        self.closed_on_reuse = 0
        self.completions = 0

    async def serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = next(
                    (
                        int(line.split(":", 1)[1])
                        for line in lines
                        if line.lower().startswith("content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if path.endswith("/chat/completions") and served:
                    self.closed_on_reuse += 1
                    return
                writer.write(self._answer(method, path))
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> bytes:
        if method == "POST" and path.endswith("/chat/completions"):
            self.completions += 1
            chunks: list[dict[str, object]] = [
                {"choices": [{"index": 0, "delta": {"content": "Hello there."}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            envelope = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
            body = (
                "".join(f"data: {json.dumps(envelope | chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
            )
            return self._response("200 OK", "text/event-stream", body)
        if path.endswith("/health"):
            return self._response("200 OK", "application/json", '{"status": "ok"}')
        return self._response("404 Not Found", "application/json", '{"error": "not found"}')

    @staticmethod
    def _response(status: str, content_type: str, body: str) -> bytes:
        data = body.encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n\r\n"
        return head.encode() + data


async def test_a_kept_alive_connection_the_backend_closed_is_never_the_callers_error() -> None:
    backend_server = ClosesReusedConnections()
    server = await backend_server.serve()
    port = server.sockets[0].getsockname()[1]
    try:
        # Started off the event loop, which serves the backend meanwhile.
        flags = stage_args(0, 0, *stage_flags(f"http://127.0.0.1:{port}/v1", None))
        stage = await asyncio.to_thread(ServiceProcess, "llm_openai", flags)
        try:
            async with open_channel(stage.target) as channel:
                stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
                for _ in range(10):
                    text, _ = await generate(stub, request((pb.ROLE_USER, "hello")))
                    assert text == "Hello there."
            await wait_for_log(
                stage, lambda e: e.get("event", "").startswith("backend closed the connection")
            )
        finally:
            await asyncio.to_thread(stage.stop)
        assert backend_server.closed_on_reuse > 0
    finally:
        server.close()
        await server.wait_closed()


def test_a_cpu_without_an_instruction_set_the_server_needs_is_named_not_a_crash() -> None:
    every = {"AVX": True, "AVX2": True, "FMA3": True, "F16C": True}
    assert backend.missing_cpu_features(every) == []
    assert backend.missing_cpu_features(every | {"AVX2": False, "FMA3": False}) == ["AVX2", "FMA"]
    # As a process: the CPU check runs before the server's library is loaded.
    run = subprocess.run(
        [sys.executable, "-c", "from llm_openai import backend; backend.check_cpu()"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr  # this machine has them all


def test_the_backend_refuses_to_start_on_a_cpu_lacking_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "missing_cpu_features", lambda: ["AVX2"])
    with pytest.raises(SystemExit) as raised:
        backend.main(["--port", "0"])
    assert "this CPU lacks AVX2" in str(raised.value) and "--base-url" in str(raised.value)


async def test_a_caller_whose_turn_finds_every_slot_busy_is_told_the_limit(
    llama: ServiceProcess, key_file: Path
) -> None:
    one_slot = ["--backend-slots", "1", "--max-waiting", "0"]
    stack = await start_stack(
        "instant",
        ephemeral=True,
        engines={"stt": "stub", "llm": "openai", "tts": "stub"},
        stage_flags={"llm": stage_flags(backend.base_url(llama), key_file, *one_slot)},
    )
    try:
        assert stack.orchestrator is not None
        async with open_channel(stack.stages["llm"].target) as llm_channel:
            stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(llm_channel)
            busy = stub.Generate(
                request((pb.ROLE_USER, "Count from 1 to 2000."), max_tokens=400), timeout=GENERATE_TIMEOUT_S
            )
            assert (await next_response(busy)).HasField("delta")
            async with (
                open_channel(stack.orchestrator.target) as channel,
                await Caller(channel, session_id="busy").open() as caller,
            ):
                await caller.type("Hello?")
                errors = await caller.wait_for(lambda: caller.of_kind("error"), what="an error event")
            busy.cancel()
    finally:
        await asyncio.to_thread(stack.stop)
    error = errors[0].error
    assert error.stage == voice_agent_pb2.STAGE_LLM
    assert error.code == "RESOURCE_EXHAUSTED"
    assert "all 1 slots are generating" in error.message and "--max-waiting 0" in error.message


async def test_every_slot_has_the_system_prompt_evaluated_before_serving(key_file: Path) -> None:
    """Callers who arrive at once, one per slot, each find the speech prompt already in their
    slot's cache: the stage warmed every slot before it reported SERVING, not just one."""
    fresh = await asyncio.to_thread(backend.start, 0, "--api-key", API_KEY)
    try:
        with running("llm_openai", *stage_flags(backend.base_url(fresh), key_file)) as stage:
            await wait_until_serving(stage.target, GENERATE_TIMEOUT_S)
            async with httpx2.AsyncClient(
                base_url=f"http://{fresh.target}", headers={"Authorization": f"Bearer {API_KEY}"}
            ) as client:
                prompt = (await client.post("/tokenize", json={"content": SPEECH_SYSTEM_PROMPT})).json()

                async def first_turn(number: int) -> dict[str, int]:
                    answer = await client.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [
                                {"role": "system", "content": SPEECH_SYSTEM_PROMPT},
                                {"role": "user", "content": f"Caller {number} says hello."},
                            ],
                            "max_tokens": 1,
                        },
                        timeout=GENERATE_TIMEOUT_S,
                    )
                    timings: dict[str, int] = answer.json()["timings"]
                    return timings

                async with asyncio.TaskGroup() as group:
                    turns = [
                        group.create_task(first_turn(n), name=f"first-turn-{n}")
                        for n in range(backend.DEFAULT_PARALLEL)
                    ]
        # Each evaluated only its own words and the chat template's: the prompt came from cache.
        assert all(t.result()["cache_n"] >= len(prompt["tokens"]) for t in turns), [t.result() for t in turns]
    finally:
        await asyncio.to_thread(fresh.stop)
