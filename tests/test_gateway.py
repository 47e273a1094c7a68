"""The WebSocket gateway over its documented protocol (aiohttp's client as the caller): a spoken
conversation end to end, bad input closed with a clear code and reason while everyone else goes
on, bearer tokens from the config or a proxy's header, an unreachable orchestrator, and the drain
on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator.auth import issue
from stubs import audio_code
from stubs.audio_code import normalize_text
from stubs.replies import STORY
from tests.gateway_fixtures import SocketCaller, gateway, socket_caller, ws_url
from tests.stack_fixtures import heard, instant_stack, own_orchestrator, processes
from voicepipe.audio_format import LINEAR16, PcmFormat
from voicepipe.processes import ServiceProcess, free_port
from voicepipe_client import PCM_16K, Utterance
from voicepipe_tools.certs import write_local_pki
from voicepipe_tools.stack import LocalStack, StackCertificates

MAX_FRAME_BYTES = 4096
MAX_MESSAGES_PER_SECOND = 300
ALLOWED_ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    async with instant_stack() as stack:
        yield stack


@pytest.fixture(scope="module")
async def gateway_process(stack: LocalStack) -> AsyncIterator[ServiceProcess]:
    assert stack.orchestrator is not None
    async with gateway(
        stack.orchestrator.target,
        f"--max-frame-bytes={MAX_FRAME_BYTES}",
        f"--max-messages-per-second={MAX_MESSAGES_PER_SECOND}",
        f"--allowed-origins={ALLOWED_ORIGIN}",
    ) as process:
        yield process


async def speak(caller: SocketCaller, text: str) -> None:
    """`text` in the stub audio code, 20 ms per binary frame, as fast as the socket takes it."""
    for frame in Utterance.spoken(audio_code.render, text, PCM_16K).frames:
        await caller.socket.send_bytes(frame)


async def typed_turn_works(process: ServiceProcess) -> None:
    async with socket_caller(ws_url(process)) as caller:
        await caller.configure()
        await caller.send({"type": "text", "text": "What is 2 plus 3?"})
        completed = await caller.until("turn_completed")
    assert completed["agent_text"] == "2 plus 3 is 5."


async def test_a_spoken_conversation_over_the_socket(gateway_process: ServiceProcess) -> None:
    async with socket_caller(ws_url(gateway_process), origin=ALLOWED_ORIGIN) as caller:
        await caller.configure(input_sample_rate=16000, output_sample_rate=24000, session_id="ws-1")
        started = await caller.until("session_started")
        await speak(caller, "What is 2 plus 3?")
        final = await caller.until("turn_started")
        completed = await caller.until("turn_completed")
        await caller.send({"type": "end_of_input"})
        code, reason = await caller.closed()
    assert started["session_id"] == "ws-1"
    assert [e["text"] for e in caller.events if e["type"] == "transcript" and e["final"]] == [
        "What is 2 plus 3?"
    ]
    assert final["user_text"] == "What is 2 plus 3?"
    agent_text = "".join(e["text"] for e in caller.events if e["type"] == "agent_text")
    assert agent_text == completed["agent_text"] == "2 plus 3 is 5."
    # The reply audio came as binary frames at the asked rate, all of it, saying the reply.
    output = PcmFormat(LINEAR16, 24000)
    assert heard(caller.audio, output) == ["2 plus 3 is 5."]
    assert len(caller.audio) == output.bytes_for(completed["reply_audio_ms"])
    latency = completed["latency"]
    assert latency["time_to_first_audio_ms"] > 0
    assert latency["orchestrator_added_ms"] == pytest.approx(
        latency["time_to_first_audio_ms"]
        - latency["stt_finalization_ms"]
        - latency["llm_time_to_first_sentence_ms"]
        - latency["tts_time_to_first_audio_ms"],
        abs=0.01,
    )
    assert (code, reason) == (1000, "")


async def test_barge_in_stops_the_reply_and_the_conversation_goes_on(gateway_process: ServiceProcess) -> None:
    """A `barge_in` message (a push-to-talk button pressed over the reply) interrupts it: no more
    of its audio arrives, `interrupted` says what the caller was sent of it, and the next turn is
    answered."""
    async with socket_caller(ws_url(gateway_process)) as caller:
        await caller.configure()
        await caller.send({"type": "text", "text": "Please tell me a story."})
        story = await caller.until("turn_started")
        # The reply audio is paced in real time: a second into the story, it is far from over.
        await caller.until_audio(PCM_16K.bytes_for(1000))
        await caller.send({"type": "barge_in"})
        interrupted = await caller.until("interrupted")
        before = bytes(caller.audio)
        await caller.send({"type": "barge_in"})  # nothing is playing now: no effect
        await caller.send({"type": "text", "text": "What is 2 plus 3?"})
        answer = await caller.until("turn_completed")
        after = bytes(caller.audio[len(before) :])
    assert interrupted["turn_id"] == story["turn_id"]
    heard_text = interrupted["heard_text"]
    assert heard_text and STORY.startswith(heard_text) and len(heard_text) < len(STORY) / 2, heard_text
    # What arrived decodes to heard_text (the audio may end inside the next character's burst,
    # which then decodes as one more symbol).
    [decoded] = heard(before, PCM_16K)
    assert decoded.startswith(normalize_text(heard_text)), (decoded, heard_text)
    assert len(decoded[len(normalize_text(heard_text)) :].strip()) <= 1, (decoded, heard_text)
    # Nothing of the story after `interrupted`: the audio since is the next reply's, all of it.
    assert heard(after, PCM_16K) == ["2 plus 3 is 5."]
    assert answer["agent_text"] == "2 plus 3 is 5." and answer["turn_id"] != story["turn_id"]
    assert [e["type"] for e in caller.events].count("interrupted") == 1


# case -> (what the caller sends, the close code, words of the reason)
BAD_INPUT: dict[str, tuple[list[str | bytes], int, str]] = {
    "garbage JSON": ([json.dumps({"type": "config"}), "{not json"], 4003, "not JSON: "),
    "not an object": (['["config"]'], 4003, 'a text frame must be a JSON object with a "type"'),
    "audio before config": ([b"\0\0" * 320], 4003, "audio before config"),
    "a second config": ([json.dumps({"type": "config"})] * 2, 4003, "a second config"),
    "a bad sample rate": (
        [json.dumps({"type": "config", "input_sample_rate": 1000})],
        4003,
        'config "input_sample_rate" must be 8000 to 48000 Hz, got 1000',
    ),
    "an oversized frame": (
        [json.dumps({"type": "config"}), b"\0" * (MAX_FRAME_BYTES + 2)],
        1009,
        f"a frame of {MAX_FRAME_BYTES + 2} bytes; at most {MAX_FRAME_BYTES}",
    ),
    "a frame flood": (
        [json.dumps({"type": "config"}), *[b"\0\0" * 160] * (2 * MAX_MESSAGES_PER_SECOND)],
        4008,
        f"more than {MAX_MESSAGES_PER_SECOND} messages per second",
    ),
    "a type that is not a string": ([json.dumps({"type": 3})], 4003, 'a JSON object with a "type"'),
    "an unknown message type": (
        [json.dumps({"type": "config"}), json.dumps({"type": "pause"})],
        4003,
        'unknown message type "pause"',
    ),
    "barge_in before config": ([json.dumps({"type": "barge_in"})], 4003, '"barge_in" before config'),
    "an odd byte count": ([json.dumps({"type": "config"}), b"\0\0\0"], 4003, "odd"),
    # The typed turn's reply (its audio paced in real time) keeps the call open meanwhile.
    "audio after end_of_input": (
        [
            json.dumps({"type": "config"}),
            json.dumps({"type": "text", "text": "What is 2 plus 3?"}),
            json.dumps({"type": "end_of_input"}),
            b"\0\0" * 320,
        ],
        4003,
        "input after end_of_input",
    ),
    "barge_in after end_of_input": (
        [
            json.dumps({"type": "config"}),
            json.dumps({"type": "text", "text": "What is 2 plus 3?"}),
            json.dumps({"type": "end_of_input"}),
            json.dumps({"type": "barge_in"}),
        ],
        4003,
        "input after end_of_input",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_input_closes_that_socket_with_a_code_and_reason(
    gateway_process: ServiceProcess, case: str
) -> None:
    frames, expected_code, expected_reason = BAD_INPUT[case]
    async with socket_caller(ws_url(gateway_process)) as bystander:
        await bystander.configure()
        await bystander.until("session_started")
        async with socket_caller(ws_url(gateway_process)) as caller:
            for frame in frames:
                if caller.socket.closed:
                    break
                if isinstance(frame, bytes):
                    await caller.socket.send_bytes(frame)
                else:
                    await caller.socket.send_str(frame)
            code, reason = await caller.closed()
        # Someone already talking goes on, and so does someone new.
        await bystander.send({"type": "text", "text": "What is 2 plus 3?"})
        assert (await bystander.until("turn_completed"))["agent_text"] == "2 plus 3 is 5."
    await typed_turn_works(gateway_process)
    assert code == expected_code, (code, reason)
    assert expected_reason in reason, reason


async def test_a_page_of_another_origin_is_refused(gateway_process: ServiceProcess) -> None:
    async with socket_caller(ws_url(gateway_process), origin="http://evil.example") as caller:
        code, reason = await caller.closed()
    assert (code, reason) == (4007, "origin http://evil.example is not allowed")
    await typed_turn_works(gateway_process)
    # Counted by close code on /metrics.
    metrics_url = f"http://127.0.0.1:{gateway_process.metrics_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
        exposition = await response.text()
    assert 'voicepipe_gateway_socket_closes_total{code="4007"} 1.0' in exposition


async def test_a_full_gateway_and_a_silent_socket_are_closed_with_reasons(stack: LocalStack) -> None:
    assert stack.orchestrator is not None
    async with gateway(stack.orchestrator.target, "--max-sessions=1", "--config-timeout=0.5") as process:
        async with socket_caller(ws_url(process)) as first, socket_caller(ws_url(process)) as second:
            refused = await second.closed()
            silent = await first.closed()  # it never sent its config
        assert refused == (4008, "the gateway is at its limit of 1 conversations")
        assert silent == (4004, "no config within 0.5 s")
        await typed_turn_works(process)


async def test_an_unreachable_orchestrator_closes_with_unavailable_at_once() -> None:
    async with (
        gateway(f"127.0.0.1:{free_port()}", "--connect-timeout=0.5") as process,
        socket_caller(ws_url(process)) as caller,
    ):
        await caller.configure()
        code, reason = await caller.closed(timeout_s=5)
    assert (code, reason) == (4014, "the orchestrator is unreachable")


async def test_the_bearer_token_comes_from_the_config_or_a_proxy_header(
    stack: LocalStack, tmp_path: Path
) -> None:
    tokens = tmp_path / "tenants.json"
    token = await asyncio.to_thread(issue, tokens, "acme", None)
    async with processes() as group:
        orchestrator = await own_orchestrator(group, stack, f"--tokens-file={tokens}")
        async with gateway(orchestrator.target) as process:
            async with socket_caller(ws_url(process)) as caller:
                await caller.configure(token=token)
                await caller.send({"type": "text", "text": "What is 2 plus 3?"})
                await caller.until("turn_completed")
            headers = {"Authorization": f"Bearer {token}"}
            async with socket_caller(ws_url(process), headers=headers) as caller:
                await caller.configure()
                await caller.until("session_started")
            async with socket_caller(ws_url(process)) as caller:
                await caller.configure(token="wrong")
                code, reason = await caller.closed()
    assert code == 4016, (code, reason)
    assert reason


async def test_wss_in_front_of_an_orchestrator_with_mutual_tls(tmp_path: Path) -> None:
    """The gateway serves the page and the socket over TLS, and reaches an orchestrator that
    requires client certificates with the orchestrator-TLS flags."""
    await asyncio.to_thread(write_local_pki, tmp_path)
    certificates = StackCertificates(tmp_path)
    listener = [
        f"--tls-cert={tmp_path / 'orchestrator.pem'}",
        f"--tls-key={tmp_path / 'orchestrator-key.pem'}",
    ]
    client = ssl.create_default_context(cafile=str(certificates.ca))
    async with instant_stack(certificates=certificates) as stack:
        assert stack.orchestrator is not None
        upstream = certificates.client_flags("--orchestrator-tls")
        async with (
            gateway(stack.orchestrator.target, *upstream, *listener) as process,
            socket_caller(f"wss://127.0.0.1:{process.port}/ws", ssl=client) as caller,
        ):
            await caller.configure()
            await caller.send({"type": "text", "text": "What is 2 plus 3?"})
            assert (await caller.until("turn_completed"))["agent_text"] == "2 plus 3 is 5."


async def test_sigterm_drains_health_first_then_closes_open_sockets_after_the_grace(
    stack: LocalStack,
) -> None:
    assert stack.orchestrator is not None
    async with (
        gateway(stack.orchestrator.target, "--drain-delay=1", "--shutdown-grace=1") as process,
        aiohttp.ClientSession() as http,
    ):
        health = f"http://127.0.0.1:{process.port}/healthz"
        async with http.get(health) as response:
            assert response.status == 200
        async with socket_caller(ws_url(process)) as caller:
            await caller.configure()
            await caller.until("session_started")
            process.signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                while True:  # bounded: the signal is handled within milliseconds
                    async with http.get(health) as response:
                        if response.status == 503:
                            assert await response.json() == {"status": "draining"}
                            break
            # A conversation already open goes on while the gateway drains...
            await caller.send({"type": "text", "text": "What is 2 plus 3?"})
            assert (await caller.until("turn_completed"))["agent_text"] == "2 plus 3 is 5."
            # ...until the grace is over.
            code, reason = await caller.closed()
        assert (code, reason) == (1001, "the gateway is shutting down")
        assert await asyncio.to_thread(process.wait, 10) == 0
