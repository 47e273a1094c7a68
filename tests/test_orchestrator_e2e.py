"""The orchestrator end to end: real STT, LLM and TTS stubs and the orchestrator as child
processes on ephemeral loopback ports. Speech goes in and comes out in the stub audio code, so
every assertion about what was said and heard is exact: transcripts, reply text, and the reply
audio decoded back to text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2

from orchestrator.turn import TTS_DEADLINE_GRACE_S
from stubs import audio_code
from stubs.audio_code import normalize_text
from stubs.replies import STORY, tokenize
from tests.helpers import (
    NOT_SERVING,
    SERVING,
    exchange,
    health_status,
    open_channel,
    read_metric,
    wait_for_log,
    wait_for_metric,
    watch_health,
)
from tests.stack_fixtures import (
    Caller,
    RecordingLlmProxy,
    heard,
    instant_stack,
    processes,
    serving,
)
from voice.v1 import common_pb2, language_model_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.processes import ServiceProcess, free_port
from voicepipe_client import PCM_16K, Conversation, Microphone, SessionSettings, Utterance
from voicepipe_tools.stack import LocalStack

if TYPE_CHECKING:
    from voice.v1.voice_agent_pb2_grpc import VoiceAgentServiceAsyncStub

LINEAR16 = common_pb2.AUDIO_ENCODING_LINEAR16
MULAW = common_pb2.AUDIO_ENCODING_MULAW
USER = language_model_pb2.ROLE_USER
ASSISTANT = language_model_pb2.ROLE_ASSISTANT
OK = grpc.StatusCode.OK

VOICE_AGENT = "voice.v1.VoiceAgentService"
# The stage RPCs a session holds open, by the stage process that serves them.
STAGE_RPCS = {
    "stt": ("voice.v1.SpeechToTextService", "Transcribe"),
    "llm": ("voice.v1.LanguageModelService", "Generate"),
    "tts": ("voice.v1.TextToSpeechService", "Synthesize"),
}


def orchestrator_of(stack: LocalStack) -> ServiceProcess:
    assert stack.orchestrator is not None
    return stack.orchestrator


def seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def audio_seconds(audio: bytes | bytearray, fmt: PcmFormat) -> float:
    return len(audio) / fmt.bytes_per_sample / fmt.sample_rate


def assert_sane_latency(latency: pb.LatencyBreakdown, *, spoken: bool) -> None:
    """Every figure is there and non-negative, orchestrator_added is what is left of TTFA, and
    its parts (the stages' round trips and the orchestrator's processing) add up to it."""
    figures = {
        name: seconds(getattr(latency, name))
        for name in (
            "stt_finalization",
            "llm_time_to_first_token",
            "llm_time_to_first_sentence",
            "tts_time_to_first_audio",
            "time_to_first_audio",
            "orchestrator_added",
            "stt_round_trip",
            "llm_round_trip",
            "tts_round_trip",
            "orchestrator_processing",
        )
    }
    assert all(value >= 0 for value in figures.values()), figures
    assert figures["time_to_first_audio"] > 0, figures
    assert figures["llm_time_to_first_sentence"] >= figures["llm_time_to_first_token"], figures
    # Each stage's round trip is a real exchange over a socket; a text turn has no STT.
    assert figures["llm_round_trip"] > 0 and figures["tts_round_trip"] > 0, figures
    if spoken:
        assert figures["stt_finalization"] > 0 and figures["stt_round_trip"] > 0, figures
    else:
        assert figures["stt_finalization"] == 0 and figures["stt_round_trip"] == 0, figures
    parts = ("stt_round_trip", "llm_round_trip", "tts_round_trip", "orchestrator_processing")
    assert sum(figures[p] for p in parts) == pytest.approx(figures["orchestrator_added"], abs=1e-6), figures
    rest = (
        figures["time_to_first_audio"]
        - figures["stt_finalization"]
        - figures["llm_time_to_first_sentence"]
        - figures["tts_time_to_first_audio"]
    )
    assert figures["orchestrator_added"] == pytest.approx(rest, abs=1e-6), figures


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    """The four services with the instant latency profile, shared by the module's plain tests."""
    async with instant_stack() as local:
        yield local


@dataclass
class PacedStack:
    """A stack whose replies take real time: the TTS speaks in real time and the LLM writes 20
    tokens/s, so a story is still being generated and synthesised seconds after it started.
    The orchestrator reaches the LLM through a proxy that records every GenerateRequest."""

    orchestrator: ServiceProcess
    stages: dict[str, ServiceProcess]
    llm_proxy: RecordingLlmProxy


@pytest.fixture(scope="module")
async def paced() -> AsyncIterator[PacedStack]:
    async with processes() as group:
        stages = {
            "stt": await group.start("stt_stub"),
            "llm": await group.start("llm_stub", "--tokens-per-second", "20"),
            "tts": await group.start("tts_stub", "--realtime-factor", "1"),
        }
        for stage in stages.values():
            await serving(stage)
        async with RecordingLlmProxy(stages["llm"].target) as proxy:
            orchestrator = await group.start_orchestrator(
                stages["stt"].target, proxy.target, stages["tts"].target
            )
            await serving(orchestrator)
            yield PacedStack(orchestrator, stages, proxy)


# --- conversations ------------------------------------------------------------------------------


async def test_a_spoken_conversation_is_heard_answered_and_spoken_back(stack: LocalStack) -> None:
    orchestrator = orchestrator_of(stack)
    script = [
        ("Hello, my name is Ada.", "Nice to meet you, Ada."),
        ("What is 2 plus 3?", "2 plus 3 is 5."),
        ("What is my name?", "Your name is Ada."),
    ]
    async with open_channel(orchestrator.target) as channel:
        caller = await Caller(channel, session_id="e2e-spoken-conversation").open()
        async with caller:
            first = await caller.wait_for(lambda: caller.events, what="the first event")
            assert first[0].session_started.session_id == "e2e-spoken-conversation"
            for number, (said, reply) in enumerate(script, start=1):
                await caller.speak(said)
                turn = await caller.turn_ended(str(number))
                assert turn.completed is not None, f"turn {number} did not complete: {turn}"
                assert turn.user_text == normalize_text(said)
                assert turn.agent_text == reply
                assert turn.completed.agent_text == reply
                assert heard(turn.audio, PCM_16K) == [normalize_text(reply)]
                assert seconds(turn.completed.reply_audio_duration) == pytest.approx(
                    audio_seconds(turn.audio, PCM_16K), abs=1e-6
                )
                assert_sane_latency(turn.completed.latency, spoken=True)
            await caller.end_input()
            assert await caller.ended() == (OK, "")
    assert caller.final_transcripts() == [normalize_text(said) for said, _ in script]
    assert {event.correlation.session_id for event in caller.events} == {"e2e-spoken-conversation"}
    # The turns did not overlap: each started after the previous one completed.
    kinds = [
        e.WhichOneof("event")
        for e in caller.events
        if e.WhichOneof("event") in ("turn_started", "turn_completed")
    ]
    assert kinds == ["turn_started", "turn_completed"] * 3


async def test_a_typed_turn_is_answered_with_text_and_audio(stack: LocalStack) -> None:
    async with open_channel(orchestrator_of(stack).target) as channel:
        client = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False), timeout_s=30)
        async with client:
            turn = await client.type("What is 6 times 7?")
            assert await client.finish() == OK
    assert turn.completed is not None, turn.errors
    assert turn.user_text == "What is 6 times 7?"
    assert turn.agent_text == turn.completed.agent_text == "6 times 7 is 42."
    assert heard(bytes(turn.audio), PCM_16K) == ["6 times 7 is 42."]
    assert_sane_latency(turn.completed.latency, spoken=False)
    assert client.transcripts == []


@pytest.mark.parametrize(
    ("input_format", "output_format"),
    [
        pytest.param(PcmFormat(MULAW, 8_000), PCM_16K, id="mulaw-8k-in"),
        pytest.param(PCM_16K, PcmFormat(LINEAR16, 8_000), id="linear16-8k-out"),
        pytest.param(PCM_16K, PcmFormat(LINEAR16, 48_000), id="linear16-48k-out"),
        pytest.param(PcmFormat(MULAW, 8_000), PcmFormat(MULAW, 8_000), id="mulaw-8k-both"),
    ],
)
async def test_audio_formats_work_end_to_end(
    stack: LocalStack, input_format: PcmFormat, output_format: PcmFormat
) -> None:
    async with open_channel(orchestrator_of(stack).target) as channel:
        caller = Caller(channel, input_format=input_format, output_format=output_format)
        async with await caller.open():
            await caller.speak("What is 12 divided by 4?")
            turn = await caller.turn_ended("1")
            await caller.end_input()
            assert await caller.ended() == (OK, "")
    assert turn.completed is not None, turn.errors
    assert caller.final_transcripts() == ["What is 12 divided by 4?"]
    assert turn.agent_text == "12 divided by 4 is 3."
    assert len(turn.audio) % output_format.bytes_per_sample == 0
    assert heard(turn.audio, output_format) == ["12 divided by 4 is 3."]
    assert seconds(turn.completed.reply_audio_duration) == pytest.approx(
        audio_seconds(turn.audio, output_format), abs=1e-6
    )


async def test_metrics_describe_the_turns(stack: LocalStack) -> None:
    port = orchestrator_of(stack).metrics_port
    before = {
        "completed": await read_metric(port, "voicepipe_turns_total", outcome="completed"),
        "ttfa": await read_metric(port, "voicepipe_ttfa_seconds_count"),
        "added": await read_metric(port, "voicepipe_orchestrator_added_seconds_count"),
        "llm": await read_metric(
            port, "voicepipe_stage_latency_seconds_count", stage="llm", figure="first_sentence"
        ),
        "tts": await read_metric(
            port, "voicepipe_stage_latency_seconds_count", stage="tts", figure="first_audio"
        ),
        "processing": await read_metric(
            port, "voicepipe_orchestrator_added_parts_seconds_count", part="orchestrator_processing"
        ),
    }
    async with open_channel(orchestrator_of(stack).target) as channel:
        caller = await Caller(channel).open()
        async with caller:
            await caller.type("hello")
            turn = await caller.turn_ended("1")
            assert turn.completed is not None, turn.errors
    # Everything is recorded before TurnCompleted leaves.
    assert await read_metric(port, "voicepipe_turns_total", outcome="completed") == before["completed"] + 1
    assert await read_metric(port, "voicepipe_ttfa_seconds_count") == before["ttfa"] + 1
    assert await read_metric(port, "voicepipe_orchestrator_added_seconds_count") == before["added"] + 1
    assert (
        await read_metric(
            port, "voicepipe_orchestrator_added_parts_seconds_count", part="orchestrator_processing"
        )
        == before["processing"] + 1
    )
    assert (
        await read_metric(port, "voicepipe_stage_latency_seconds_count", stage="llm", figure="first_sentence")
        == before["llm"] + 1
    )
    assert (
        await read_metric(port, "voicepipe_stage_latency_seconds_count", stage="tts", figure="first_audio")
        == before["tts"] + 1
    )
    for upstream in ("stt", "llm", "tts"):
        assert (
            await read_metric(port, "voicepipe_upstream_channel_state", upstream=upstream, state="ready") == 1
        )
        assert await read_metric(port, "voicepipe_upstream_serving", upstream=upstream) == 1


# --- barge-in and disconnects -------------------------------------------------------------------


async def test_speech_begun_as_the_reply_starts_goes_on_with_the_sentence_and_gets_one_answer(
    paced: PacedStack,
) -> None:
    """The caller pauses after "My name is" long enough for a turn to start, and goes on as its
    reply's first audio arrives: too soon to be a reaction to it. The turn is withdrawn, and the
    whole sentence gets one answer from a history that never held the first part alone."""
    requests_before = len(paced.llm_proxy.requests)
    async with open_channel(paced.orchestrator.target) as channel:
        conversation = Conversation(
            channel, SessionSettings(), microphone=Microphone(realtime=False), timeout_s=30
        )
        async with conversation:
            cut = conversation.say(Utterance.spoken(audio_code.render, "My name is", PCM_16K))
            rest = Utterance.spoken(audio_code.render, "Ada.", PCM_16K)
            answer = await conversation.barge_in(cut, rest, after_s=0.0)
            assert await conversation.finish() == OK

    assert cut.withdrawn and cut.audio_bytes > 0, cut  # the caller heard its first moment
    assert (answer.user_text, answer.agent_text) == ("My name is Ada.", "Nice to meet you, Ada.")
    assert heard(bytes(answer.audio), PCM_16K) == ["Nice to meet you, Ada."]
    last = paced.llm_proxy.requests[-1]
    assert len(paced.llm_proxy.requests) == requests_before + 2
    assert [(m.role, m.content) for m in last.messages] == [(USER, "My name is Ada.")]


async def test_barge_in_stops_the_reply_and_keeps_only_what_was_heard(paced: PacedStack) -> None:
    requests_before = len(paced.llm_proxy.requests)
    async with open_channel(paced.orchestrator.target) as channel:
        caller = await Caller(channel, session_id="e2e-barge-in").open()
        async with caller:
            await caller.speak("My name is Ada.")
            first = await caller.turn_ended("1")
            assert first.agent_text == "Nice to meet you, Ada."
            await caller.speak("Please tell me a story.")
            # Barge in once a second of the story has been received (the TTS speaks in real
            # time, so the story is far from over).
            await caller.wait_for(
                lambda: caller.audio_received("2") >= PCM_16K.bytes_for(1000), what="1 s of the story"
            )
            await caller.speak("What is my name?")
            story = await caller.turn_ended("2")
            answer = await caller.turn_ended("3", timeout_s=15)
            await caller.end_input()
            assert await caller.ended(timeout_s=15) == (OK, "")

    # The story was interrupted, not completed; the user heard a real part of it, not all.
    assert story.completed is None and story.interrupted is not None, story
    heard_text = story.interrupted.heard_text
    assert heard_text and STORY.startswith(heard_text) and len(heard_text) < len(STORY) / 2, heard_text
    # Generation stopped too: the LLM (20 tokens/s) had not written the whole story.
    assert STORY.startswith(story.agent_text) and len(story.agent_text) < len(STORY), story.agent_text
    # Nothing of turn 2 arrives after its TurnInterrupted (least of all reply audio).
    interrupted_at = next(i for i, e in enumerate(caller.events) if e.HasField("turn_interrupted"))
    assert caller.events[interrupted_at].correlation.turn_id == "2"
    late = [
        e.WhichOneof("event") for e in caller.events[interrupted_at + 1 :] if e.correlation.turn_id == "2"
    ]
    assert late == [], f"events of the interrupted turn after TurnInterrupted: {late}"
    # The received audio decodes to heard_text. Tolerance: heard_text counts the characters
    # whose tone burst was received whole; the audio may end inside the next burst, which then
    # decodes as one more symbol (after a word gap if heard_text ended a word).
    assert audio_seconds(story.audio, PCM_16K) >= 1.0
    [decoded] = heard(story.audio, PCM_16K)
    expected = normalize_text(heard_text)
    assert decoded.startswith(expected), (decoded, heard_text)
    assert len(decoded[len(expected) :].strip()) <= 1, (decoded, heard_text)

    # The barge-in is a turn of its own, answered from a history that is still intact.
    assert answer.user_text == "What is my name?"
    assert answer.completed is not None, answer
    assert answer.agent_text == "Your name is Ada."
    assert heard(answer.audio, PCM_16K) == ["Your name is Ada."]
    assert caller.final_transcripts() == ["My name is Ada.", "Please tell me a story.", "What is my name?"]

    # The LLM was asked with only what the user heard of the story as the assistant's message.
    requests = paced.llm_proxy.requests[requests_before:]
    assert len(requests) == 3
    history = [(m.role, m.content) for m in requests[2].messages]
    assert history == [
        (USER, "My name is Ada."),
        (ASSISTANT, "Nice to meet you, Ada."),
        (USER, "Please tell me a story."),
        (ASSISTANT, heard_text),
        (USER, "What is my name?"),
    ]
    log = await wait_for_log(
        paced.orchestrator,
        lambda e: e.get("event") == "turn interrupted" and e.get("session_id") == "e2e-barge-in",
    )
    assert log["turn"] == "2" and log["heard_chars"] == len(heard_text)
    await wait_for_log(
        paced.stages["llm"],
        lambda e: (
            e.get("event") == "generation cancelled"
            and e.get("session_id") == "e2e-barge-in"
            and e.get("turn_id") == "2"
        ),
    )


async def test_a_client_that_hangs_up_mid_reply_leaves_nothing_running(paced: PacedStack) -> None:
    orchestrator = paced.orchestrator
    port = orchestrator.metrics_port
    # Idle: no session left over from an earlier test, then the idle task count.
    await wait_for_metric(port, "voicepipe_active_sessions", lambda v: v == 0)
    await wait_for_metric(
        port, "voicepipe_rpcs_in_flight", lambda v: v == 0, labels={"grpc_service": VOICE_AGENT}
    )
    idle_tasks = await read_metric(port, "voicepipe_asyncio_tasks")

    async with open_channel(orchestrator.target) as channel:
        caller = await Caller(channel, session_id="e2e-hang-up").open()
        async with caller:
            await caller.speak("Please tell me a story.")
            await caller.wait_for(lambda: caller.audio_received("1"), what="the first reply audio")
            # Mid-turn: every stage call of the session is open (the LLM is still writing).
            for name, (service, method) in STAGE_RPCS.items():
                await wait_for_metric(
                    paced.stages[name].metrics_port,
                    "voicepipe_rpcs_in_flight",
                    lambda v: v >= 1,
                    labels={"grpc_service": service, "grpc_method": method},
                )
            assert await read_metric(port, "voicepipe_active_sessions") == 1
        # Leaving the block cancelled the call while the story was streaming.

    await wait_for_metric(port, "voicepipe_active_sessions", lambda v: v == 0)
    await wait_for_metric(
        port, "voicepipe_rpcs_in_flight", lambda v: v == 0, labels={"grpc_service": VOICE_AGENT}
    )
    for name, (service, method) in STAGE_RPCS.items():
        await wait_for_metric(
            port, "voicepipe_upstream_calls_in_flight", lambda v: v == 0, labels={"upstream": name}
        )
        await wait_for_metric(
            paced.stages[name].metrics_port,
            "voicepipe_rpcs_in_flight",
            lambda v: v == 0,
            labels={"grpc_service": service, "grpc_method": method},
        )
    await wait_for_metric(port, "voicepipe_asyncio_tasks", lambda v: v <= idle_tasks)
    # The stages stopped their work early rather than finishing it for nobody.
    await wait_for_log(
        paced.stages["llm"],
        lambda e: e.get("event") == "generation cancelled" and e.get("session_id") == "e2e-hang-up",
    )
    await wait_for_log(
        paced.stages["tts"],
        lambda e: e.get("event") == "synthesis cancelled" and e.get("session_id") == "e2e-hang-up",
    )


# --- limits -------------------------------------------------------------------------------------


async def test_sessions_over_the_limit_are_refused_until_one_ends() -> None:
    async with instant_stack(orchestrator_flags=["--max-sessions", "2"]) as limited:
        orchestrator = orchestrator_of(limited)
        async with open_channel(orchestrator.target) as channel:
            stub: VoiceAgentServiceAsyncStub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
            first = await Caller(channel, session_id="first").open()
            second = await Caller(channel, session_id="second").open()
            async with first, second:
                await first.wait_for(lambda: first.of_kind("session_started"), what="session_started")
                await second.wait_for(lambda: second.of_kind("session_started"), what="session_started")

                # Refused before the server reads anything, so the call sends nothing.
                refused = await exchange(stub.Converse, [], half_close=False)
                assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "session limit of 2" in refused.details, refused.details
                assert refused.responses == []
                assert (
                    await read_metric(
                        orchestrator.metrics_port, "voicepipe_sessions_rejected_total", reason="session_limit"
                    )
                    == 1
                )

                await first.end_input()
                assert await first.ended() == (OK, "")
                await wait_for_metric(
                    orchestrator.metrics_port, "voicepipe_active_sessions", lambda v: v == 1
                )

                third = await Caller(channel, session_id="third").open()
                async with third:
                    await third.type("hello")
                    turn = await third.turn_ended("1")
                    assert turn.agent_text == "Hello! How can I help you today?"
                    await third.end_input()
                    assert await third.ended() == (OK, "")


# A client that does not read still takes data into its HTTP/2 windows, and gRPC grows them
# (BDP probing) far beyond 64 KiB; a stuck client is one whose windows are full. The slow-client
# tests shrink the client's windows (no BDP probing, 1 KiB read-ahead) so they fill at once.
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


@asynccontextmanager
async def stalled_session(session_id: str) -> AsyncIterator[tuple[ServiceProcess, Caller]]:
    """A session whose client asked for a story and never read a byte of it, after the server
    has given up on the client (windows full, 20 events queued, then 1 s more)."""
    flags = ["--max-output-events", "20", "--slow-client-timeout", "1"]
    async with instant_stack(orchestrator_flags=flags) as limited:
        orchestrator = orchestrator_of(limited)
        tts_calls = {"upstream": "tts"}
        async with grpc.aio.insecure_channel(orchestrator.target, options=SMALL_WINDOWS) as channel:
            caller = await Caller(channel, session_id=session_id).open(read=False)
            async with caller:
                await caller.type("Please tell me a story.")
                # The story's Synthesize call stays open while its ~20 s of audio are paced out to the
                # client in real time...
                await wait_for_metric(
                    orchestrator.metrics_port,
                    "voicepipe_upstream_calls_in_flight",
                    lambda v: v == 1,
                    labels=tts_calls,
                )
                # ...unless the turn is abandoned because the client does not read.
                await wait_for_metric(
                    orchestrator.metrics_port,
                    "voicepipe_upstream_calls_in_flight",
                    lambda v: v == 0,
                    labels=tts_calls,
                )
                yield orchestrator, caller


async def assert_session_cleaned_up(
    orchestrator: ServiceProcess, timeout_s: float = 10.0, *, converse_may_stay_open: bool = False
) -> None:
    port = orchestrator.metrics_port
    await wait_for_metric(port, "voicepipe_active_sessions", lambda v: v == 0, timeout_s=timeout_s)
    if not converse_may_stay_open:
        await wait_for_metric(
            port,
            "voicepipe_rpcs_in_flight",
            lambda v: v == 0,
            labels={"grpc_service": VOICE_AGENT},
            timeout_s=timeout_s,
        )
    for name in STAGE_RPCS:
        await wait_for_metric(
            port,
            "voicepipe_upstream_calls_in_flight",
            lambda v: v == 0,
            labels={"upstream": name},
            timeout_s=timeout_s,
        )


async def test_a_client_that_stops_reading_gets_resource_exhausted() -> None:
    async with stalled_session("e2e-slow-client") as (orchestrator, caller):
        # Reading now drains what was sent before the server gave up, then the status.
        caller.start_reading()
        code, details = await caller.ended()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert details == "client is not reading: 20 events waited more than 1 s"
        assert caller.events[0].session_started.session_id == "e2e-slow-client"
        await assert_session_cleaned_up(orchestrator)
        await wait_for_log(
            orchestrator,
            lambda e: e.get("event") == "session failed" and e.get("session_id") == "e2e-slow-client",
        )


async def test_a_client_that_never_reads_is_cleaned_up_without_reading() -> None:
    async with stalled_session("e2e-stuck-client") as (orchestrator, _caller):
        # The server gave up on the client: the session holds no slot and no upstream call. (The
        # Converse call itself stays open until the client reads, cancels or hits its deadline, or
        # the connection reaches --max-connection-age: grpc cannot send a status into a full window.)
        await assert_session_cleaned_up(orchestrator, timeout_s=3.0, converse_may_stay_open=True)


# --- bad input ----------------------------------------------------------------------------------


def _config(
    input_format: common_pb2.AudioFormat | None = None, output_format: common_pb2.AudioFormat | None = None
) -> pb.ConverseRequest:
    return pb.ConverseRequest(
        config=pb.SessionConfig(
            input_audio_format=input_format or PCM_16K.to_proto(),
            output_audio_format=output_format or PCM_16K.to_proto(),
        )
    )


def _audio(size: int) -> pb.ConverseRequest:
    return pb.ConverseRequest(audio=b"\x00" * size)


def _text(text: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(text=pb.TextTurn(text=text))


BAD_INPUT = [
    pytest.param([_audio(640)], "the first message must be config, got audio", id="audio-before-config"),
    pytest.param([_text("hello")], "the first message must be config, got text", id="text-before-config"),
    pytest.param(
        [pb.ConverseRequest()], "the first message must be config, got an empty request", id="empty-first"
    ),
    pytest.param(
        [_config(common_pb2.AudioFormat(sample_rate_hertz=16_000))],
        "config.input_audio_format.encoding AUDIO_ENCODING_UNSPECIFIED is not supported",
        id="unspecified-encoding",
    ),
    pytest.param(
        [_config(common_pb2.AudioFormat(encoding=7, sample_rate_hertz=16_000))],  # type: ignore[arg-type]
        "config.input_audio_format.encoding 7 is not supported",
        id="unknown-encoding",
    ),
    pytest.param(
        [_config(common_pb2.AudioFormat(encoding=LINEAR16, sample_rate_hertz=4_000))],
        "config.input_audio_format.sample_rate_hertz 4000 is out of range",
        id="rate-4000",
    ),
    pytest.param(
        [_config(common_pb2.AudioFormat(encoding=LINEAR16, sample_rate_hertz=16_000, channel_count=2))],
        "config.input_audio_format.channel_count 2 is not supported",
        id="stereo",
    ),
    pytest.param(
        [_config(output_format=common_pb2.AudioFormat(encoding=LINEAR16, sample_rate_hertz=96_000))],
        "config.output_audio_format.sample_rate_hertz 96000 is out of range",
        id="output-rate-96000",
    ),
    pytest.param(
        [
            pb.ConverseRequest(
                config=pb.SessionConfig(input_audio_format=PCM_16K.to_proto(), session_id="x" * 129)
            )
        ],
        "config.session_id is longer than 128 characters",
        id="long-session-id",
    ),
    pytest.param([_config(), _audio(641)], "641 bytes is not a whole number", id="odd-bytes"),
    pytest.param(
        [_config(), _audio(64_002)], "64002 bytes exceeds the limit of 64000 bytes", id="oversized-audio"
    ),
    pytest.param([_config(), pb.ConverseRequest(audio=b"")], "audio message is empty", id="empty-audio"),
    pytest.param([_config(), pb.ConverseRequest()], "empty request", id="empty-request"),
    pytest.param([_config(), _config()], "config may be sent only once", id="second-config"),
    pytest.param([_config(), _text("")], "text turn must be 1 to 4096 characters, got 0", id="empty-text"),
    pytest.param([_config(), _text("a" * 4097)], "text turn must be 1 to 4096 characters", id="long-text"),
    pytest.param(
        [_config(), pb.ConverseRequest(control=pb.ControlMessage())],
        "control.type 0 is not supported",
        id="unspecified-control",
    ),
    pytest.param(
        [_config(), pb.ConverseRequest(control=pb.ControlMessage(type=9))],  # type: ignore[arg-type]
        "control.type 9 is not supported; use END_OF_INPUT or BARGE_IN",
        id="unknown-control",
    ),
]


@pytest.mark.parametrize(("requests", "problem"), BAD_INPUT)
async def test_bad_input_is_refused_with_a_clear_message(
    stack: LocalStack, requests: list[pb.ConverseRequest], problem: str
) -> None:
    orchestrator = orchestrator_of(stack)
    async with open_channel(orchestrator.target) as channel:
        stub: VoiceAgentServiceAsyncStub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        # The last request is the bad one: no write can race the server's answer.
        outcome = await exchange(stub.Converse, requests, half_close=False)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    assert problem in outcome.details
    await wait_for_metric(orchestrator.metrics_port, "voicepipe_active_sessions", lambda v: v == 0)


# --- health -------------------------------------------------------------------------------------


async def test_health_follows_the_upstreams() -> None:
    async with processes() as group:
        stt = await group.start("stt_stub")
        tts = await group.start("tts_stub")
        llm_port = free_port()  # nothing listens here yet
        orchestrator = await group.start_orchestrator(stt.target, f"127.0.0.1:{llm_port}", tts.target)
        port = orchestrator.metrics_port
        for upstream in ("stt", "tts"):
            await wait_for_metric(
                port, "voicepipe_upstream_serving", lambda v: v == 1, labels={"upstream": upstream}
            )
        async with open_channel(orchestrator.target) as channel:
            assert await health_status(channel, "") == NOT_SERVING
            assert await health_status(channel, VOICE_AGENT) == NOT_SERVING
            watch = watch_health(channel, "")
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == NOT_SERVING

            await group.start("llm_stub", port=llm_port)
            update = await watch.read()
            assert isinstance(update, health_pb2.HealthCheckResponse) and update.status == SERVING
            watch.cancel()
            assert await health_status(channel, VOICE_AGENT) == SERVING

            # And the conversation works through the late stage.
            caller = await Caller(channel).open()
            async with caller:
                await caller.type("What is 2 plus 3?")
                turn = await caller.turn_ended("1")
        assert turn.agent_text == "2 plus 3 is 5."


async def test_the_last_sentence_is_spoken_when_generation_completes_not_when_the_call_ends() -> None:
    """The reply's last sentence has no whitespace after it, so only GenerationComplete says it
    is finished. Here the LLM sends its 5 tokens and GenerationComplete, then holds the call open:
    the caller still hears the whole reply, and the turn then fails on the LLM's deadline."""
    llm_flags = ["--fault-stall-after", "6", "--fault-calls", "1"]
    async with (
        instant_stack(stage_flags={"llm": llm_flags}, orchestrator_flags=["--turn-timeout", "1.5"]) as stack,
        open_channel(orchestrator_of(stack).target) as channel,
    ):
        client = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False), timeout_s=30)
        async with client:
            turn = await client.type("What is 6 times 7?")
            assert await client.finish() == OK
    assert turn.agent_text == "6 times 7 is 42."
    assert heard(bytes(turn.audio), PCM_16K) == ["6 times 7 is 42."]
    assert [(e.stage, e.code) for e in turn.errors] == [(pb.STAGE_LLM, "DEADLINE_EXCEEDED")]


async def test_a_reply_longer_to_say_than_the_turn_timeout_is_spoken_whole() -> None:
    """The Synthesize call is read at playback pace, so a long reply outlives the turn's budget;
    the time its audio takes to play is not counted against it."""
    async with (
        instant_stack(orchestrator_flags=["--turn-timeout", "1.0"]) as stack,
        open_channel(orchestrator_of(stack).target) as channel,
    ):
        client = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False), timeout_s=60)
        async with client:
            turn = await client.type("Tell me a story.")
            assert await client.finish() == OK
    assert turn.errors == []
    assert turn.agent_text == STORY
    assert heard(bytes(turn.audio), PCM_16K) == [normalize_text(STORY)]
    assert len(turn.audio) / PCM_16K.bytes_for(1000) > 3 * (1.0 + TTS_DEADLINE_GRACE_S)


async def test_a_spoken_reply_stops_at_the_reply_token_cap() -> None:
    async with (
        instant_stack(orchestrator_flags=["--reply-max-tokens", "6"]) as stack,
        open_channel(orchestrator_of(stack).target) as channel,
    ):
        client = Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False), timeout_s=30)
        async with client:
            turn = await client.type("Tell me a story.")
            assert await client.finish() == OK
    capped = "".join(tokenize(STORY)[:6])
    assert turn.errors == []
    assert turn.agent_text == capped
    assert heard(bytes(turn.audio), PCM_16K) == [normalize_text(capped)]
