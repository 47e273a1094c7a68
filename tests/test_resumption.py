"""Conversations that outlive their orchestrator: two orchestrators on loopback share one set of
stages and one ticket key, and the client library reaches both (`ipv4:` list, round_robin).
Whichever of them holds the conversation is drained (SIGTERM), killed (SIGKILL) between turns or
in the middle of one, or both are restarted one after the other; the conversation goes on with
the other, every turn answered once and exactly, the history intact ("What is my name?"). Every
kind of bad ticket gets its status and nothing of the conversation it names."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from bench.resumption import EXIT_TIMEOUT_S, Replicas
from orchestrator import auth
from orchestrator.tickets import MAX_TICKET_BYTES, Tickets
from stubs.audio_code import normalize_text
from tests.helpers import exchange
from tests.stack_fixtures import EVENT_TIMEOUT_S, Caller, heard, processes, serving
from voice.v1 import resumption_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.processes import ServiceProcess
from voicepipe_client import PCM_16K, SessionSettings, Turn, connect
from voicepipe_client.conversation import CROSSED_WRITE, MAX_RESEND_S, SentAudio

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

# What the LLM stub answers (stubs/replies.py), given the history.
REPLIES = {
    "My name is Ada.": "Nice to meet you, Ada.",
    "Remember the blue door.": "OK, I will remember the blue door.",
    "Hello there.": "Hello! How can I help you today?",
    "What is my name?": "Your name is Ada.",
    "What did I ask you to remember?": "You asked me to remember the blue door.",
    "What is 6 times 7?": "6 times 7 is 42.",
    "Fine weather today.": "You said: Fine weather today.",
}


@dataclass(frozen=True)
class Stages:
    flags: tuple[str, ...]  # the orchestrator's --stt/--llm/--tts
    keys_file: Path
    key: bytes


@pytest.fixture(scope="module")
async def stages(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stages]:
    """The three stubs (instant), shared by every orchestrator of the module, and the key file."""
    key = bytes(range(32))
    keys_file = tmp_path_factory.mktemp("keys") / "resumption-keys"
    keys_file.write_text(f"# the replicas' shared key\n{key.hex()}\n")
    async with processes() as group:
        started = {
            role: await group.start(f"{role}_stub", "--latency-profile", "instant")
            for role in ("stt", "llm", "tts")
        }
        await asyncio.gather(*(serving(process) for process in started.values()))
        yield Stages(tuple(f"--{role}={p.target}" for role, p in started.items()), keys_file, key)


@pytest.fixture
async def replicas(stages: Stages) -> AsyncIterator[Replicas]:
    pair = Replicas([*stages.flags, f"--resumption-keys-file={stages.keys_file}", "--shutdown-grace=5"])
    try:
        yield await pair.start()
    finally:
        await asyncio.to_thread(pair.stop)


@pytest.fixture
async def caller(replicas: Replicas, request: pytest.FixtureRequest) -> AsyncIterator[Caller]:
    channel = connect(replicas.target, load_balancing="round_robin")
    async with channel, Caller(channel, session_id=request.node.name[:64]) as client:
        await client.open()
        yield client


async def done(caller: Caller, turn: Turn) -> Turn:
    """`turn` once it has ended (failing with what the caller saw if it does not)."""
    return await caller.wait_for(lambda: turn if turn.done.is_set() else None, what=f"end of {turn}")


async def say(caller: Caller, text: str) -> Turn:
    return await done(caller, await caller.speak(text))


def assert_answered(turns: list[Turn], said: list[str]) -> None:
    """Each utterance started one turn, in order and numbered on, completed with the right
    reply, and the reply audio the caller kept says exactly that."""
    assert [(t.turn_id, t.user_text) for t in turns] == [(str(i), s) for i, s in enumerate(said, 1)]
    for turn, text in zip(turns, said, strict=True):
        assert turn.completed is not None, (turn.turn_id, turn.outcome, turn.errors)
        assert turn.agent_text == REPLIES[text]
        assert normalize_text(" ".join(heard(turn.audio, PCM_16K))) == normalize_text(REPLIES[text])


async def test_sigterm_moves_the_conversation_to_the_other_orchestrator(
    replicas: Replicas, caller: Caller
) -> None:
    await say(caller, "My name is Ada.")
    holder = replicas.holder(caller.conversation.settings.session_id)
    second = await caller.speak("Remember the blue door.")
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        await second.first_audio.wait()
    replicas.running[holder].signal(signal.SIGTERM)  # the turn plays to its end, then the call moves
    await done(caller, second)
    await say(caller, "What is my name?")
    assert await asyncio.to_thread(replicas.running[holder].wait, EXIT_TIMEOUT_S) == 0
    assert replicas.holder(caller.conversation.settings.session_id) == 1 - holder
    assert_answered(
        caller.conversation.turns, ["My name is Ada.", "Remember the blue door.", "What is my name?"]
    )
    [moved] = caller.conversation.resumptions
    assert moved.code == UNAVAILABLE and "resumption ticket" in moved.details
    assert len(caller.of_kind("draining")) == 1  # the drained replica said so before ending the call
    # The drained replica finished that turn: nothing was heard twice or redone.
    assert caller.final_transcripts() == ["My name is Ada.", "Remember the blue door.", "What is my name?"]
    await caller.end_input()
    assert (await caller.ended())[0] == grpc.StatusCode.OK


async def test_kill_between_turns_loses_nothing(replicas: Replicas, caller: Caller) -> None:
    await say(caller, "My name is Ada.")
    await caller.wait_for(
        lambda: caller.conversation.ticket and caller.conversation.ticket.turns == 1, what="ticket"
    )
    holder = replicas.holder(caller.conversation.settings.session_id)
    await asyncio.to_thread(replicas.running[holder].kill)
    await say(caller, "What is my name?")
    assert_answered(caller.conversation.turns, ["My name is Ada.", "What is my name?"])
    [moved] = caller.conversation.resumptions
    # The call went away: UNAVAILABLE, or grpc.aio's report of a write that crossed its end.
    assert moved.code == UNAVAILABLE or (moved.code, moved.details) == CROSSED_WRITE, moved
    assert replicas.holder(caller.conversation.settings.session_id) == 1 - holder


async def test_kill_mid_turn_redoes_the_turn_from_the_replayed_audio(
    replicas: Replicas, caller: Caller
) -> None:
    """The ticket covers the turns that ended; the client resends the audio after them, so the
    other replica hears the question again and answers it from the start."""
    await say(caller, "My name is Ada.")
    holder = replicas.holder(caller.conversation.settings.session_id)
    question = await caller.speak("What is my name?")
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        await question.first_audio.wait()
    assert question.turn_id == "2" and question.completed is None
    await asyncio.to_thread(replicas.running[holder].kill)
    await done(caller, question)
    await say(caller, "Remember the blue door.")
    assert_answered(
        caller.conversation.turns, ["My name is Ada.", "What is my name?", "Remember the blue door."]
    )
    assert len(caller.conversation.resumptions) == 1
    assert caller.final_transcripts().count("What is my name?") == 2  # heard on both replicas
    assert caller.conversation.transcripts.count("What is my name?") == 1  # the conversation's view


async def test_kill_mid_typed_turn_sends_the_text_again(replicas: Replicas, caller: Caller) -> None:
    first = await done(caller, await caller.type("My name is Ada."))
    holder = replicas.holder(caller.conversation.settings.session_id)
    question = await caller.type("What is my name?")
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        await question.first_audio.wait()
    await asyncio.to_thread(replicas.running[holder].kill)
    await done(caller, question)
    assert [first, question] == caller.conversation.turns, caller.summary()
    assert_answered(caller.conversation.turns, ["My name is Ada.", "What is my name?"])


async def test_rolling_restart_of_both_during_ten_turns(replicas: Replicas, caller: Caller) -> None:
    said = [
        "My name is Ada.",
        "Remember the blue door.",
        "Hello there.",
        "What is 6 times 7?",
        "What is my name?",
        "Fine weather today.",
        "What did I ask you to remember?",
        "Hello there.",
        "What is 6 times 7?",
        "What is my name?",
    ]
    for number, text in enumerate(said):
        if number in (3, 6):  # replica 0, then replica 1, between turns
            assert await replicas.restart(number // 3 - 1) == 0
        await say(caller, text)
    assert_answered(caller.conversation.turns, said)
    assert 1 <= len(caller.conversation.resumptions) <= 2
    assert all(moved.code == UNAVAILABLE for moved in caller.conversation.resumptions)


# --- bad tickets ----------------------------------------------------------------------------------


@dataclass
class Guarded:
    """One orchestrator with tenants and the ticket key, and a ticket of tenant acme's."""

    orchestrator: ServiceProcess
    tokens: dict[str, str]
    ticket: pb.ResumptionTicket
    key: bytes


@pytest.fixture(scope="module")
async def guarded(stages: Stages, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Guarded]:
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.json"
    tokens = {name: auth.issue(tenants, name, None) for name in ("acme", "globex")}
    async with processes() as group:
        orchestrator = await serving(
            await group.start(
                "orchestrator",
                *stages.flags,
                f"--resumption-keys-file={stages.keys_file}",
                f"--tokens-file={tenants}",
            )
        )
        channel = connect(orchestrator.target, token=tokens["acme"])
        async with channel, Caller(channel) as client:
            await client.open()
            await say(client, "My name is Ada.")
            ticket = await client.wait_for(
                lambda: client.conversation.ticket if client.conversation.ticket.turns == 1 else None,  # type: ignore[union-attr]
                what="the ticket of turn 1",
            )
        yield Guarded(orchestrator, tokens, ticket, stages.key)


async def resume_with(target: str, token: str, ticket: bytes) -> tuple[grpc.StatusCode, str, int]:
    """How a call that presents `ticket` ends, and how many events it got before."""
    async with connect(target, token=token) as channel:
        stub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        config = SessionSettings(resumption_ticket=ticket).config()
        outcome = await exchange(stub.Converse, [config], half_close=False)
    return outcome.code, outcome.details, len(outcome.responses)


def state_of(guarded: Guarded) -> resumption_pb2.ResumptionState:
    """What acme's ticket says (readable: tickets are signed, not encrypted)."""
    return resumption_pb2.ResumptionState.FromString(guarded.ticket.ticket[33:])


def tampered(guarded: Guarded) -> bytes:
    """acme's ticket with the reply it remembers changed (its signature kept)."""
    state = state_of(guarded)
    state.history[-1].content = "Nice to meet you, Mallory."
    return guarded.ticket.ticket[:33] + state.SerializeToString()


def signed(guarded: Guarded, key: bytes, ttl_s: float) -> bytes:
    """acme's ticket signed again with `key`, expiring `ttl_s` from now."""
    ticket = Tickets((key,), ttl_s).issue(state_of(guarded))
    assert ticket is not None
    return ticket.ticket


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (tampered, "signature does not verify"),
        (lambda guarded: signed(guarded, bytes(32), 600), "signature does not verify"),
        (lambda guarded: signed(guarded, guarded.key, -1), "expired at"),
    ],
    ids=["tampered", "forged", "expired"],
)
async def test_a_ticket_not_ours_or_expired_is_refused(
    guarded: Guarded, make: Callable[[Guarded], bytes], says: str
) -> None:
    code, details, events = await resume_with(
        guarded.orchestrator.target, guarded.tokens["acme"], make(guarded)
    )
    assert (code, events) == (PERMISSION_DENIED, 0)
    assert says in details


async def test_another_tenants_ticket_is_refused(guarded: Guarded) -> None:
    code, details, events = await resume_with(
        guarded.orchestrator.target, guarded.tokens["globex"], guarded.ticket.ticket
    )
    assert (code, events) == (PERMISSION_DENIED, 0)
    assert details == "the resumption ticket belongs to another tenant"


@pytest.mark.parametrize(
    ("ticket", "says"),
    [
        (b"\x02" + bytes(40), "not a resumption ticket"),
        (b"\x01" + bytes(MAX_TICKET_BYTES), f"1 to {MAX_TICKET_BYTES} bytes"),
    ],
    ids=["not-a-ticket", "oversized"],
)
async def test_a_malformed_ticket_is_invalid(guarded: Guarded, ticket: bytes, says: str) -> None:
    code, details, events = await resume_with(guarded.orchestrator.target, guarded.tokens["acme"], ticket)
    assert (code, events) == (INVALID_ARGUMENT, 0)
    assert says in details


async def test_a_ticket_of_a_conversation_still_open_takes_it_over(guarded: Guarded) -> None:
    """The documented choice: the newer call wins, the older one ends with ABORTED."""
    channel = connect(guarded.orchestrator.target, token=guarded.tokens["acme"])
    async with channel, Caller(channel, session_id="open-twice") as first:
        await first.open()
        await say(first, "My name is Ada.")
        ticket = await first.wait_for(
            lambda: first.conversation.ticket if first.conversation.ticket.turns == 1 else None,  # type: ignore[union-attr]
            what="the ticket of turn 1",
        )
        async with Caller(channel, resumption_ticket=ticket.ticket) as second:
            await second.open()
            code, details = await first.ended()
            assert code == grpc.StatusCode.ABORTED and "resumed on another call" in details
            started = await second.wait_for(lambda: second.of_kind("session_started"), what="session_started")
            assert started[0].session_started == pb.SessionStarted(
                session_id="open-twice", resumed=True, turns_before=1
            )
            answer = await say(second, "What is my name?")
            assert (answer.turn_id, answer.agent_text) == ("2", "Your name is Ada.")


async def test_a_server_without_a_key_does_not_resume(stages: Stages, guarded: Guarded) -> None:
    async with processes() as group:
        keyless = await serving(await group.start("orchestrator", *stages.flags))
        code, details, _ = await resume_with(keyless.target, "", guarded.ticket.ticket)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--resumption-keys-file" in details


# --- what the client keeps to send again ----------------------------------------------------------


def test_the_audio_sent_again_starts_exactly_at_the_tickets_offset() -> None:
    kept = SentAudio(PCM_16K)
    frames = [bytes([n]) * 640 for n in range(5)]  # 20 ms each: 320 samples
    for frame in frames:
        kept.add(frame)
    kept.forget_before(320)  # a ticket covers the first frame
    assert kept.since(400) == [b"".join(frames)[800:]]  # from sample 400, mid-frame, as one message


def test_at_most_a_minute_of_uncovered_audio_is_kept() -> None:
    kept = SentAudio(PCM_16K)
    for _ in range(int(MAX_RESEND_S / 0.02) + 50):
        kept.add(bytes(640))
    again = kept.since(0)
    assert len(b"".join(again)) == MAX_RESEND_S * 16_000 * 2
    assert max(len(message) for message in again) == PCM_16K.max_message_bytes  # the contract's limit
