"""What every stage server does, whichever engine serves it: health SERVING until SIGTERM then
NOT_SERVING, cancelled calls leave nothing behind, the fault knobs, rejections counted in metrics,
bad input (the contract's stream protocol, malformed bytes) answered with INVALID_ARGUMENT.

A new engine gets all of it by being added to STAGES: the module that serves it, the contract it
serves, a minimal valid call, and the flags that keep that call busy long enough to cancel it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message

from bench import recordings
from bench.recordings import padded
from stubs import audio_code, replies
from tests.conftest import StartService
from tests.helpers import (
    SERVING,
    assert_drains_on_sigterm,
    assert_malformed_request_rejected,
    assert_returns_to_idle,
    call_raw,
    health_status,
    idle_task_count,
    method_descriptor,
    open_channel,
    read_metric,
    split,
    spoken,
    start_raw,
    wait_for_metric,
)
from voice.v1 import common_pb2, language_model_pb2, speech_to_text_pb2, text_to_speech_pb2
from voicepipe.audio_format import LINEAR16, PcmFormat
from voicepipe.processes import ServiceProcess, stage_args

PCM16_FORMAT = PcmFormat(LINEAR16, 16_000)
PCM16 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000)
# Each protocol case ends with the request that breaks the contract (see helpers.exchange).
ProtocolErrors = dict[str, tuple[list[Message], tuple[str, ...]]]


@dataclass(frozen=True)
class Contract:
    """What every server of one stage contract shares: the method, and requests that break the
    stream protocol with words the INVALID_ARGUMENT details must contain (the first case is the
    one counted in metrics)."""

    path: str
    protocol_errors: ProtocolErrors

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def method(self) -> str:
        return self.path.split("/")[2]

    @property
    def request_streaming(self) -> bool:
        return bool(method_descriptor(self.path).client_streaming)


@dataclass(frozen=True)
class StageServer:
    """One engine behind a contract. `valid` is a call answered with more than two responses
    before the client half-closes; under each of `busy_flags` it is still running after its first
    response (a streaming request's call stays open anyway until the client half-closes)."""

    module: str
    contract: Contract
    valid: Sequence[Message]
    busy_flags: Sequence[tuple[str, ...]] = ((),)
    flags: tuple[str, ...] = field(default=())
    fault_knobs: bool = True  # served with the stubs' fault knobs (stubs.faults.FAULT_KNOBS)
    # What the valid call says, read back from its responses (None: nothing to read it with).
    says: Callable[[list[bytes]], str] | None = None

    def start(self, start_service: StartService, *extra: str) -> ServiceProcess:
        return start_service(self.module, *self.flags, *extra)


def config_first_errors(config: Message, data: Message, data_field: str) -> ProtocolErrors:
    """The protocol cases of a stream whose first request carries `config` and the rest
    `data_field` (the two members of the request's oneof)."""
    empty = type(config)()
    neither = f"neither config nor {data_field}"
    return {
        f"{data_field} before config": ([data], (data_field, "before config")),
        "no requests": ([], ("before config",)),
        "empty first request": ([empty], (neither,)),
        "empty later request": ([config, empty], (neither,)),
        "second config": ([config, data, config], ("config", "twice")),
    }


STT_CONFIG = speech_to_text_pb2.TranscribeRequest(
    config=speech_to_text_pb2.TranscriptionConfig(audio_format=PCM16)
)
STT_AUDIO = speech_to_text_pb2.TranscribeRequest(audio=spoken("still here", PcmFormat(LINEAR16, 16_000)))
TTS_CONFIG = text_to_speech_pb2.SynthesizeRequest(
    config=text_to_speech_pb2.SynthesisConfig(audio_format=PCM16)  # every engine's default voice
)
TTS_SEGMENT = text_to_speech_pb2.SynthesizeRequest(
    segment=text_to_speech_pb2.TextSegment(segment_id=1, text="Still here.", flush=True)
)

STT = Contract(
    "/voice.v1.SpeechToTextService/Transcribe", config_first_errors(STT_CONFIG, STT_AUDIO, "audio")
)
TTS = Contract(
    "/voice.v1.TextToSpeechService/Synthesize", config_first_errors(TTS_CONFIG, TTS_SEGMENT, "segment")
)
LLM = Contract(
    "/voice.v1.LanguageModelService/Generate",
    {"no messages": ([language_model_pb2.GenerateRequest()], ("messages is empty",))},
)
ECHO = language_model_pb2.GenerateRequest(
    messages=[language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_USER, content="one two three")]
)
HELLO = language_model_pb2.GenerateRequest(
    messages=[language_model_pb2.ChatMessage(role=language_model_pb2.ROLE_USER, content="hello")]
)


def stt_finals(responses: list[bytes]) -> str:
    parsed = (speech_to_text_pb2.TranscribeResponse.FromString(r) for r in responses)
    return " ".join(r.result.transcript for r in parsed if r.result.is_final)


def tts_heard(responses: list[bytes]) -> str:
    parsed = (text_to_speech_pb2.SynthesizeResponse.FromString(r) for r in responses)
    audio = b"".join(r.audio.audio for r in parsed if r.HasField("audio"))
    return " ".join(audio_code.decode_utterances(PCM16_FORMAT.decode(audio), PCM16_FORMAT.sample_rate))


def llm_text(responses: list[bytes]) -> str:
    parsed = (language_model_pb2.GenerateResponse.FromString(r) for r in responses)
    return "".join(r.delta.text for r in parsed if r.HasField("delta"))


# Real speech ("go forward ten meters", from pocketsphinx-testdata) in messages of 1 s.
WHISPER = (
    [
        StageServer(
            "stt_whisper",
            STT,
            [
                STT_CONFIG,
                *(
                    speech_to_text_pb2.TranscribeRequest(audio=piece)
                    for piece in split(PCM16_FORMAT.encode(padded(recordings.goforward().audio)), 32_000)
                ),
            ],
            fault_knobs=False,
        )
    ]
    if recordings.available()
    else []
)

STAGES = [
    # With 5 s of processing the STT call is also cancelled while a final result is held back.
    StageServer(
        "stt_stub",
        STT,
        [STT_CONFIG, STT_AUDIO],
        busy_flags=((), ("--processing-ms", "5000")),
        says=stt_finals,
    ),
    StageServer(
        "tts_stub", TTS, [TTS_CONFIG, TTS_SEGMENT], busy_flags=(("--realtime-factor", "1"),), says=tts_heard
    ),
    StageServer("llm_stub", LLM, [HELLO], busy_flags=(("--tokens-per-second", "20"),), says=llm_text),
    StageServer("tts_espeak", TTS, [TTS_CONFIG, TTS_SEGMENT], fault_knobs=False),
    *WHISPER,
    # The SDK's own proof: an engine of a few lines, defined in the tests.
    StageServer("tests.echo_engine", LLM, [ECHO], busy_flags=(("--word-delay", "0.2"),), says=llm_text),
]


class Servers:
    """One server per stage with its default flags, started when a test first needs it, for the
    tests that need nothing special."""

    def __init__(self) -> None:
        self._started: dict[str, ServiceProcess] = {}

    def of(self, stage: StageServer) -> ServiceProcess:
        if stage.module not in self._started:
            self._started[stage.module] = ServiceProcess(stage.module, stage_args(0, 0, *stage.flags))
        return self._started[stage.module]

    def stop(self) -> None:
        for process in self._started.values():
            process.stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    started = Servers()
    try:
        yield started
    finally:
        started.stop()


def each_stage() -> pytest.MarkDecorator:
    return pytest.mark.parametrize("stage", STAGES, ids=[s.module for s in STAGES])


def wire(requests: Sequence[Message]) -> list[bytes]:
    return [request.SerializeToString() for request in requests]


def without_timings(contract: Contract, responses: Sequence[bytes]) -> list[Message]:
    """The responses with every Duration cleared, for comparing two calls whose timing differs."""
    response_type = message_factory.GetMessageClass(method_descriptor(contract.path).output_type)
    parsed = [response_type.FromString(raw) for raw in responses]
    for message in parsed:
        _clear_durations(message)
    return parsed


def _clear_durations(message: Message) -> None:
    for field_descriptor, value in message.ListFields():
        if field_descriptor.message_type is None or field_descriptor.is_repeated:
            continue
        if field_descriptor.message_type.full_name == "google.protobuf.Duration":
            message.ClearField(field_descriptor.name)
        else:
            _clear_durations(value)


# --- health -------------------------------------------------------------------------------------


@each_stage()
async def test_health_is_serving_until_sigterm(stage: StageServer, start_service: StartService) -> None:
    process = stage.start(start_service, "--shutdown-grace", "5")
    await assert_drains_on_sigterm(process, stage.contract.service)


# --- bad input ----------------------------------------------------------------------------------


PROTOCOL_CASES = [(stage, case) for stage in STAGES for case in stage.contract.protocol_errors]


@pytest.mark.parametrize(
    ("stage", "case"), PROTOCOL_CASES, ids=[f"{s.module}-{case}" for s, case in PROTOCOL_CASES]
)
async def test_breaking_the_stream_protocol_is_invalid_argument(
    stage: StageServer, servers: Servers, case: str
) -> None:
    requests, keywords = stage.contract.protocol_errors[case]
    async with open_channel(servers.of(stage).target) as channel:
        outcome = await call_raw(channel, stage.contract.path, wire(requests), half_close=not requests)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    for keyword in keywords:
        assert keyword in outcome.details


@each_stage()
async def test_rejections_are_counted_in_metrics(stage: StageServer, servers: Servers) -> None:
    server = servers.of(stage)
    labels = {"grpc_method": stage.contract.method, "grpc_code": "INVALID_ARGUMENT"}
    before = await read_metric(server.metrics_port, "grpc_server_handled_total", **labels)
    requests, _ = next(iter(stage.contract.protocol_errors.values()))
    async with open_channel(server.target) as channel:
        outcome = await call_raw(channel, stage.contract.path, wire(requests), half_close=False)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    await wait_for_metric(
        server.metrics_port, "grpc_server_handled_total", lambda v: v == before + 1, labels=labels
    )


MALFORMED_CASES = [
    (stage, mid_stream)
    for stage in STAGES
    for mid_stream in ((False, True) if stage.contract.request_streaming else (False,))
]


@pytest.mark.parametrize(
    ("stage", "mid_stream"),
    MALFORMED_CASES,
    ids=[f"{s.module}{'-mid-stream' if mid else ''}" for s, mid in MALFORMED_CASES],
)
async def test_malformed_bytes_are_invalid_argument(
    stage: StageServer, servers: Servers, mid_stream: bool
) -> None:
    first = stage.valid[0].SerializeToString() if mid_stream else None
    await assert_malformed_request_rejected(servers.of(stage), stage.contract.path, first)


# --- cancellation ---------------------------------------------------------------------------------

BUSY = [(stage, flags) for stage in STAGES for flags in stage.busy_flags]


@pytest.mark.parametrize(("stage", "busy_flags"), BUSY, ids=[" ".join((s.module, *f)) for s, f in BUSY])
async def test_cancelled_call_leaves_nothing_behind(
    start_service: StartService, stage: StageServer, busy_flags: tuple[str, ...]
) -> None:
    contract = stage.contract
    process = stage.start(start_service, *busy_flags)
    async with open_channel(process.target) as channel:
        assert await health_status(channel, "") == SERVING  # connected, and the server idle
        idle = await idle_task_count(process)
        call = await start_raw(channel, contract.path, wire(stage.valid))
        assert isinstance(await call.read(), bytes)
        labels = {"grpc_service": contract.service, "grpc_method": contract.method}
        assert await read_metric(process.metrics_port, "voicepipe_rpcs_in_flight", **labels) == 1
        # The call's tasks are visible in the gauge.
        assert await read_metric(process.metrics_port, "voicepipe_asyncio_tasks") >= idle + 2
        call.cancel()
        await assert_returns_to_idle(process, contract.service, contract.method, idle)


EXPECTED_SAYS = {
    "stt_stub": "still here",
    "tts_stub": "Still here.",
    "llm_stub": replies.GREETING,
    "tests.echo_engine": "one two three ",
}


# --- fault knobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [s for s in STAGES if s.fault_knobs], ids=lambda s: s.module)
async def test_fault_knobs_fail_then_break_then_recover(
    stage: StageServer, start_service: StartService
) -> None:
    contract = stage.contract
    process = stage.start(
        start_service, "--fault-fail-first", "1", "--fault-break-after", "2", "--fault-calls", "1"
    )
    requests = wire(stage.valid)
    async with open_channel(process.target) as channel:
        # A streaming call writes nothing the failing call could refuse; the broken call's requests
        # are all written before it breaks (see helpers.exchange).
        failed = await call_raw(
            channel, contract.path, [] if contract.request_streaming else requests, half_close=False
        )
        assert (failed.code, failed.responses) == (grpc.StatusCode.UNAVAILABLE, [])
        assert "fault injection" in failed.details
        broken = await call_raw(channel, contract.path, requests, half_close=False)
        assert broken.code == grpc.StatusCode.UNAVAILABLE, (broken.code, broken.details)
        healthy = await call_raw(channel, contract.path, requests)
    assert len(healthy.assert_ok()) > 2
    if stage.says is not None:  # the recovered call is whole: it says what the call asked for
        assert stage.says(healthy.responses) == EXPECTED_SAYS[stage.module]
    # The broken call is the healthy one cut short.
    assert without_timings(contract, broken.responses) == without_timings(contract, healthy.responses[:2])
