"""The images and the compose stacks, run for real on a Docker engine (started here when none
runs): `make images` once, then the stub stack with its stages as replicas
(`--scale stt=3 --scale llm=2 --scale tts=2`), spoken to through the orchestrator's published
loopback port: a health-gated start, exact conversations, calls spread over the replicas, a
`docker-compose restart stt` and replicas killed mid-utterance, mid-reply and before the first
token, the gateway's page and a typed turn through its WebSocket, and a `down` that leaves
nothing behind; then the real stack answering a recording and the TLS stack refusing a client
without a certificate (and the gateway reaching the orchestrator over mutual TLS)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import jiwer
import numpy as np
import pytest
import yaml

from stubs import audio_code
from stubs.replies import STORY
from tests.docker_engine import (
    POLL_INTERVAL_S,
    ComposeStack,
    build_images,
    docker_engine,
    docker_time,
    inspect,
    kill_replica_serving,
    log_events,
    require,
    serving_session,
)
from tests.gateway_fixtures import socket_caller
from tests.helpers import open_channel
from tests.stack_fixtures import Caller, heard
from tests.test_real_stack import whisper_words, words
from tests.test_tls import assert_refused
from voicepipe.config import env_var_name
from voicepipe.healthcheck import wait_until_serving
from voicepipe.tls import ChannelTls
from voicepipe.tls import open_channel as open_tls_channel
from voicepipe_client import PCM_16K, Turn, Utterance
from voicepipe_tools.certs import write_local_pki

pytestmark = pytest.mark.timeout(600)

STAGES = ("stt", "llm", "tts")
GATEWAY_PORT = 8000  # in its container
REPLICAS = {"stt": 3, "llm": 2, "tts": 2}
SCALE = [f"{stage}={count}" for stage, count in REPLICAS.items()]
# Which log line tells that a replica took a session's call.
CALL_STARTED = {"stt": "transcription started", "llm": "generation started", "tts": "synthesis started"}
SERVING_TIMEOUT_S = 60.0
TURN_TIMEOUT_S = 30.0
REAL_TURN_TIMEOUT_S = 90.0
SESSIONS_FOR_SPREAD = 12
# The LLM stubs' first token comes this late in the stub stack here, so that a test can kill the
# replica that took a turn before it answers (realistic: 250 ms).
SLOW_FIRST_TOKEN_MS = 1500
RECORDING = Path("/usr/share/pocketsphinx/test/data/goforward.raw")  # "go forward ten meters"


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    with docker_engine():
        build_images()
        yield


@pytest.fixture(scope="module")
def stub_stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    slow_first_token = tmp_path_factory.mktemp("compose") / "slow-first-token.yml"
    slow_first_token.write_text(
        yaml.safe_dump(
            {"services": {"llm": {"environment": {"VOICEPIPE_LLM_FIRST_TOKEN_MS": str(SLOW_FIRST_TOKEN_MS)}}}}
        )
    )
    stack = ComposeStack(["docker-compose.yml", str(slow_first_token)])
    try:
        stack.up(*SCALE)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
async def orchestrator_channel(stub_stack: ComposeStack) -> AsyncIterator[grpc.aio.Channel]:
    target = stub_stack.published("orchestrator", 50051)
    await wait_until_serving(target, SERVING_TIMEOUT_S)
    async with open_channel(target) as channel:
        yield channel


def caller(channel: grpc.aio.Channel) -> Caller:
    return Caller(channel, session_id=f"docker-{uuid.uuid4().hex[:8]}", timeout_s=120)


def ttfa_ms(turn: Turn) -> float:
    """From the end of the caller's speech to the first reply audio."""
    assert turn.speech_ended_at is not None and turn.first_audio_at is not None, turn
    return (turn.first_audio_at - turn.speech_ended_at) * 1000


def halves(whole: Utterance) -> tuple[Utterance, Utterance]:
    """An utterance cut in the middle of its speech."""
    cut = whole.speech_end_frame // 2
    return Utterance(whole.frames[:cut], cut - 1), Utterance(whole.frames[cut:], whole.speech_end_frame - cut)


# --- the stub stack, scaled -------------------------------------------------------------------------


def test_orchestrator_starts_once_every_stage_replica_is_healthy(stub_stack: ComposeStack) -> None:
    orchestrator = inspect(stub_stack.containers("orchestrator")[0])
    started = docker_time(orchestrator["State"]["StartedAt"])
    for stage, count in REPLICAS.items():
        replicas = stub_stack.containers(stage)
        assert len(replicas) == count, f"{stage}: {len(replicas)} replicas"
        for replica in replicas:
            checks = inspect(replica)["State"]["Health"]["Log"]
            passed = [docker_time(check["End"]) for check in checks if check["ExitCode"] == 0]
            assert passed and min(passed) <= started, f"{stage} {replica[:12]} was not healthy first"
    # The gateway, once the orchestrator is.
    checks = orchestrator["State"]["Health"]["Log"]
    gateway = inspect(stub_stack.containers("gateway")[0])
    passed = [docker_time(check["End"]) for check in checks if check["ExitCode"] == 0]
    assert passed and min(passed) <= docker_time(gateway["State"]["StartedAt"])


def test_services_run_with_a_read_only_root_and_no_capabilities(stub_stack: ComposeStack) -> None:
    for service in ("orchestrator", "gateway", *STAGES):
        host_config = inspect(stub_stack.containers(service)[0])["HostConfig"]
        assert host_config["ReadonlyRootfs"] is True, service
        assert host_config["CapDrop"] == ["ALL"], service
        assert not host_config.get("CapAdd"), service


async def test_conversation_is_exact_through_the_containers(orchestrator_channel: grpc.aio.Channel) -> None:
    async with await caller(orchestrator_channel).open() as talk:
        await talk.speak("What is 2 plus 3?")
        first = await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
        await talk.speak("What is 7 divided by 2?")
        second = await talk.turn_ended("2", timeout_s=TURN_TIMEOUT_S)
    assert (first.user_text, first.agent_text) == ("What is 2 plus 3?", "2 plus 3 is 5.")
    assert (second.user_text, second.agent_text) == ("What is 7 divided by 2?", "7 divided by 2 is 3.5.")
    assert heard(first.audio, PCM_16K) == ["2 plus 3 is 5."]
    assert heard(second.audio, PCM_16K) == ["7 divided by 2 is 3.5."]
    # The figure the failovers below are compared with (BENCHMARKS.md).
    print(f"no failover: voice to voice {ttfa_ms(first):.0f} and {ttfa_ms(second):.0f} ms")


async def wait_until_gateway_serves(address: str) -> None:
    """Until the gateway's /healthz answers 200 (its container starts once the orchestrator is
    healthy, and listens a moment later)."""
    async with asyncio.timeout(SERVING_TIMEOUT_S), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://{address}/healthz") as health:
                    if health.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(POLL_INTERVAL_S)


async def typed_turn_through_the_gateway(address: str) -> dict[str, object]:
    """ "What is 2 plus 3?" typed into a WebSocket of the gateway at `address`: its TurnCompleted
    event, after the reply audio has been checked."""
    async with socket_caller(f"ws://{address}/ws") as talk:
        await talk.configure(output_sample_rate=PCM_16K.sample_rate)
        await talk.send({"type": "text", "text": "What is 2 plus 3?"})
        completed = await talk.until("turn_completed", timeout_s=TURN_TIMEOUT_S)
    assert heard(talk.audio, PCM_16K) == ["2 plus 3 is 5."]
    return completed


async def test_gateway_serves_the_page_and_a_typed_turn_through_the_containers(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    address = stub_stack.published("gateway", GATEWAY_PORT)
    await wait_until_gateway_serves(address)
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}/") as page:
        assert page.status == 200 and "<html" in (await page.text()).lower()
    assert (await typed_turn_through_the_gateway(address))["agent_text"] == "2 plus 3 is 5."


async def test_calls_spread_over_every_replica(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    sessions: list[str] = []
    for _ in range(SESSIONS_FOR_SPREAD):
        async with await caller(orchestrator_channel).open() as talk:
            sessions.append(talk.conversation.settings.session_id)
            await talk.speak("What is 2 plus 3?")
            assert (await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)).agent_text == "2 plus 3 is 5."
    for stage, count in REPLICAS.items():
        served = Counter(
            replica
            for replica in stub_stack.containers(stage)
            for event in log_events(replica)
            if event.get("event") == CALL_STARTED[stage] and event.get("session_id") in sessions
        )
        print(f"{stage}: calls per replica {sorted(served.values())} of {SESSIONS_FOR_SPREAD}")
        assert len(served) == count and sum(served.values()) == SESSIONS_FOR_SPREAD, (stage, served)
        # round_robin over every replica: within 20 % of an even share.
        even = SESSIONS_FOR_SPREAD / count
        assert all(abs(n - even) <= 0.2 * even for n in served.values()), (stage, served)


async def test_session_survives_a_restart_of_the_stt_service(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    async with await caller(orchestrator_channel).open() as talk:
        await talk.speak("What is 2 plus 3?")
        assert (await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)).agent_text == "2 plus 3 is 5."
        await asyncio.to_thread(stub_stack.compose, "restart", "stt")
        await talk.speak("What is 7 divided by 2?")
        second = await talk.turn_ended("2", timeout_s=TURN_TIMEOUT_S)
    assert (second.user_text, second.agent_text) == ("What is 7 divided by 2?", "7 divided by 2 is 3.5.")
    assert heard(second.audio, PCM_16K) == ["7 divided by 2 is 3.5."]


async def kill_replica(replicas: list[str], stage: str, session: str) -> list[str]:
    """Kills the one of the stage's `replicas` (listed before the call, as listing takes a while)
    that serves the session; returns what it had logged for the session."""
    return await asyncio.to_thread(
        kill_replica_serving, replicas, CALL_STARTED[stage], session, TURN_TIMEOUT_S
    )


async def restore_replicas(stack: ComposeStack, stage: str) -> None:
    """Back to REPLICAS[stage] running replicas (a killed container stays stopped until then)."""
    await asyncio.to_thread(
        stack.compose,
        "up",
        "--detach",
        "--no-build",
        "--no-recreate",
        *(a for s in SCALE for a in ("--scale", s)),
    )
    assert len(stack.containers(stage)) == REPLICAS[stage]


async def test_stt_replica_killed_mid_utterance(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    """The STT link resumes on another replica and replays: the transcript stays exact."""
    before, after = halves(
        Utterance.spoken(audio_code.render, "Please repeat after me: forty two apples.", PCM_16K)
    )
    async with await caller(orchestrator_channel).open() as talk:
        await talk.speak("What is 2 plus 3?")
        assert (await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)).agent_text == "2 plus 3 is 5."
        session = talk.conversation.settings.session_id
        await talk.conversation.play(before).sent.wait()
        await kill_replica(stub_stack.containers("stt"), "stt", session)
        await talk.conversation.speak(after)
        turn = await talk.turn_ended("2", timeout_s=TURN_TIMEOUT_S)
    assert talk.final_transcripts() == ["What is 2 plus 3?", "Please repeat after me: forty two apples."]
    assert turn.completed is not None, turn
    print(f"STT replica killed mid-utterance: voice to voice {ttfa_ms(turn):.0f} ms")
    await restore_replicas(stub_stack, "stt")


async def test_tts_replica_killed_mid_reply(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    """The reply completes from another replica, and each word is heard once."""
    async with await caller(orchestrator_channel).open() as talk:
        session = talk.conversation.settings.session_id
        await talk.speak("Please tell me a story.")
        await talk.wait_for(lambda: talk.audio_received("1") >= PCM_16K.bytes_for(500), what="reply audio")
        await kill_replica(stub_stack.containers("tts"), "tts", session)
        story = await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
    assert story.completed is not None and story.agent_text == STORY, story
    assert " ".join(heard(story.audio, PCM_16K)).split() == STORY.split()
    print(f"TTS replica killed mid-reply: the caller heard a gap of {story.max_late_s * 1000:.0f} ms")
    await restore_replicas(stub_stack, "tts")


async def test_llm_replica_killed_before_its_first_token(
    stub_stack: ComposeStack, orchestrator_channel: grpc.aio.Channel
) -> None:
    async with await caller(orchestrator_channel).open() as talk:
        session = talk.conversation.settings.session_id
        replicas = stub_stack.containers("llm")
        await talk.speak("What is 2 plus 3?")
        killed = await kill_replica(replicas, "llm", session)
        turn = await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
    assert "generated" not in killed, killed
    assert turn.agent_text == "2 plus 3 is 5." and heard(turn.audio, PCM_16K) == ["2 plus 3 is 5."]
    print(f"LLM replica killed before its first token: voice to voice {ttfa_ms(turn):.0f} ms")
    await restore_replicas(stub_stack, "llm")


def test_down_leaves_no_container_network_or_volume(stub_stack: ComposeStack) -> None:
    assert stub_stack.left_behind()
    stub_stack.down()
    assert stub_stack.left_behind() == []


# --- a replica added later ------------------------------------------------------------------------

# The stages' --max-connection-age here (default 300 s): how soon the orchestrator's connections
# are sent GOAWAY, after which its channel resolves the stage's name again.
SHORT_CONNECTION_AGE_S = 5
PICKUP_TIMEOUT_S = 120.0
MAX_PICKUP_SESSIONS = 100


async def test_a_replica_added_later_gets_calls_once_the_name_is_resolved_again(
    images: None, tmp_path: Path
) -> None:
    """One STT replica, a conversation held open, then `up --scale stt=2 --no-recreate`: new
    sessions reach the new replica once the first one's connection has aged out (GOAWAY, then
    DNS again), and the held conversation's transcripts stay exact throughout."""
    short_age = tmp_path / "short-connection-age.yml"
    short_age.write_text(
        yaml.safe_dump(
            {
                "services": {
                    stage: {
                        "environment": {
                            env_var_name(stage, "--max-connection-age"): str(SHORT_CONNECTION_AGE_S)
                        }
                    }
                    for stage in STAGES
                }
            }
        )
    )
    stack = ComposeStack(["docker-compose.yml", str(short_age)])
    try:
        await asyncio.to_thread(stack.up)
        target = stack.published("orchestrator", 50051)
        await wait_until_serving(target, SERVING_TIMEOUT_S)
        async with open_channel(target) as channel, await caller(channel).open() as held:
            await held.speak("What is 2 plus 3?")
            assert (await held.turn_ended("1", timeout_s=TURN_TIMEOUT_S)).agent_text == "2 plus 3 is 5."
            [first] = stack.containers("stt")
            scaling_at = time.monotonic()
            await asyncio.to_thread(
                stack.compose, "up", "--detach", "--no-build", "--no-recreate", "--scale", "stt=2"
            )
            scaled_at = time.monotonic()
            [added] = [replica for replica in stack.containers("stt") if replica != first]
            # New conversations of one turn each, one after another, until one is heard by the
            # added replica (bounded in count and time).
            for sessions in range(1, MAX_PICKUP_SESSIONS + 1):
                assert time.monotonic() - scaled_at < PICKUP_TIMEOUT_S, (
                    f"{sessions} sessions, none on {added[:12]}"
                )
                async with await caller(channel).open() as talk:
                    session = talk.conversation.settings.session_id
                    await talk.speak("What is 2 plus 3?")
                    assert (
                        await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
                    ).agent_text == "2 plus 3 is 5."
                if await asyncio.to_thread(serving_session, [added], CALL_STARTED["stt"], session):
                    break
            picked_up_s = time.monotonic() - scaled_at
            await held.speak("What is 7 divided by 2?")
            second = await held.turn_ended("2", timeout_s=TURN_TIMEOUT_S)
        assert held.final_transcripts() == ["What is 2 plus 3?", "What is 7 divided by 2?"]
        assert second.agent_text == "7 divided by 2 is 3.5."
        assert heard(second.audio, PCM_16K) == ["7 divided by 2 is 3.5."]
        # The figure BENCHMARKS.md records.
        print(
            f"added STT replica: its first call {picked_up_s:.1f} s after `up --scale` returned"
            f" ({picked_up_s + scaled_at - scaling_at:.1f} s after it began), the new session {sessions}"
            f" since; --max-connection-age {SHORT_CONNECTION_AGE_S} s"
        )
    finally:
        await asyncio.to_thread(stack.down)


# --- the TLS stack --------------------------------------------------------------------------------


async def test_tls_stack_talks_mutual_tls_and_refuses_a_client_without_a_certificate(
    images: None, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_local_pki(certs)
    certs.chmod(0o755)
    for pem in certs.iterdir():
        pem.chmod(0o644)
    stack = ComposeStack(
        ["docker-compose.yml", "docker-compose.tls.yml"], environment={"VOICEPIPE_CERTS": str(certs)}
    )
    try:
        await asyncio.to_thread(stack.up)
        port = stack.published("orchestrator", 50051).rpartition(":")[2]
        target = f"127.0.0.1:{port}"
        client = ChannelTls(
            ca=certs / "ca.pem", certificate=certs / "client.pem", key=certs / "client-key.pem"
        )
        channel = open_tls_channel(target, client)
        try:
            async with await caller(channel).open() as talk:
                await talk.speak("What is 2 plus 3?")
                turn = await talk.turn_ended("1", timeout_s=TURN_TIMEOUT_S)
        finally:
            await channel.close()
        assert turn.agent_text == "2 plus 3 is 5."
        await assert_refused(target, ChannelTls(ca=certs / "ca.pem"))
        # The gateway presents the client certificate to the orchestrator.
        gateway = stack.published("gateway", GATEWAY_PORT)
        await wait_until_gateway_serves(gateway)
        assert (await typed_turn_through_the_gateway(gateway))["agent_text"] == "2 plus 3 is 5."
    finally:
        await asyncio.to_thread(stack.down)


# --- the real stack -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def real_stack(images: None) -> AsyncIterator[ComposeStack]:
    """The real stack with two Whisper replicas."""
    stack = ComposeStack(["docker-compose.yml", "docker-compose.real.yml"])
    try:
        await asyncio.to_thread(stack.up, "stt=2")
        await wait_until_serving(stack.published("orchestrator", 50051), SERVING_TIMEOUT_S)
        yield stack
    finally:
        await asyncio.to_thread(stack.down)


def recording() -> Utterance:
    """ "go forward ten meters" (pocketsphinx-testdata), then a second of silence."""
    samples = np.frombuffer(require(RECORDING).read_bytes(), dtype="<i2")
    silence = np.zeros(PCM_16K.sample_rate, dtype=np.int16)
    return Utterance.from_samples(np.concatenate([samples, silence]), PCM_16K, len(samples))


def is_go_forward(transcript: str) -> bool:
    return words(transcript) in ("go forward ten meters", "go forward 10 meters")


async def test_real_stack_answers_a_recording_with_speech_that_says_the_reply(
    real_stack: ComposeStack,
) -> None:
    """A recording through the Whisper, LLM backend and Piper containers; the reply audio,
    heard by Whisper here, says the reply text."""
    target = real_stack.published("orchestrator", 50051)
    async with open_channel(target) as channel, await caller(channel).open() as talk:
        await talk.conversation.speak(recording())
        turn = await talk.turn_ended("1", timeout_s=REAL_TURN_TIMEOUT_S)
    assert is_go_forward(turn.user_text), turn.user_text
    assert turn.completed is not None and turn.agent_text.strip() and turn.audio, turn
    spoken = await whisper_words(bytes(turn.audio))
    assert jiwer.wer(words(turn.agent_text), spoken) <= 0.5, (turn.agent_text, spoken)


async def test_whisper_replica_killed_mid_recording_loses_and_repeats_nothing(
    real_stack: ComposeStack,
) -> None:
    """The other replica, which remembers nothing of the session, hears the replay: the
    interrupted recording once, and nothing the first final already covered again."""
    before, after = halves(recording())
    target = real_stack.published("orchestrator", 50051)
    async with open_channel(target) as channel, await caller(channel).open() as talk:
        await talk.conversation.speak(recording())
        await talk.turn_ended("1", timeout_s=REAL_TURN_TIMEOUT_S)
        await talk.conversation.play(before).sent.wait()
        await kill_replica(real_stack.containers("stt"), "stt", talk.conversation.settings.session_id)
        await talk.conversation.speak(after)
        turn = await talk.turn_ended("2", timeout_s=REAL_TURN_TIMEOUT_S)
        finals = talk.final_transcripts()
    assert len(finals) == 2 and all(map(is_go_forward, finals)), finals
    assert turn.completed is not None, turn
