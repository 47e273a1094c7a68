"""The drain on SIGTERM that load balancers can follow (`--drain-delay`): health turns NOT_SERVING
at once while the listener still accepts new connections and calls for the delay; then new
connections are refused while in-flight calls finish within `--shutdown-grace`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2

import orchestrator.__main__ as orchestrator_main
from llm_stub.__main__ import SPEC as LLM_STUB
from stubs import audio_code, replies
from tests.conftest import StartService
from tests.helpers import (
    CALL_TIMEOUT_S,
    NOT_SERVING,
    SERVING,
    WAIT_TIMEOUT_S,
    health_status,
    open_channel,
    read_metric,
    wait_for_metric,
    watch_health,
)
from tests.stack_fixtures import processes, serving
from voice.v1 import language_model_pb2 as pb
from voice.v1 import language_model_pb2_grpc
from voicepipe import keepalive
from voicepipe.processes import ServiceProcess, free_port
from voicepipe.server import LIVENESS
from voicepipe.settings import ServerSettings
from voicepipe_client import PCM_16K, Conversation, Microphone, SessionSettings, Utterance

if TYPE_CHECKING:
    from voice.v1.language_model_pb2_grpc import LanguageModelServiceAsyncStub as Stub

Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]
Watch = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]

DRAIN_DELAY_S = 3.0
# The story (93 tokens) at this pace streams for about 6 s: it is still in flight when the delay
# ends, and ends well within the grace.
TOKENS_PER_SECOND = 15
SHUTDOWN_GRACE_S = 20.0
_POLL_S = 0.02


@asynccontextmanager
async def fresh_channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with a subchannel pool of its own, so its calls open a new TCP connection
    instead of sharing one that another channel of this process already has."""
    options = [*keepalive.client_options(), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        yield channel


def generate(channel: grpc.aio.Channel, text: str, timeout_s: float = CALL_TIMEOUT_S) -> Call:
    stub: Stub = language_model_pb2_grpc.LanguageModelServiceStub(channel)
    return stub.Generate(
        pb.GenerateRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)]), timeout=timeout_s
    )


async def reply_text(call: Call) -> str:
    """The rest of a call's reply text (a failed call raises AioRpcError)."""
    text = []
    # read(), not `async for`: the caller may already have read from the call.
    while isinstance(response := await call.read(), pb.GenerateResponse):
        text.append(response.delta.text)
    return "".join(text)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def wait_until_refused(port: int, timeout_s: float) -> float:
    """Polls the listening port until a TCP connection is refused; returns when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(refuses_connections, port):
        assert time.monotonic() < deadline, f"still accepting connections after {timeout_s} s"
        await asyncio.sleep(_POLL_S)
    return time.monotonic()


async def test_sigterm_drains_not_serving_then_accepting_then_refusing_while_in_flight_calls_finish(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The delay from its variable: VOICEPIPE_<ROLE>_DRAIN_DELAY, as every flag has one.
    monkeypatch.setenv("VOICEPIPE_LLM_DRAIN_DELAY", str(DRAIN_DELAY_S))
    process = start_service(
        "llm_stub", "--tokens-per-second", str(TOKENS_PER_SECOND), "--shutdown-grace", str(SHUTDOWN_GRACE_S)
    )
    async with fresh_channel(process.target) as channel:
        story = generate(channel, "tell me a story", CALL_TIMEOUT_S + SHUTDOWN_GRACE_S)
        first = await story.read()
        assert isinstance(first, pb.GenerateResponse) and first.HasField("delta")
        watch = watch_health(channel, "", CALL_TIMEOUT_S + SHUTDOWN_GRACE_S)
        assert (await read_status(watch)) == SERVING

        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        # At once: health says NOT_SERVING (a load balancer's or a client's health check sees it).
        assert (await read_status(watch)) == NOT_SERVING

        # During the delay: a new connection and a new call on it are still served.
        async with fresh_channel(process.target) as late:
            assert await reply_text(generate(late, "hello")) == replies.GREETING
        served = time.monotonic()

        # After it: new connections are refused, while the process is still running the story.
        refused = await wait_until_refused(process.port, DRAIN_DELAY_S + WAIT_TIMEOUT_S)
        assert refused - signalled >= DRAIN_DELAY_S, "the listener closed before the drain delay ended"
        assert served < refused
        assert process.process.poll() is None
        async with fresh_channel(process.target) as too_late:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await reply_text(generate(too_late, "hello"))
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE

        # The call in flight since before SIGTERM finishes whole, within the grace.
        assert first.delta.text + await reply_text(story) == replies.STORY
        assert await story.code() == grpc.StatusCode.OK
        watch.cancel()
    assert await asyncio.to_thread(process.wait, WAIT_TIMEOUT_S) == 0
    stopped = [e["event"] for e in process.events() if e["event"] in ("draining", "shutting down", "stopped")]
    assert stopped == ["draining", "shutting down", "stopped"]


async def read_status(watch: Watch) -> int:
    response = await watch.read()
    assert isinstance(response, health_pb2.HealthCheckResponse), response
    return response.status


@pytest.mark.parametrize(
    ("parse", "variable"),
    [
        (orchestrator_main.parse_args, "VOICEPIPE_ORCHESTRATOR_DRAIN_DELAY"),
        (LLM_STUB.parse_args, "VOICEPIPE_LLM_DRAIN_DELAY"),
    ],
    ids=["orchestrator", "stage"],
)
def test_every_server_takes_the_drain_delay_from_its_flag_or_variable(
    parse: Callable[[list[str]], argparse.Namespace], variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ServerSettings.from_args(parse([])).drain_delay_s == 0
    monkeypatch.setenv(variable, "5")
    assert ServerSettings.from_args(parse([])).drain_delay_s == 5
    assert ServerSettings.from_args(parse(["--drain-delay", "2.5"])).drain_delay_s == 2.5


# --- several replicas of a stage behind one target ----------------------------------------------


async def generate_calls(replica: ServiceProcess) -> float:
    return await read_metric(replica.metrics_port, "grpc_server_started_total", grpc_method="Generate")


async def typed_turns(target: str, count: int) -> None:
    """`count` text turns in one conversation, each completed with the stub's reply."""
    async with open_channel(target) as channel:
        conversation = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False))
        async with conversation:
            for n in range(count):
                await assert_turn(conversation, f"what is {n} plus 1", f"{n} plus 1 is {n + 1}.")
            assert await conversation.finish() == grpc.StatusCode.OK


async def test_round_robin_spreads_calls_over_replicas_and_skips_a_draining_one() -> None:
    """Two LLM stage processes behind one target (as a headless Service's DNS name resolves to
    every pod): each gets calls; once one drains (NOT_SERVING, still accepting for its delay),
    new calls go to the other only, and no turn fails."""
    async with processes() as group:
        stt = await group.start("stt_stub")
        tts = await group.start("tts_stub")
        # The first drains for longer than the test lasts (it is killed at the end: a second SIGTERM).
        replicas = [await group.start("llm_stub", "--drain-delay", "60"), await group.start("llm_stub")]
        target = "ipv4:" + ",".join(replica.target for replica in replicas)
        orchestrator = await serving(await group.start_orchestrator(stt.target, target, tts.target))

        await typed_turns(orchestrator.target, 6)
        calls = [await generate_calls(replica) for replica in replicas]
        assert all(count >= 2 for count in calls), f"Generate calls per replica: {calls}"

        draining, other = replicas
        draining.signal(signal.SIGTERM)
        # The orchestrator's channel has been told NOT_SERVING once the replica ended its Watches.
        watches = {"grpc_method": "Watch"}
        await wait_for_metric(
            draining.metrics_port, "voicepipe_rpcs_in_flight", lambda v: v == 0, labels=watches
        )
        await typed_turns(orchestrator.target, 4)
        assert await generate_calls(draining) == calls[0]
        assert await generate_calls(other) == calls[1] + 4
        assert draining.process.poll() is None, "the draining replica should still be in its delay"
        # The stage never looked down to the orchestrator (its breaker stayed closed).
        assert await read_metric(orchestrator.metrics_port, "voicepipe_upstream_serving", upstream="llm") == 1
        went_down = [
            e for e in orchestrator.events() if e["event"] == "upstream health changed" and not e["serving"]
        ]
        assert not went_down


async def test_liveness_is_serving_while_readiness_is_not(start_service: StartService) -> None:
    """An orchestrator whose stages do not answer is not ready ("" NOT_SERVING: no traffic for
    it) but alive ("liveness" SERVING: no restart); after SIGTERM neither is SERVING."""
    unreachable = f"127.0.0.1:{free_port()}"
    process = start_service(
        "orchestrator",
        f"--stt={unreachable}",
        f"--llm={unreachable}",
        f"--tts={unreachable}",
        "--drain-delay",
        str(DRAIN_DELAY_S),
    )
    async with open_channel(process.target) as channel:
        assert await health_status(channel, "") == NOT_SERVING
        assert await health_status(channel, LIVENESS) == SERVING
        watch = watch_health(channel, LIVENESS)
        assert await read_status(watch) == SERVING
        process.signal(signal.SIGTERM)
        assert await read_status(watch) == NOT_SERVING
        watch.cancel()
    assert await asyncio.to_thread(process.wait, WAIT_TIMEOUT_S) == 0


async def test_a_conversation_outlives_its_orchestrators_drain_and_grace_then_ends_unavailable() -> None:
    """What a rollout of the orchestrator does to a conversation on a pod it replaces: its turns
    keep working through the drain delay and the grace (new connections are refused by then),
    and when the grace is over the call ends with UNAVAILABLE; the client reconnects."""
    delay_s, grace_s = 1.0, 3.0
    async with processes() as group:
        stages = [await group.start(module) for module in ("stt_stub", "llm_stub", "tts_stub")]
        orchestrator = await serving(
            await group.start_orchestrator(
                *(stage.target for stage in stages),
                "--drain-delay",
                str(delay_s),
                "--shutdown-grace",
                str(grace_s),
            )
        )
        async with open_channel(orchestrator.target) as channel:
            conversation = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False))
            async with conversation:
                signalled = time.monotonic()
                orchestrator.signal(signal.SIGTERM)
                await assert_turn(conversation, "what is 1 plus 1", "1 plus 1 is 2.")  # during the delay
                await wait_until_refused(orchestrator.port, delay_s + WAIT_TIMEOUT_S)
                await assert_turn(conversation, "what is 2 plus 1", "2 plus 1 is 3.")  # during the grace
                async with asyncio.timeout(grace_s + WAIT_TIMEOUT_S):
                    code = await conversation.ended()
                ended = time.monotonic()
        assert code == grpc.StatusCode.UNAVAILABLE, conversation.details
        assert ended - signalled >= delay_s + grace_s
        assert await asyncio.to_thread(orchestrator.wait, WAIT_TIMEOUT_S) == 0


async def assert_turn(conversation: Conversation, text: str, reply: str) -> None:
    turn = await conversation.type(text)
    await turn.done.wait()
    assert turn.outcome == "completed", turn.errors
    assert turn.agent_text == reply


async def test_a_conversation_moves_to_another_stt_replica_when_its_own_is_replaced() -> None:
    """What a rollout of a stage does to a conversation: its Transcribe stream stays on the
    draining STT replica through the delay and the grace, then is cut, and the orchestrator
    resumes it on the other replica; the caller's next utterance is transcribed exactly."""
    async with processes() as group:
        replicas = [
            await group.start("stt_stub", "--drain-delay", "0.5", "--shutdown-grace", "1") for _ in range(2)
        ]
        llm, tts = [await group.start(module) for module in ("llm_stub", "tts_stub")]
        target = "ipv4:" + ",".join(replica.target for replica in replicas)
        orchestrator = await serving(await group.start_orchestrator(target, llm.target, tts.target))
        async with open_channel(orchestrator.target) as channel:
            conversation = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False))
            async with conversation:
                await assert_spoken_turn(conversation, "what is 1 plus 1", "1 plus 1 is 2.")
                streams = [await transcribe_streams(replica) for replica in replicas]
                assert sorted(streams) == [0, 1], streams
                holding, other = replicas if streams[0] else replicas[::-1]
                holding.signal(signal.SIGTERM)
                assert await asyncio.to_thread(holding.wait, WAIT_TIMEOUT_S) == 0
                await wait_for_metric(
                    orchestrator.metrics_port,
                    "voicepipe_stage_resumptions_total",
                    lambda v: v >= 1,
                    labels={"stage": "stt"},
                )
                await assert_spoken_turn(conversation, "what is 2 plus 1", "2 plus 1 is 3.")
                assert await transcribe_streams(other) == 1
                assert await conversation.finish() == grpc.StatusCode.OK


async def transcribe_streams(replica: ServiceProcess) -> float:
    return await read_metric(replica.metrics_port, "voicepipe_rpcs_in_flight", grpc_method="Transcribe")


async def assert_spoken_turn(conversation: Conversation, phrase: str, reply: str) -> None:
    turn = await conversation.speak(Utterance.spoken(audio_code.render, phrase, PCM_16K))
    await turn.done.wait()
    assert turn.outcome == "completed", turn.errors
    assert turn.user_text == audio_code.normalize_text(phrase)
    assert turn.agent_text == reply
