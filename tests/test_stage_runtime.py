"""The engine conformance suite: what every stage server does, whichever engine serves it, stubs
and real engines alike. Bad input (each contract's own validation, its stream protocol, malformed
bytes) is INVALID_ARGUMENT naming the field; correlation ids come back in every response and the
call's log lines; a server at its session limit answers RESOURCE_EXHAUSTED; a cancelled call
stops the engine and leaves nothing behind; health is SERVING until SIGTERM then NOT_SERVING;
reflection lists and describes the service; the fault knobs; rejections counted in metrics.

A new engine gets all of it by being added to STAGES: the module that serves it, the contract it
serves, a minimal valid call, and the flags and the call that keep it busy long enough to be held
and cancelled. One server per engine serves the module (a second one, at a session limit of one,
the tests that hold a call): engine-specific behaviour is tested in the engine's own module."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message

from bench import recordings
from bench.recordings import padded
from llm_openai import backend
from stubs import audio_code, replies
from tests.helpers import (
    SERVING,
    assert_drains_on_sigterm,
    assert_garbage_amid_writes_rejected,
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
    wait_for_log,
    wait_for_metric,
)
from tests.test_grpcurl import grpcurl, json_stream
from voice.v1 import common_pb2, language_model_pb2, speech_to_text_pb2, text_to_speech_pb2
from voicepipe.audio_format import LINEAR16, MULAW, PcmFormat
from voicepipe.processes import ServiceProcess, stage_args

PCM16_FORMAT = PcmFormat(LINEAR16, 16_000)
PCM16 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000)
# Each case ends with the request that breaks the contract (see helpers.exchange), with words the
# INVALID_ARGUMENT details must contain.
BadInput = dict[str, tuple[list[Message], tuple[str, ...]]]


@dataclass(frozen=True)
class Contract:
    """What every server of one stage contract shares: the method, requests that break it with
    words the INVALID_ARGUMENT details must contain (the first case is the one counted in
    metrics), the log event that ends a call, and the one that ends a cancelled call (None for a
    request stream: grpc.aio ends a cancelled call's requests as if the client had half-closed,
    so its log may say either)."""

    path: str
    bad_input: BadInput
    ended_event: str
    cancelled_event: str | None = None

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def method(self) -> str:
        return self.path.split("/")[2]

    @property
    def request_streaming(self) -> bool:
        return bool(method_descriptor(self.path).client_streaming)

    def parse(self, responses: Sequence[bytes]) -> list[Message]:
        response_type = message_factory.GetMessageClass(method_descriptor(self.path).output_type)
        return [response_type.FromString(raw) for raw in responses]


@dataclass(frozen=True)
class StageServer:
    """One engine behind a contract. `valid` is a call answered with more than two responses
    before the client half-closes. Under `busy_flags` the `busy` call (`valid` if None) is still
    running after its first response (a streaming request's call stays open anyway until the
    client half-closes)."""

    module: str
    contract: Contract
    valid: Sequence[Message]
    busy_flags: tuple[str, ...] = ()
    busy: Sequence[Message] | None = None
    fault_knobs: bool = True  # served with the stubs' fault knobs (stubs.faults.FAULT_KNOBS)
    local_backend: bool = False  # in front of the local LLM backend (llm_openai.backend)
    # What the valid call says, read back from its responses (None: nothing to read it with).
    says: Callable[[list[bytes]], str] | None = None

    @property
    def busy_call(self) -> Sequence[Message]:
        return self.valid if self.busy is None else self.busy


# --- the contracts --------------------------------------------------------------------------------


def config_first_errors(config: Message, data: Message, data_field: str) -> BadInput:
    """The stream protocol cases of a stream whose first request carries `config` and the rest
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


def audio_format_errors(config: Callable[[common_pb2.AudioFormat], Message]) -> BadInput:
    """The audio format cases every contract with a config shares."""
    return {
        "unset encoding": (
            [config(common_pb2.AudioFormat(sample_rate_hertz=16_000))],
            ("config.audio_format.encoding", "AUDIO_ENCODING_UNSPECIFIED"),
        ),
        "unknown encoding": (
            [config(common_pb2.AudioFormat(encoding=common_pb2.AudioEncoding.ValueType(7)))],
            ("config.audio_format.encoding", "7"),
        ),
        "sample rate too low": (
            [config(common_pb2.AudioFormat(encoding=MULAW, sample_rate_hertz=7_999))],
            ("config.audio_format.sample_rate_hertz", "7999"),
        ),
        "sample rate too high": (
            [config(common_pb2.AudioFormat(encoding=LINEAR16, sample_rate_hertz=96_000))],
            ("config.audio_format.sample_rate_hertz", "96000"),
        ),
        "stereo": (
            [config(common_pb2.AudioFormat(encoding=LINEAR16, channel_count=2))],
            ("config.audio_format.channel_count", "mono"),
        ),
    }


def stt_config(
    audio_format: common_pb2.AudioFormat = PCM16, *, silence_ms: int = 0, speech_start_ms: int = 0
) -> speech_to_text_pb2.TranscribeRequest:
    return speech_to_text_pb2.TranscribeRequest(
        config=speech_to_text_pb2.TranscriptionConfig(
            audio_format=audio_format,
            endpointing=speech_to_text_pb2.EndpointingConfig(
                end_of_utterance_silence_ms=silence_ms, speech_start_ms=speech_start_ms
            ),
        )
    )


def stt_audio(data: bytes) -> speech_to_text_pb2.TranscribeRequest:
    return speech_to_text_pb2.TranscribeRequest(audio=data)


def tts_config(
    audio_format: common_pb2.AudioFormat = PCM16, *, chunk_duration_ms: int = 0
) -> text_to_speech_pb2.SynthesizeRequest:
    # No voice: every engine's default.
    return text_to_speech_pb2.SynthesizeRequest(
        config=text_to_speech_pb2.SynthesisConfig(
            audio_format=audio_format, chunk_duration_ms=chunk_duration_ms
        )
    )


def tts_segment(segment_id: int, text: str, *, flush: bool = False) -> text_to_speech_pb2.SynthesizeRequest:
    return text_to_speech_pb2.SynthesizeRequest(
        segment=text_to_speech_pb2.TextSegment(segment_id=segment_id, text=text, flush=flush)
    )


def chat(
    *turns: tuple[language_model_pb2.Role.ValueType, str], max_tokens: int = 0, temperature: float = 0.0
) -> language_model_pb2.GenerateRequest:
    return language_model_pb2.GenerateRequest(
        messages=[language_model_pb2.ChatMessage(role=role, content=content) for role, content in turns],
        parameters=language_model_pb2.GenerationParameters(max_tokens=max_tokens, temperature=temperature),
    )


USER = language_model_pb2.ROLE_USER
ASSISTANT = language_model_pb2.ROLE_ASSISTANT
STT_CONFIG = stt_config()
STT_AUDIO = stt_audio(spoken("still here", PCM16_FORMAT))
TTS_CONFIG = tts_config()
TTS_SEGMENT = tts_segment(1, "Still here.", flush=True)
MAX_AUDIO_MESSAGE = PCM16_FORMAT.max_message_bytes

STT = Contract(
    "/voice.v1.SpeechToTextService/Transcribe",
    {
        **config_first_errors(STT_CONFIG, STT_AUDIO, "audio"),
        **audio_format_errors(stt_config),
        "end-of-utterance silence too short": (
            [stt_config(silence_ms=79)],
            ("config.endpointing.end_of_utterance_silence_ms", "79", "80 to 5000"),
        ),
        "end-of-utterance silence too long": (
            [stt_config(silence_ms=5001)],
            ("config.endpointing.end_of_utterance_silence_ms", "5001"),
        ),
        "speech start too short": (
            [stt_config(speech_start_ms=4)],
            ("config.endpointing.speech_start_ms", "4", "5 to 1000"),
        ),
        "speech start too long": (
            [stt_config(speech_start_ms=1001)],
            ("config.endpointing.speech_start_ms", "1001"),
        ),
        "odd byte count": ([STT_CONFIG, STT_AUDIO, stt_audio(b"\x00\x01\x02")], ("odd byte count",)),
        "empty audio": ([STT_CONFIG, stt_audio(b"")], ("audio message is empty",)),
        "oversized audio": (
            [STT_CONFIG, stt_audio(bytes(MAX_AUDIO_MESSAGE + 2))],
            ("exceeds the limit", str(MAX_AUDIO_MESSAGE)),
        ),
    },
    ended_event="transcription ended",
)
TTS = Contract(
    "/voice.v1.TextToSpeechService/Synthesize",
    {
        **config_first_errors(TTS_CONFIG, TTS_SEGMENT, "segment"),
        **audio_format_errors(tts_config),
        "chunk too short": (
            [tts_config(chunk_duration_ms=9)],
            ("config.chunk_duration_ms", "9", "10 to 1000"),
        ),
        "chunk too long": ([tts_config(chunk_duration_ms=1001)], ("config.chunk_duration_ms", "1001")),
        "empty text": ([TTS_CONFIG, tts_segment(1, "")], ("segment.text", "empty")),
        "text too long": (
            [TTS_CONFIG, tts_segment(1, "a" * 4097)],
            ("segment.text", "4097 characters", "4096"),
        ),
        "repeated segment id": (
            [TTS_CONFIG, tts_segment(4, "one"), tts_segment(4, "two")],
            ("segment.segment_id 4", "increasing"),
        ),
        "decreasing segment id": (
            [TTS_CONFIG, tts_segment(4, "one", flush=True), tts_segment(2, "two")],
            ("segment.segment_id 2", "previous segment was 4"),
        ),
    },
    ended_event="synthesis ended",
)
LLM = Contract(
    "/voice.v1.LanguageModelService/Generate",
    {
        "no messages": ([chat()], ("messages is empty",)),
        "no role": (
            [chat((USER, "hi"), (language_model_pb2.ROLE_UNSPECIFIED, "no role"), (USER, "hi"))],
            ("messages[1].role ROLE_UNSPECIFIED is not a valid role",),
        ),
        "unknown role": (
            [chat((language_model_pb2.Role.ValueType(7), "hi"))],
            ("messages[0].role 7",),
        ),
        "assistant last": (
            [chat((USER, "hi"), (ASSISTANT, "Hello!"))],
            ("the last message (messages[1]) has role ROLE_ASSISTANT", "must end with a ROLE_USER message"),
        ),
        "too many tokens": (
            [chat((USER, "hi"), max_tokens=4097)],
            ("parameters.max_tokens 4097 exceeds the limit of 4096",),
        ),
        "temperature too high": (
            [chat((USER, "hi"), temperature=2.5)],
            ("parameters.temperature 2.5 is out of range; use 0.0 to 2",),
        ),
        "negative temperature": (
            [chat((USER, "hi"), temperature=-0.5)],
            ("parameters.temperature -0.5 is out of range",),
        ),
        "message too long": (
            [chat((USER, "x" * 16_385))],
            ("messages[0].content has 16385 characters, more than the limit of 16384",),
        ),
        "too many messages": (
            [chat(*[(USER, "hi")] * 1001)],
            ("1001 messages exceed the limit of 1000 messages",),
        ),
    },
    ended_event="generated",
    cancelled_event="generation cancelled",
)

# --- the engines ----------------------------------------------------------------------------------


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
                    stt_audio(piece)
                    for piece in split(PCM16_FORMAT.encode(padded(recordings.goforward().audio)), 32_000)
                ),
            ],
            fault_knobs=False,
        )
    ]
    if recordings.available()
    else []
)
WORDS = " ".join(f"word{i}" for i in range(40))

STAGES = [
    # With 5 s of processing the STT call is held (and cancelled) while a final result is held back.
    StageServer(
        "stt_stub", STT, [STT_CONFIG, STT_AUDIO], busy_flags=("--processing-ms", "5000"), says=stt_finals
    ),
    StageServer(
        "tts_stub", TTS, [TTS_CONFIG, TTS_SEGMENT], busy_flags=("--realtime-factor", "1"), says=tts_heard
    ),
    StageServer(
        "llm_stub",
        LLM,
        [chat((USER, "hello"))],
        busy_flags=("--tokens-per-second", "20"),
        busy=[chat((USER, "tell me a story"))],
        says=llm_text,
    ),
    *WHISPER,
    StageServer("tts_espeak", TTS, [TTS_CONFIG, TTS_SEGMENT], fault_knobs=False),
    StageServer("tts_piper", TTS, [TTS_CONFIG, TTS_SEGMENT], fault_knobs=False),
    # The local backend with the bundled model: the busy call is a long reply.
    StageServer(
        "llm_openai",
        LLM,
        [chat((USER, "Say hello."), max_tokens=16)],
        busy=[chat((USER, "Count from 1 to 2000, separated by commas."), max_tokens=1500)],
        fault_knobs=False,
        local_backend=True,
    ),
    # The SDK's own proof: an engine of a few lines, defined in the tests.
    StageServer(
        "tests.echo_engine",
        LLM,
        [chat((USER, "one two three"))],
        busy_flags=("--word-delay", "0.2"),
        busy=[chat((USER, WORDS))],
        says=llm_text,
    ),
]
EXPECTED_SAYS = {
    "stt_stub": "still here",
    "tts_stub": "Still here.",
    "llm_stub": replies.GREETING,
    "tests.echo_engine": "one two three ",
}


class Servers:
    """The servers of the module, each started when a test first needs it: per engine, one with
    its default flags and one busy, at a session limit of one (the local LLM backend, started
    once, behind both of llm_openai's)."""

    def __init__(self) -> None:
        self._started: dict[tuple[str, ...], ServiceProcess] = {}
        self._backend: ServiceProcess | None = None

    def of(self, stage: StageServer) -> ServiceProcess:
        return self._start(stage)

    def busy(self, stage: StageServer) -> ServiceProcess:
        """Served with the engine's busy flags and `--max-sessions 1`."""
        return self._start(stage, *stage.busy_flags, "--max-sessions", "1")

    def stopped(self, stage: StageServer) -> None:
        """Forgets a server a test stopped (the next test that needs it starts another)."""
        self._started.pop((stage.module,), None)

    def _start(self, stage: StageServer, *flags: str) -> ServiceProcess:
        key = (stage.module, *flags)
        if key not in self._started:
            self._started[key] = ServiceProcess(
                stage.module, stage_args(0, 0, *self._backend_flags(stage), *flags)
            )
        return self._started[key]

    def _backend_flags(self, stage: StageServer) -> list[str]:
        if not stage.local_backend:
            return []
        if self._backend is None:
            self._backend = backend.start(0)
        return ["--base-url", backend.base_url(self._backend)]

    def stop(self) -> None:
        for process in self._started.values():
            process.stop()
        if self._backend is not None:
            self._backend.stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    started = Servers()
    try:
        yield started
    finally:
        started.stop()


def each_stage(stages: Sequence[StageServer] = STAGES) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("stage", stages, ids=[s.module for s in stages])


def wire(requests: Sequence[Message]) -> list[bytes]:
    return [request.SerializeToString() for request in requests]


def without_timings(contract: Contract, responses: Sequence[bytes]) -> list[Message]:
    """The responses with every Duration cleared, for comparing two calls whose timing differs."""
    parsed = contract.parse(responses)
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


def with_correlation(requests: Sequence[Message], ids: common_pb2.Correlation) -> list[Message]:
    """The call with `ids` where its contract carries them: the config, or the request itself."""
    first: Any = copy.deepcopy(requests[0])
    carrier = first.config if "config" in first.DESCRIPTOR.fields_by_name else first
    carrier.correlation.CopyFrom(ids)
    return [first, *requests[1:]]


# --- bad input ----------------------------------------------------------------------------------

BAD_INPUT_CASES = [(stage, case) for stage in STAGES for case in stage.contract.bad_input]


@pytest.mark.parametrize(
    ("stage", "case"), BAD_INPUT_CASES, ids=[f"{s.module}-{case}" for s, case in BAD_INPUT_CASES]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stage: StageServer, servers: Servers, case: str
) -> None:
    requests, keywords = stage.contract.bad_input[case]
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
    requests, _ = next(iter(stage.contract.bad_input.values()))
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


@each_stage([s for s in STAGES if s.contract.request_streaming])
async def test_malformed_bytes_then_more_writes_still_read_invalid_argument(
    stage: StageServer, servers: Servers
) -> None:
    """The client keeps writing the stream's own messages after its garbage."""
    first, more = stage.valid[0].SerializeToString(), stage.valid[-1].SerializeToString()
    await assert_garbage_amid_writes_rejected(servers.of(stage), stage.contract.path, first, more)


# --- correlation ----------------------------------------------------------------------------------


@each_stage()
async def test_correlation_ids_come_back_in_every_response_and_the_log(
    stage: StageServer, servers: Servers
) -> None:
    server = servers.of(stage)
    session_id = f"conformance-{stage.module}"
    ids = common_pb2.Correlation(session_id=session_id, turn_id="7")
    async with open_channel(server.target) as channel:
        outcome = await call_raw(channel, stage.contract.path, wire(with_correlation(stage.valid, ids)))
    responses = stage.contract.parse(outcome.assert_ok())
    assert responses
    assert all(r.correlation == ids for r in responses)  # type: ignore[attr-defined]
    line = await wait_for_log(
        server, lambda e: e.get("event") == stage.contract.ended_event and e.get("session_id") == session_id
    )
    assert line["turn_id"] == "7"


# --- session limit and cancellation -----------------------------------------------------------------


@each_stage()
async def test_a_call_beyond_the_session_limit_is_resource_exhausted(
    stage: StageServer, servers: Servers
) -> None:
    contract = stage.contract
    process = servers.busy(stage)
    labels = {"grpc_service": contract.service, "grpc_method": contract.method}
    await wait_for_metric(process.metrics_port, "voicepipe_rpcs_in_flight", lambda v: v == 0, labels=labels)
    async with open_channel(process.target) as channel:
        held = await start_raw(channel, contract.path, wire(stage.busy_call))
        try:
            assert isinstance(await held.read(), bytes)
            # Only the config of a stream: the client has stopped writing when it is refused.
            refused = await call_raw(channel, contract.path, wire(stage.valid[:1]))
        finally:
            held.cancel()
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (refused.code, refused.details)
    assert "session limit (1 concurrent calls)" in refused.details


@each_stage()
async def test_a_cancelled_call_stops_the_engine_and_leaves_nothing_behind(
    stage: StageServer, servers: Servers
) -> None:
    contract = stage.contract
    process = servers.busy(stage)
    async with open_channel(process.target) as channel:
        assert await health_status(channel, "") == SERVING  # connected, and the server idle
        idle = await idle_task_count(process)
        session_id = f"cancelled-{stage.module}"
        ids = common_pb2.Correlation(session_id=session_id)
        call = await start_raw(channel, contract.path, wire(with_correlation(stage.busy_call, ids)))
        assert isinstance(await call.read(), bytes)
        labels = {"grpc_service": contract.service, "grpc_method": contract.method}
        assert await read_metric(process.metrics_port, "voicepipe_rpcs_in_flight", **labels) == 1
        # The call's tasks are visible in the gauge.
        assert await read_metric(process.metrics_port, "voicepipe_asyncio_tasks") >= idle + 2
        call.cancel()
        await assert_returns_to_idle(process, contract.service, contract.method, idle)
    if contract.cancelled_event is not None:  # the engine stopped before its reply was whole
        await wait_for_log(
            process,
            lambda e: e.get("event") == contract.cancelled_event and e.get("session_id") == session_id,
        )
        ended = [e for e in process.events() if e.get("event") == contract.ended_event]
        assert not [e for e in ended if e.get("session_id") == session_id]


# --- fault knobs ----------------------------------------------------------------------------------


@each_stage([s for s in STAGES if s.fault_knobs])
async def test_fault_knobs_fail_then_break_then_recover(stage: StageServer) -> None:
    contract = stage.contract
    flags = ("--fault-fail-first", "1", "--fault-break-after", "2", "--fault-calls", "1")
    process = ServiceProcess(stage.module, stage_args(0, 0, *flags))
    requests = wire(stage.valid)
    try:
        async with open_channel(process.target) as channel:
            # A streaming call writes nothing the failing call could refuse; the broken call's
            # requests are all written before it breaks (see helpers.exchange).
            failed = await call_raw(
                channel, contract.path, [] if contract.request_streaming else requests, half_close=False
            )
            assert (failed.code, failed.responses) == (grpc.StatusCode.UNAVAILABLE, [])
            assert "fault injection" in failed.details
            broken = await call_raw(channel, contract.path, requests, half_close=False)
            assert broken.code == grpc.StatusCode.UNAVAILABLE, (broken.code, broken.details)
            healthy = await call_raw(channel, contract.path, requests)
    finally:
        process.stop()
    assert len(healthy.assert_ok()) > 2
    if stage.says is not None:  # the recovered call is whole: it says what the call asked for
        assert stage.says(healthy.responses) == EXPECTED_SAYS[stage.module]
    # The broken call is the healthy one cut short.
    assert without_timings(contract, broken.responses) == without_timings(contract, healthy.responses[:2])


# --- reflection and health --------------------------------------------------------------------------


@each_stage()
def test_reflection_lists_and_describes_the_service_and_health_answers(
    stage: StageServer, servers: Servers
) -> None:
    """Through grpcurl, the way an operator pokes at a server."""
    process = servers.of(stage)
    service, method = stage.contract.service, stage.contract.method
    listed = grpcurl(process, "list").split()
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(listed)
    described = grpcurl(process, "describe", service)
    assert f"{service} is a service" in described
    assert f"rpc {method} (" in described
    for health_request in ({}, {"service": service}):
        (status,) = json_stream(
            grpcurl(process, "grpc.health.v1.Health/Check", data=json.dumps(health_request))
        )
        assert status == {"status": "SERVING"}


# Last: it stops the module's server of each engine.
@each_stage()
async def test_health_is_serving_until_sigterm(stage: StageServer, servers: Servers) -> None:
    process = servers.of(stage)
    servers.stopped(stage)
    try:
        await assert_drains_on_sigterm(process, stage.contract.service)
    finally:
        process.stop()
