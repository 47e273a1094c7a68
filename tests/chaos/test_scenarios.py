"""Chaos scenarios: the orchestrator keeps conversations whole through connection resets, stage
crashes and restarts, stalls and GOAWAYs. A FaultProxy sits between the orchestrator and each
stage (loopback only); every transcript and every reply is checked exactly through the stub
audio code, so lost, duplicated or reordered audio fails the test.

The figures these tests measure are printed (run `make chaos` to see them)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.turn import TTS_DEADLINE_GRACE_S
from stubs import audio_code, replies
from tests.chaos.fault_proxy import FaultProxy
from tests.helpers import (
    NOT_SERVING,
    SERVING,
    health_status,
    open_channel,
    read_metric,
    scrape,
    wait_for_metric,
)
from tests.stack_fixtures import heard
from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe.stage.llm import Message
from voicepipe_client import Conversation, Microphone, SessionSettings, Turn, Utterance

pytestmark = pytest.mark.chaos

FMT = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
STAGE_MODULES = {"stt": "stt_stub", "llm": "llm_stub", "tts": "tts_stub"}
STAGE_SERVICES = {
    "stt": "voice.v1.SpeechToTextService",
    "llm": "voice.v1.LanguageModelService",
    "tts": "voice.v1.TextToSpeechService",
}


async def start_process(module: str, *extra: str, port: int = 0) -> ServiceProcess:
    # ServiceProcess blocks until "ready"; the proxies run on this loop, so wait in a thread.
    return await asyncio.to_thread(
        ServiceProcess, module, stage_args(port, 0, "--latency-profile", "instant", *extra)
    )


@dataclass
class ChaosStack:
    """Three stages, a FaultProxy in front of each, and an orchestrator that reaches the stages
    only through the proxies."""

    stages: dict[str, ServiceProcess] = field(default_factory=dict)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    orchestrator: ServiceProcess | None = None

    @property
    def target(self) -> str:
        assert self.orchestrator is not None
        return self.orchestrator.target

    async def kill_stage(self, name: str) -> None:
        await asyncio.to_thread(self.stages[name].kill)

    async def restart_stage(self, name: str, *extra: str) -> float:
        """Starts the stage again (on a new port, as a rescheduled pod would come back) and
        points its proxy there; returns the monotonic time it became ready."""
        self.stages[name] = await start_process(STAGE_MODULES[name], *extra)
        self.proxies[name].set_upstream(self.stages[name].port)
        return time.monotonic()


@contextlib.asynccontextmanager
async def chaos_stack(
    stage_flags: Mapping[str, Sequence[str]] | None = None,
    orchestrator_flags: Sequence[str] = (),
    *,
    absent: str | None = None,
) -> AsyncIterator[ChaosStack]:
    """`absent` names a stage that is not started (its proxy refuses connections)."""
    stack = ChaosStack()
    try:
        for name, module in STAGE_MODULES.items():
            if name != absent:
                stack.stages[name] = await start_process(module, *(stage_flags or {}).get(name, ()))
            proxy = FaultProxy(
                stack.stages[name].port if name in stack.stages else 1, seed=len(stack.proxies)
            )
            await proxy.start()
            stack.proxies[name] = proxy
            if name == absent:
                proxy.refuse(True)
        targets = [f"--{name}={proxy.target}" for name, proxy in stack.proxies.items()]
        stack.orchestrator = await asyncio.to_thread(
            ServiceProcess, "orchestrator", stage_args(0, 0, *targets, *orchestrator_flags)
        )
        if absent is None:
            await wait_until_serving(stack.target, 10)
        yield stack
    finally:
        if stack.orchestrator is not None:
            await asyncio.to_thread(stack.orchestrator.stop)
        for proxy in stack.proxies.values():
            await proxy.close()
        for process in stack.stages.values():
            await asyncio.to_thread(process.stop)


@contextlib.asynccontextmanager
async def conversation(target: str, *, realtime: bool, timeout_s: float = 120) -> AsyncIterator[Conversation]:
    async with open_channel(target) as channel:
        client = Conversation(
            channel, SessionSettings(FMT, FMT), microphone=Microphone(realtime=realtime), timeout_s=timeout_s
        )
        async with client:
            yield client


def spoken(phrase: str) -> Utterance:
    return Utterance.spoken(audio_code.render, phrase, FMT)


async def said(client: Conversation, phrase: str) -> Turn:
    """Speaks `phrase` and returns its turn once that turn is over."""
    turn = client.say(spoken(phrase))
    await turn.done.wait()
    return turn


async def typed(client: Conversation, text: str) -> Turn:
    """Sends a text turn and returns the turn once it is over."""
    turn = await client.type(text)
    await turn.done.wait()
    return turn


def decoded_reply(turn: Turn) -> list[str]:
    """The turn's reply audio, decoded: one utterance whose text is the reply, if nothing was
    lost, duplicated or reordered."""
    return heard(turn.audio, FMT)


def expected_reply(text: str) -> str:
    return replies.reply([Message("user", text)])


def assert_exact_turn(turn: Turn, phrase: str) -> None:
    assert turn.outcome == "completed", f"turn {turn.turn_id} {turn.outcome}: {turn.errors}"
    assert turn.user_text == audio_code.normalize_text(phrase)
    reply = expected_reply(phrase)
    assert turn.agent_text == reply
    assert decoded_reply(turn) == [audio_code.normalize_text(reply)]


async def spoken_conversation(target: str, phrases: Sequence[str]) -> list[Turn]:
    """Speaks each phrase in real time and waits for its reply; checks every turn exactly."""
    async with conversation(target, realtime=True) as client:
        turns = [await said(client, phrase) for phrase in phrases]
        for turn, phrase in zip(turns, phrases, strict=True):
            assert_exact_turn(turn, phrase)
        assert client.transcripts == [audio_code.normalize_text(p) for p in phrases]
        assert client.errors == []
        assert await client.finish() == grpc.StatusCode.OK
    return turns


def arithmetic_phrases(session: int, count: int) -> list[str]:
    return [f"what is {session * 100 + i} plus {i + 7}" for i in range(count)]


# --- 1. connection resets ------------------------------------------------------------------------


async def test_resets_on_every_stage_link_lose_nothing() -> None:
    """RST on each stage link about every 2 s during 50 spoken turns (5 concurrent real-time
    conversations of 10 turns): every turn completes and every transcript and reply is exact."""
    sessions, turns_each = 5, 10
    # Paced LLM and TTS keep their streams open long enough for resets to hit them mid-turn.
    paced = {"llm": ["--tokens-per-second", "30"], "tts": ["--realtime-factor", "2"]}
    async with chaos_stack(paced) as stack:
        for proxy in stack.proxies.values():
            await proxy.reset_every(2.0, jitter_s=0.5)
        started = time.monotonic()
        results = await asyncio.gather(
            *(spoken_conversation(stack.target, arithmetic_phrases(s, turns_each)) for s in range(sessions))
        )
        elapsed = time.monotonic() - started
        for proxy in stack.proxies.values():
            await proxy.stop_resets()
        resets = {name: proxy.stats.connections_reset for name, proxy in stack.proxies.items()}
        assert orchestrator_metric_port(stack) > 0
        resumed = {
            stage: await read_metric(
                orchestrator_metric_port(stack), "voicepipe_stage_resumptions_total", stage=stage
            )
            for stage in STAGE_MODULES
        }
    completed = sum(len(turns) for turns in results)
    assert completed == sessions * turns_each
    assert all(count > 0 for count in resets.values()), resets
    print(
        f"\nscenario 1: {completed}/{sessions * turns_each} turns completed exactly in {elapsed:.1f} s;"
        f" connections reset per link {resets}; streams resumed {resumed}"
    )


def orchestrator_metric_port(stack: ChaosStack) -> int:
    assert stack.orchestrator is not None
    return stack.orchestrator.metrics_port


# --- 2. a stage killed and restarted --------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stt", "llm", "tts"])
async def test_stage_killed_mid_turn_and_restarted(stage: str) -> None:
    """kill -9 a stage while a turn uses it, restart it: the turn in flight fails cleanly or
    completes, and turns succeed again within 2 s of the restart."""
    # The victim is slowed down so that the kill lands mid-turn.
    slow = {"stt": [], "llm": ["--tokens-per-second", "20"], "tts": ["--realtime-factor", "1"]}[stage]
    async with chaos_stack({stage: slow}) as stack, conversation(stack.target, realtime=True) as client:
        assert_exact_turn(await said(client, "what is 1 plus 1"), "what is 1 plus 1")
        if stage == "stt":
            in_flight_phrase = "what is 2 plus 2"
            in_flight = client.say(spoken(in_flight_phrase))
            # Kill while the caller is still speaking (the phrase lasts about 0.6 s).
            await wait_for_metric(
                stack.stages["stt"].metrics_port,
                "grpc_server_msg_received_total",
                lambda v: v > 60,
                labels={"grpc_method": "Transcribe"},
            )
            await stack.kill_stage("stt")
            restarted_at = await stack.restart_stage("stt")
            await in_flight.first_audio.wait()
            # Audio is replayed into the new STT: the utterance spoken during the crash is
            # transcribed exactly, and its reply starts soon after the restart.
            recovered_s = time.monotonic() - restarted_at
            await in_flight.done.wait()
            assert_exact_turn(in_flight, in_flight_phrase)
            assert_exact_turn(await said(client, "what is 3 plus 3"), "what is 3 plus 3")
        else:
            in_flight = await client.type("tell me a story")
            # The first reply audio follows the first sentence: both stages are mid-stream now.
            await in_flight.first_audio.wait()
            await stack.kill_stage(stage)
            await in_flight.done.wait()
            assert in_flight.outcome in ("completed", "failed")
            if in_flight.outcome == "failed":
                assert [e.code for e in in_flight.errors] in (["UNAVAILABLE"],), in_flight.errors
            restarted_at = await stack.restart_stage(stage, *slow)
            # Turns started after the restart: the first may still find the breaker open (it
            # fails at once); turns succeed again within 2 s of the restart.
            after = None
            for _attempt in range(40):
                after = await client.type("what is 3 plus 3")
                await after.done.wait()
                if after.outcome == "completed":
                    break
                assert after.errors and after.errors[0].code == "UNAVAILABLE", after.errors
                await asyncio.sleep(0.05)  # pacing of the caller's retries, not synchronisation
            assert after is not None and after.outcome == "completed"
            assert after.first_audio_at is not None
            recovered_s = after.first_audio_at - restarted_at
            assert after.agent_text == expected_reply("what is 3 plus 3")
        assert recovered_s < 2.0, f"recovered {recovered_s:.2f} s after the restart"
        outcome = in_flight.outcome
        recovered_ms = recovered_s * 1000
        print(f"\nscenario 2 ({stage}): in-flight turn {outcome}; audio {recovered_ms:.0f} ms after restart")


# --- 3. a stage down when the orchestrator starts -------------------------------------------------


@pytest.mark.parametrize("stage", ["stt", "llm", "tts"])
async def test_orchestrator_comes_up_when_a_missing_stage_appears(stage: str) -> None:
    async with chaos_stack(absent=stage) as stack:
        async with open_channel(stack.target) as channel:
            assert await health_status(channel, "") == NOT_SERVING
            assert await health_status(channel, "voice.v1.VoiceAgentService") == NOT_SERVING
        stack.stages[stage] = await start_process(STAGE_MODULES[stage])
        stack.proxies[stage].set_upstream(stack.stages[stage].port)
        stack.proxies[stage].refuse(False)
        await wait_until_serving(stack.target, 5)
        async with open_channel(stack.target) as channel:
            assert await health_status(channel, "") == SERVING
        async with conversation(stack.target, realtime=False) as client:
            assert_exact_turn(await said(client, "what is 4 plus 4"), "what is 4 plus 4")


# --- 4. a stalled stage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "fault"),
    [
        ("llm", "server"),  # the LLM accepts the call and never answers
        ("tts", "server"),  # the TTS sends one chunk and then nothing
        ("llm", "network"),  # the path to the LLM goes silent (black hole)
    ],
)
async def test_stalled_stage_costs_its_deadline_then_the_next_turn_succeeds(stage: str, fault: str) -> None:
    turn_timeout_s = 1.5
    flags = (
        {stage: ["--fault-stall-after", "1" if stage == "tts" else "0", "--fault-calls", "1"]}
        if fault == "server"
        else {}
    )
    async with (
        chaos_stack(flags, ["--turn-timeout", str(turn_timeout_s)]) as stack,
        conversation(stack.target, realtime=False) as client,
    ):
        if fault == "network":
            stack.proxies[stage].black_hole(True)
        started = time.monotonic()
        stalled = await typed(client, "what is 5 plus 5")
        elapsed = time.monotonic() - started
        assert stalled.outcome == "failed"
        assert [(e.stage, e.code) for e in stalled.errors] == [(STAGE_ENUM[stage], "DEADLINE_EXCEEDED")]
        # TTS's deadline is the turn's plus a grace (so a stalled LLM is blamed on the LLM), plus
        # the playing time of the audio it did send.
        deadline_s = turn_timeout_s
        if stage == "tts":
            deadline_s += TTS_DEADLINE_GRACE_S + len(stalled.audio) / FMT.bytes_for(1000)
        assert deadline_s - 0.1 <= elapsed < deadline_s + 0.5, f"error after {elapsed:.2f} s"
        if fault == "network":
            stack.proxies[stage].black_hole(False)
            await stack.proxies[stage].reset_all()  # the path comes back as new connections
        after = await typed(client, "what is 6 plus 6")
        assert after.outcome == "completed", after.errors
        assert after.agent_text == expected_reply("what is 6 plus 6")


STAGE_ENUM = {"stt": 1, "llm": 2, "tts": 3}


# --- 5. the circuit breaker ------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["llm", "tts"])
async def test_breaker_fails_turns_fast_while_a_stage_is_down(stage: str) -> None:
    async with chaos_stack() as stack, conversation(stack.target, realtime=False) as client:
        assert (await typed(client, "what is 7 plus 7")).outcome == "completed"
        await stack.kill_stage(stage)
        await wait_for_metric(
            orchestrator_metric_port(stack),
            "voicepipe_upstream_breaker_state",
            lambda v: v == 1,
            labels={"upstream": stage, "state": "open"},
        )
        timings = []
        for _ in range(5):
            started = time.monotonic()
            failed = await typed(client, "what is 8 plus 8")
            timings.append(time.monotonic() - started)
            assert failed.outcome == "failed"
            assert failed.errors[0].stage == STAGE_ENUM[stage]
            assert failed.errors[0].code == "UNAVAILABLE"
            assert stage in failed.errors[0].message
        worst = max(timings)
        assert worst < 0.1, f"slowest fail-fast turn took {worst * 1000:.0f} ms"
        median_ms = float(np.median(timings)) * 1000
        worst_ms = worst * 1000
        print(
            f"\nscenario 5 ({stage}): fail-fast error in median {median_ms:.1f} ms, worst {worst_ms:.1f} ms"
        )
        restarted = await stack.restart_stage(stage)
        await wait_for_metric(
            orchestrator_metric_port(stack),
            "voicepipe_upstream_breaker_state",
            lambda v: v == 1,
            labels={"upstream": stage, "state": "closed"},
        )
        closed_ms = (time.monotonic() - restarted) * 1000
        print(f"scenario 5 ({stage}): breaker closed {closed_ms:.0f} ms after the restart")
        assert (await typed(client, "what is 9 plus 9")).outcome == "completed"


# --- 6. GOAWAY every second ------------------------------------------------------------------------


async def test_max_connection_age_of_one_second_fails_no_turn() -> None:
    """Every stage sends GOAWAY one second into each connection (and cuts calls a second after
    that): 20 spoken turns (4 real-time conversations of 5) all complete exactly."""
    age = ["--max-connection-age", "1", "--max-connection-age-grace", "1"]
    async with chaos_stack({name: age for name in STAGE_MODULES}) as stack:
        results = await asyncio.gather(
            *(spoken_conversation(stack.target, arithmetic_phrases(s, 5)) for s in range(4))
        )
        connections = {name: proxy.stats.connections_accepted for name, proxy in stack.proxies.items()}
        exposition = await asyncio.to_thread(scrape, orchestrator_metric_port(stack))
    resumed = {
        f"{s.labels['stage']}:{s.labels['reason']}": s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "voicepipe_stage_resumptions_total"
    }
    assert sum(len(turns) for turns in results) == 20
    assert all(count > 2 for count in connections.values()), connections
    print(f"\nscenario 6: 20/20 turns completed; connections per stage link {connections}; resumed {resumed}")


# --- 7. many sessions leave nothing behind ---------------------------------------------------------


async def test_a_thousand_sessions_leave_nothing_running() -> None:
    """1,000 sessions opened and closed, every fourth cancelled mid-turn: the orchestrator's task
    count, open upstream calls and active sessions return to their idle values."""
    total, concurrency = 1000, 25
    async with chaos_stack() as stack:
        port = orchestrator_metric_port(stack)
        idle_tasks = await read_metric(port, "voicepipe_asyncio_tasks")
        counter = iter(range(total))

        async def worker() -> None:
            async with open_channel(stack.target) as channel:
                for n in counter:
                    client = Conversation(
                        channel,
                        SessionSettings(FMT, FMT),
                        microphone=Microphone(realtime=False),
                        timeout_s=30,
                    )
                    async with client:
                        if n % 4 == 3:
                            story = await client.type("tell me a story")
                            await story.started.wait()  # then cancel mid-turn
                            continue
                        turn = await typed(client, "hi")
                        assert turn.outcome == "completed"
                        assert await client.finish() == grpc.StatusCode.OK

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        await wait_for_metric(port, "voicepipe_active_sessions", lambda v: v == 0)
        for stage in STAGE_MODULES:
            await wait_for_metric(
                port, "voicepipe_upstream_calls_in_flight", lambda v: v == 0, labels={"upstream": stage}
            )
        tasks = await wait_for_metric(port, "voicepipe_asyncio_tasks", lambda v: v <= idle_tasks)
        started_sessions = await read_metric(port, "grpc_server_started_total", grpc_method="Converse")
    assert started_sessions == total
    print(
        f"\nscenario 7: {total} sessions in {elapsed:.1f} s; tasks {idle_tasks:.0f} idle -> {tasks:.0f} after"
    )


async def test_sigterm_turns_orchestrator_not_serving_first() -> None:
    async with chaos_stack() as stack:
        assert stack.orchestrator is not None
        async with open_channel(stack.target) as channel:
            assert await health_status(channel, "") == SERVING
        stack.orchestrator.signal(signal.SIGTERM)
        assert await asyncio.to_thread(stack.orchestrator.wait, 15) == 0


async def test_generate_failing_before_its_first_response_is_retried_by_the_channel() -> None:
    """The channel's retry policy (gRFC A6) retries Generate on UNAVAILABLE before any response:
    the turn completes, and the LLM stage counts the retry attempts it received."""
    async with (
        chaos_stack({"llm": ["--fault-fail-first", "2"]}) as stack,
        conversation(stack.target, realtime=False) as client,
    ):
        turn = await typed(client, "what is 2 plus 2")
        assert turn.outcome == "completed", turn.errors
        assert turn.agent_text == expected_reply("what is 2 plus 2")
        retried = await read_metric(
            stack.stages["llm"].metrics_port, "voicepipe_server_retried_calls_total", grpc_method="Generate"
        )
    assert retried == 2
