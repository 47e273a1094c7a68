"""The orchestrator's turn logic in the test's own process: the stage engines (the stubs, or a
wrapper around one) served by grpc.aio servers on ephemeral loopback ports in the test's event
loop, and a TurnRunner reading from them, its events collected as a client would read them. No
subprocess: a turn takes milliseconds, so each decision (barge-in, speculation, resumption) gets a
test of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llm_stub.engine import StubLanguageEngine
from orchestrator.output import SessionOutput
from orchestrator.tickets import Tickets
from orchestrator.timings import TurnTimings
from orchestrator.turn import TurnSettings
from orchestrator.turns import TurnContext, TurnRequest, TurnRunner
from orchestrator.upstreams import Upstreams
from stt_stub.engine import StubSpeechEngine
from stubs.faults import FaultSettings
from stubs.latency import PROFILES
from tts_stub.engine import StubVoiceEngine
from voice.v1 import language_model_pb2, resumption_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.aio import cancel_and_wait
from voicepipe.server import runtime_interceptors
from voicepipe.stage import Engine
from voicepipe.stage.llm import Finished, Generation, LanguageEngine
from voicepipe.stage.main import registration
from voicepipe.stage.protocol import SessionLimit
from voicepipe_client import PCM_16K

T = TypeVar("T")

INSTANT = PROFILES["instant"]
# How long a test waits for an expected event: generous, for a loaded machine.
EVENT_TIMEOUT_S = 10.0
# A lead longer than any reply: the playout never waits for real time.
NO_PACING_S = 600.0


@dataclass
class Served:
    target: str
    server: grpc.aio.Server


@asynccontextmanager
async def served(engine: Engine, faults: FaultSettings | None = None) -> AsyncIterator[Served]:
    """`engine` behind its contract on 127.0.0.1:<ephemeral>, with the runtime's interceptors and
    the fault knobs."""
    knobs = faults.interceptors() if faults is not None else []
    server = grpc.aio.server(interceptors=[*runtime_interceptors(), *knobs])
    stage = registration(engine, SessionLimit(0))
    stage.add_to_server(stage.servicer, server)
    # The orchestrator's channels check each address's health (round_robin): it is SERVING.
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(stage.full_name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(f"127.0.0.1:{port}", server)
    finally:
        await server.stop(None)


class Gate:
    """Holds engine work until opened: while closed, a call waits before it produces anything."""

    def __init__(self, *, opened: bool = True) -> None:
        self._opened = asyncio.Event()
        if opened:
            self._opened.set()

    def open(self) -> None:
        self._opened.set()

    def close(self) -> None:
        self._opened.clear()

    async def passed(self) -> None:
        await self._opened.wait()


@dataclass
class GenerationSeen:
    """One Generate call as the LLM engine saw it."""

    messages: list[tuple[str, str]]
    finished: bool = False  # it produced its whole reply
    cancelled: bool = False  # it was closed before that


class Changes:
    """Wakes whoever waits for a condition on some state, each time the state changes."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], T | None], what: str) -> T:
        """The first truthy value of `condition()`, re-evaluated after every change; fails after
        EVENT_TIMEOUT_S."""
        try:
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                while not (result := condition()):
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {EVENT_TIMEOUT_S} s") from None
        return result


class RecordedLanguageEngine(LanguageEngine):
    """The LLM stub, behind a gate, recording every call it gets."""

    def __init__(self, inner: StubLanguageEngine, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate
        self.calls: list[GenerationSeen] = []
        self._changes = Changes()

    async def generate(self, generation: Generation) -> AsyncGenerator[str | Finished, None]:
        seen = GenerationSeen([(m.role, m.content) for m in generation.messages])
        self.calls.append(seen)
        self._changes.changed()
        try:
            await self._gate.passed()
            async for item in self._inner.generate(generation):
                yield item
            seen.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            seen.cancelled = True
            raise
        finally:
            self._changes.changed()

    async def wait_for(self, condition: Callable[[], bool], what: str = "such LLM call") -> None:
        await self._changes.until(condition, what)


@dataclass
class Stages:
    """The three stages, and the LLM engine's record of its calls."""

    upstreams: Upstreams
    llm: RecordedLanguageEngine
    llm_gate: Gate
    llm_server: grpc.aio.Server


@asynccontextmanager
async def stages(
    *,
    llm_temperature: float = 0.0,
    llm_faults: FaultSettings | None = None,
    tts_faults: FaultSettings | None = None,
) -> AsyncIterator[Stages]:
    """The stub stages in this process (the LLM recorded, behind an open gate), with the
    orchestrator's channels to them."""
    gate = Gate()
    llm = RecordedLanguageEngine(StubLanguageEngine(INSTANT, llm_temperature), gate)
    async with AsyncExitStack() as stack:
        stt = await stack.enter_async_context(served(StubSpeechEngine(INSTANT)))
        llm_stage = await stack.enter_async_context(served(llm, llm_faults))
        tts = await stack.enter_async_context(served(StubVoiceEngine(INSTANT), tts_faults))

        async def health_changed(serving: bool) -> None:
            return None

        # No health Watch (start() is not called): the breakers stay closed, as for healthy stages.
        upstreams = Upstreams(stt.target, llm_stage.target, tts.target, health_changed)
        stack.push_async_callback(upstreams.close)
        yield Stages(upstreams, llm, gate, llm_stage.server)


def timings() -> TurnTimings:
    now = time.monotonic()
    return TurnTimings(speech_ended_at=now, stt_finalization=Duration(), transcript_received_at=now)


def typed(text: str) -> TurnRequest:
    return TurnRequest(text, timings())


@dataclass
class Conversation:
    """A TurnRunner and what its client receives, in order."""

    runner: TurnRunner
    output: SessionOutput
    events: list[pb.ConverseResponse] = field(default_factory=list)
    _changes: Changes = field(default_factory=Changes)

    async def read(self) -> None:
        async for event in self.output.responses():
            self.events.append(event)
            self._changes.changed()

    async def wait_for(self, condition: Callable[[], T | None], what: str) -> T:
        """The first truthy value of `condition()`, re-evaluated after every event."""
        try:
            return await self._changes.until(condition, what)
        except AssertionError as error:
            raise AssertionError(f"{error}; events: {self.summary()}") from None

    def of_turn(self, turn_id: str) -> list[pb.ConverseResponse]:
        return [e for e in self.events if e.correlation.turn_id == turn_id]

    def ending(self, turn_id: str) -> pb.ConverseResponse | None:
        """The event that ended the turn: completed, interrupted, or an error."""
        ends = ("turn_completed", "turn_interrupted", "error")
        return next((e for e in self.of_turn(turn_id) if e.WhichOneof("event") in ends), None)

    async def ended(self, turn_id: str) -> pb.ConverseResponse:
        return await self.wait_for(lambda: self.ending(turn_id), f"end of turn {turn_id}")

    def audio(self, turn_id: str) -> bytes:
        return b"".join(e.reply_audio.audio for e in self.of_turn(turn_id) if e.HasField("reply_audio"))

    def history(self) -> list[tuple[int, str]]:
        return [(m.role, m.content) for m in self.runner.history]

    def summary(self) -> list[str]:
        return [f"{e.WhichOneof('event')}#{e.correlation.turn_id}" for e in self.events[-30:]]


@asynccontextmanager
async def conversation(
    stages: Stages, *, audio_lead_s: float = NO_PACING_S, tickets: Tickets | None = None
) -> AsyncIterator[Conversation]:
    """A TurnRunner on the stages, running and read until the block ends (then finished: the
    turns queued are played to their end). Reply audio leaves as fast as it comes unless
    `audio_lead_s` (how far ahead of real-time playback it may run) says otherwise."""
    output = SessionOutput(max_events=10_000, slow_client_timeout_s=EVENT_TIMEOUT_S)
    context = TurnContext(
        session_id="in-process",
        settings=TurnSettings(
            output_format=PCM_16K, voice="", audio_lead_s=audio_lead_s, first_segment="clause"
        ),
        upstreams=stages.upstreams,
        output=output,
        turn_budget_s=EVENT_TIMEOUT_S,
        session_deadline=time.monotonic() + 60,
    )
    start = resumption_pb2.ResumptionState(session_id="in-process", history=[])
    runner = TurnRunner(context, start, tickets)
    talk = Conversation(runner, output)
    running = asyncio.create_task(runner.run(), name="in-process-turns")
    reading = asyncio.create_task(talk.read(), name="in-process-client")
    try:
        # One pass of the loop: the runner (scheduled first) runs up to its wait for a turn, so the
        # conversation is idle, as a session's is between turns.
        await asyncio.sleep(0)
        yield talk
        await runner.finish()
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            await running
        output.close()
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            await reading
    finally:
        await cancel_and_wait(running, reading)


USER = language_model_pb2.ROLE_USER
ASSISTANT = language_model_pb2.ROLE_ASSISTANT
