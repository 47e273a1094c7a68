"""What the caller hears when a conversation moves to another orchestrator replica.

    python -m bench.resumption [--runs 10] [--latency-profile realistic]

Two orchestrators on loopback share the stubs and one ticket key; the client library reaches
both (`ipv4:` list, round_robin). Each run opens a conversation, completes one turn ("My name is
Ada."), asks "What is my name?", and at the first reply audio of that turn the replica holding
the call is stopped: SIGTERM (a drain: the turn plays to its end, then the call ends with
UNAVAILABLE after the ticket) or SIGKILL (a crash: the turn is redone on the other replica from
the audio the client sends again). The stopped replica is started again on its port for the
next run; drain and crash runs alternate, so a busy spell of the shared machine falls on both.

Figures, per kind of move, median and p90 over the runs:
- gap: from the last reply audio received before the move to the first event of the new call
  (the `Resumed` notice's gap_s);
- for a crash, until reply audio again: from the last reply audio before the move to the first
  reply audio of the redone turn.
Every run checks that the answer was "Your name is Ada." (the history moved with the call).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stubs.audio_code import render
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, free_port, stage_args
from voicepipe_client import (
    PCM_16K,
    Conversation,
    Microphone,
    Resumed,
    SessionSettings,
    Turn,
    TurnAssembler,
    Utterance,
    connect,
)

RUNS = 10
READY_TIMEOUT_S = 30.0
TURN_TIMEOUT_S = 30.0
# A draining orchestrator lets the turn it plays end, then exits.
EXIT_TIMEOUT_S = 15.0
ANSWER = "Your name is Ada."


class Replicas:
    """Orchestrators that share stages and a ticket key, each on a loopback port of its own that
    it keeps across restarts; `stop()` stops them."""

    def __init__(self, flags: Sequence[str], count: int = 2) -> None:
        self.flags = list(flags)
        self.ports = [free_port() for _ in range(count)]
        self.running: list[ServiceProcess] = []

    async def start(self) -> Replicas:
        """Starts every replica (those that started are kept for stop() if another fails)."""
        started = await asyncio.gather(
            *(self.start_one(i) for i in range(len(self.ports))), return_exceptions=True
        )
        self.running = [process for process in started if isinstance(process, ServiceProcess)]
        for failure in started:
            if isinstance(failure, BaseException):
                raise failure
        return self

    async def start_one(self, index: int) -> ServiceProcess:
        process = await asyncio.to_thread(
            ServiceProcess, "orchestrator", stage_args(self.ports[index], -1, *self.flags)
        )
        try:
            await wait_until_serving(process.target, READY_TIMEOUT_S)
        except BaseException:
            await asyncio.to_thread(process.stop)
            raise
        return process

    def stop(self) -> None:
        for process in self.running:
            process.stop()

    @property
    def target(self) -> str:
        """One gRPC target naming every replica."""
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def holder(self, session_id: str) -> int:
        """The replica whose live call holds the conversation (from their logs)."""
        for index, process in enumerate(self.running):
            events = [e for e in process.events() if e.get("session_id") == session_id]
            started = sum(e["event"] == "session started" for e in events)
            ended = sum(e["event"] in ("session ended", "session failed") for e in events)
            if process.process.poll() is None and started > ended:
                return index
        raise RuntimeError(f"no replica holds conversation {session_id}")

    async def restart(self, index: int) -> int:
        """SIGTERM (the replica drains), then replace() it; returns its exit code."""
        self.running[index].signal(signal.SIGTERM)
        return await self.replace(index)

    async def replace(self, index: int) -> int:
        """Waits for a replica stopped by a signal to exit and starts it again on the same port;
        returns its exit code (0 after a drain, -9 after SIGKILL)."""
        old = self.running[index]
        code = await asyncio.to_thread(old.wait, EXIT_TIMEOUT_S)
        await asyncio.to_thread(old.stop)  # its log reader
        self.running[index] = await self.start_one(index)
        return code


class MoveListener:
    """Notices the first event of a call that continues the conversation."""

    def __init__(self) -> None:
        self.resumed = asyncio.Event()

    def on_event(self, response: pb.ConverseResponse) -> None:
        if response.WhichOneof("event") == "session_started" and response.session_started.resumed:
            self.resumed.set()

    def on_end(self) -> None:
        self.resumed.set()


@dataclass
class Figures:
    gap_ms: list[float] = field(default_factory=list)
    audio_again_ms: list[float] = field(default_factory=list)


async def _done(turn: Turn) -> Turn:
    async with asyncio.timeout(TURN_TIMEOUT_S):
        await turn.done.wait()
    return turn


async def one_move(replicas: Replicas, kind: str, session_id: str) -> tuple[Resumed, Turn, int]:
    """A conversation whose replica is stopped (`kind`: drain or crash) at the first reply audio
    of its second turn; the move, that turn, and the replica stopped."""
    listener = MoveListener()
    channel = connect(replicas.target, load_balancing="round_robin")
    conversation = Conversation(
        channel,
        SessionSettings(session_id=session_id),
        microphone=Microphone(realtime=True),  # 20 ms frames, silence between utterances
        timeout_s=TURN_TIMEOUT_S * 3,
        assembler=TurnAssembler(PCM_16K, listener=listener),
    )
    async with channel, conversation:
        await _done(conversation.say(Utterance.spoken(render, "My name is Ada.", PCM_16K)))
        question = conversation.say(Utterance.spoken(render, "What is my name?", PCM_16K))
        async with asyncio.timeout(TURN_TIMEOUT_S):
            await question.first_audio.wait()
        index = replicas.holder(session_id)
        if kind == "drain":
            replicas.running[index].signal(signal.SIGTERM)
        else:
            await asyncio.to_thread(replicas.running[index].kill)
        await _done(question)
        async with asyncio.timeout(TURN_TIMEOUT_S):
            await listener.resumed.wait()
        if question.agent_text != ANSWER or len(conversation.resumptions) != 1:
            raise RuntimeError(
                f"{kind}: answered {question.agent_text!r}, moves {conversation.resumptions},"
                f" ended {conversation.code}: {conversation.details}"
            )
        return conversation.resumptions[0], question, index


def _summary(values: Sequence[float]) -> str:
    if not values:
        return "—"
    ordered = sorted(values)
    return f"{statistics.median(ordered):.0f} / {ordered[int(0.9 * (len(ordered) - 1))]:.0f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=RUNS, help="moves of each kind")
    parser.add_argument("--latency-profile", default="realistic", choices=("instant", "realistic"))
    args = parser.parse_args()
    figures = {"drain": Figures(), "crash": Figures()}
    stages: list[ServiceProcess] = []
    replicas: Replicas | None = None
    with tempfile.TemporaryDirectory() as directory:
        keys = Path(directory) / "resumption-keys"
        keys.write_text(bytes(range(32)).hex() + "\n")
        try:
            for role in ("stt", "llm", "tts"):
                stages.append(
                    await asyncio.to_thread(
                        ServiceProcess,
                        f"{role}_stub",
                        stage_args(0, -1, "--latency-profile", args.latency_profile),
                    )
                )
            await asyncio.gather(*(wait_until_serving(p.target, READY_TIMEOUT_S) for p in stages))
            flags = [f"--{p.module.removesuffix('_stub')}={p.target}" for p in stages]
            replicas = await Replicas([*flags, f"--resumption-keys-file={keys}"]).start()
            for run in range(args.runs):
                for kind, measured in figures.items():
                    moved, question, stopped = await one_move(replicas, kind, f"{kind}-{run}")
                    measured.gap_ms.append(moved.gap_s * 1000)
                    if kind == "crash" and question.first_audio_at and moved.last_audio_at:
                        measured.audio_again_ms.append((question.first_audio_at - moved.last_audio_at) * 1000)
                    await replicas.replace(stopped)
        finally:
            if replicas is not None:
                await asyncio.to_thread(replicas.stop)
            for process in stages:
                await asyncio.to_thread(process.stop)
    print(f"\n{args.runs} moves of each kind, stubs with the {args.latency_profile} latency profile\n")
    print("| move | gap: last reply audio → first event after, median / p90 | until reply audio again |")
    print("|---|---|---|")
    for kind, measured in figures.items():
        print(f"| {kind} | {_summary(measured.gap_ms)} | {_summary(measured.audio_again_ms)} |")


if __name__ == "__main__":
    asyncio.run(main())
