"""Helpers for tests that talk to real services: channels, streaming calls, /metrics, health,
shutdown and leak checks."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from stubs import audio_code
from voicepipe.audio_format import PcmFormat
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe_client import connect

# Every call a test makes is bounded by this deadline.
CALL_TIMEOUT_S = 10.0
# How long a test waits for a service to reach an expected state before it fails.
WAIT_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Req = TypeVar("Req")
Resp = TypeVar("Resp")


# --- processes and channels ---------------------------------------------------------------------


@contextmanager
def running(module: str, *extra: str) -> Iterator[ServiceProcess]:
    """A service on ephemeral loopback ports for a `with` block (for module-scoped fixtures)."""
    process = ServiceProcess(module, stage_args(0, 0, *extra))
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def open_channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with the same options the services' own clients use."""
    async with connect(target) as channel:
        yield channel


# --- streaming calls ------------------------------------------------------------------------------


@dataclass
class CallOutcome(Generic[Resp]):
    """Everything a streaming call returned, and how it ended."""

    responses: list[Resp]
    code: grpc.StatusCode
    details: str

    def assert_ok(self) -> list[Resp]:
        assert self.code == grpc.StatusCode.OK, f"call failed: {self.code.name}: {self.details}"
        return self.responses


async def collect(
    call: grpc.aio.StreamStreamCall[Req, Resp] | grpc.aio.UnaryStreamCall[Req, Resp],
) -> CallOutcome[Resp]:
    """Reads a call to its end; a failure is returned, not raised."""
    responses: list[Resp] = []
    try:
        # read(), not `async for`: the caller may already have read from the call.
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)  # type: ignore[arg-type]  # read() is typed as object
    except grpc.aio.AioRpcError as error:
        return CallOutcome(responses, error.code(), error.details() or "")
    return CallOutcome(responses, await call.code(), await call.details())


async def exchange(
    method: grpc.aio.StreamStreamMultiCallable[Req, Resp],
    requests: Iterable[Req],
    *,
    half_close: bool = True,
) -> CallOutcome[Resp]:
    """Writes every request (then half-closes, if asked) and collects the responses.

    A grpc.aio client that writes after the server has ended the call may report INTERNAL
    "Internal error from Core" instead of the server's status (grpc/grpc#36066). Calls that the
    server is expected to end early therefore pass half_close=False and end their requests with
    the one that ends the call: the server cannot answer it before every write has completed."""
    call = method(timeout=CALL_TIMEOUT_S)
    try:
        for request in requests:
            await call.write(request)
        if half_close:
            await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the call has ended; collect() reports how
    return await collect(call)


def method_descriptor(path: str) -> MethodDescriptor:
    """The descriptor of a method given as "/package.Service/Method" (its proto module imported)."""
    _, service, method = path.split("/")
    return descriptor_pool.Default().FindMethodByName(f"{service}.{method}")


async def call_raw(
    channel: grpc.aio.Channel, path: str, messages: Sequence[bytes], *, half_close: bool = True
) -> CallOutcome[bytes]:
    """Calls any method with request messages as bytes (no serializer: they go on the wire as
    they are, valid or not) and collects the responses as bytes. A unary request is the one
    message given; see exchange() for half_close."""
    method = method_descriptor(path)
    if method.client_streaming:
        return await exchange(channel.stream_stream(path), messages, half_close=half_close)
    (message,) = messages
    if method.server_streaming:
        streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return await collect(streaming(message, timeout=CALL_TIMEOUT_S))
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    try:
        response = await unary(message, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return CallOutcome([], error.code(), error.details() or "")
    return CallOutcome([response], grpc.StatusCode.OK, "")


async def start_raw(
    channel: grpc.aio.Channel, path: str, messages: Sequence[bytes]
) -> grpc.aio.StreamStreamCall[bytes, bytes] | grpc.aio.UnaryStreamCall[bytes, bytes]:
    """A call of a response-streaming method with its request messages (bytes) written and the
    stream left open, to be read from."""
    if not method_descriptor(path).client_streaming:
        (message,) = messages
        streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return streaming(message, timeout=CALL_TIMEOUT_S)
    bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
    call = bidi(timeout=CALL_TIMEOUT_S)
    for message in messages:
        await call.write(message)
    return call


async def read_message(call: grpc.aio.StreamStreamCall[Req, Resp], kind: type[Resp]) -> Resp:
    """The next response of a call (a test failure at the end of the stream)."""
    message = await call.read()
    assert isinstance(message, kind), f"expected a {kind.__name__}, got {message!r}"
    return message


# --- logs -------------------------------------------------------------------------------------------


async def wait_for_log(
    process: ServiceProcess, condition: Callable[[dict[str, Any]], bool], *, timeout_s: float = WAIT_TIMEOUT_S
) -> dict[str, Any]:
    """The first JSON log line of `process` that satisfies `condition` (lines arrive through a
    pipe, a little after the responses they describe)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for event in process.events():
            if condition(event):
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching log line within {timeout_s} s")
        await asyncio.sleep(_POLL_INTERVAL_S)


# --- metrics ----------------------------------------------------------------------------------------


def scrape(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def read_metric(metrics_port: int, name: str, **labels: str) -> float:
    """One metric from a service's /metrics endpoint."""
    exposition = await asyncio.to_thread(scrape, metrics_port)
    return metric_value(exposition, name, **labels)


async def wait_for_metric(
    metrics_port: int,
    name: str,
    condition: Callable[[float], bool],
    *,
    labels: Mapping[str, str] | None = None,
    timeout_s: float = WAIT_TIMEOUT_S,
) -> float:
    """Polls /metrics until the metric (samples with these labels) satisfies `condition`; fails
    with the last value after `timeout_s`."""
    labels = labels or {}
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read_metric(metrics_port, name, **labels)
        if condition(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is still {value} after {timeout_s} s")
        await asyncio.sleep(_POLL_INTERVAL_S)


async def idle_task_count(process: ServiceProcess, *, settled_reads: int = 3) -> float:
    """The service's asyncio task count while it serves no call. A call that has just ended
    leaves grpc.aio's tasks for it alive for a moment, so the count is read until it settles."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    reads = [await read_metric(process.metrics_port, "voicepipe_asyncio_tasks")]
    while len(reads) < settled_reads or len(set(reads[-settled_reads:])) > 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"the task count did not settle: {reads[-10:]}")
        await asyncio.sleep(_POLL_INTERVAL_S)
        reads.append(await read_metric(process.metrics_port, "voicepipe_asyncio_tasks"))
    return reads[-1]


async def assert_returns_to_idle(
    process: ServiceProcess, service: str, method: str, idle_tasks: float
) -> None:
    """After a call ended, no RPC of `method` is in flight and no task it made is left."""
    await wait_for_metric(
        process.metrics_port,
        "voicepipe_rpcs_in_flight",
        lambda v: v == 0,
        labels={"grpc_service": service, "grpc_method": method},
    )
    await wait_for_metric(process.metrics_port, "voicepipe_asyncio_tasks", lambda v: v <= idle_tasks)


# --- health -----------------------------------------------------------------------------------------


# The health stubs' type hints declare no methods on HealthStub, so the calls are made typed here.
_HEALTH = "/grpc.health.v1.Health/"


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    check = channel.unary_unary(
        _HEALTH + "Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
    return response.status


def watch_health(
    channel: grpc.aio.Channel, service: str, timeout_s: float = CALL_TIMEOUT_S
) -> grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    watch: grpc.aio.UnaryStreamMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
    watch = channel.unary_stream(
        _HEALTH + "Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)


async def assert_drains_on_sigterm(process: ServiceProcess, service: str) -> None:
    """Health is SERVING for the server ("") and `service`; after SIGTERM a Watch of `service`
    sees NOT_SERVING while the process is still running; then the process exits cleanly."""
    async with open_channel(process.target) as channel:
        assert await health_status(channel, "") == SERVING
        assert await health_status(channel, service) == SERVING
        watch = watch_health(channel, service)
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == SERVING
        process.signal(signal.SIGTERM)
        update = await watch.read()
        assert isinstance(update, health_pb2.HealthCheckResponse)
        assert update.status == NOT_SERVING
        # The open Watch is an in-flight call, so the server is still in its grace period.
        assert process.process.poll() is None, "the process exited before clients saw NOT_SERVING"
        watch.cancel()
    assert await asyncio.to_thread(process.wait, WAIT_TIMEOUT_S) == 0


# --- malformed requests -------------------------------------------------------------------------

# A field tag with wire type 7, which no protobuf message can contain.
GARBAGE = b"\xff\xff\xff\xff"


async def assert_malformed_request_rejected(
    process: ServiceProcess, path: str, valid_first: bytes | None = None
) -> None:
    """Garbage (after `valid_first`, if given) gets INVALID_ARGUMENT naming the request type,
    one warning line and no traceback in the log, a count in /metrics, and health stays SERVING."""
    _, service, method = path.split("/")
    request_type = method_descriptor(path).input_type.full_name
    labels = {"grpc_service": service, "grpc_method": method}
    counted = "voicepipe_server_malformed_messages_total"
    before = await read_metric(process.metrics_port, counted, **labels)
    logged_before = len(process.events())

    async with open_channel(process.target) as channel:
        # No half-close: the server must end the call on the garbage alone.
        messages = [*([valid_first] if valid_first else []), GARBAGE]
        outcome = await call_raw(channel, path, messages, half_close=False)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
        assert request_type in outcome.details

        warning = await wait_for_log(
            process, lambda e: e.get("event") == "malformed request" and e.get("method") == path
        )
        assert warning["level"] == "warning"
        assert warning["message_type"] == request_type
        await wait_for_metric(process.metrics_port, counted, lambda v: v == before + 1, labels=labels)
        assert await health_status(channel, "") == SERVING

    new_events = process.events()[logged_before:]
    warnings = [e for e in new_events if e.get("event") == "malformed request"]
    assert len(warnings) == 1, warnings
    assert not [e for e in new_events if e["level"] in ("error", "critical") or "exception" in e]
    assert not [line for line in process.log_lines if "Traceback" in line]


# A client that keeps writing after its garbage: this many more of the stream's own messages, in
# each of this many calls.
MESSAGES_AFTER_GARBAGE = 40
CALLS_WHILE_WRITING = 8


async def assert_garbage_amid_writes_rejected(
    process: ServiceProcess, path: str, valid_first: bytes, more: bytes
) -> None:
    """Garbage after `valid_first`, then more messages (`more`) while the server ends the call:
    every call still ends with INVALID_ARGUMENT naming the request type, not INTERNAL
    (grpc/grpc#36066), because the server reads what the client goes on sending first."""
    request_type = method_descriptor(path).input_type.full_name
    async with open_channel(process.target) as channel:
        for _ in range(CALLS_WHILE_WRITING):
            messages = [valid_first, GARBAGE, *[more] * MESSAGES_AFTER_GARBAGE]
            outcome = await call_raw(channel, path, messages)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
            assert request_type in outcome.details


# --- audio ------------------------------------------------------------------------------------------


def spoken(
    text: str, fmt: PcmFormat, *, trailing_silence_ms: int = audio_code.DEFAULT_TRAILING_SILENCE_MS
) -> bytes:
    """`text` spoken in the stub audio code, as audio bytes in `fmt`."""
    return fmt.encode(audio_code.encode(text, fmt.sample_rate, trailing_silence_ms=trailing_silence_ms))


def silence(fmt: PcmFormat, milliseconds: int) -> bytes:
    return fmt.encode(np.zeros(audio_code.ms_to_samples(milliseconds, fmt.sample_rate), dtype=np.int16))


def split(data: bytes, size: int) -> list[bytes]:
    """`data` cut into pieces of `size` bytes (the last may be shorter)."""
    return [data[i : i + size] for i in range(0, len(data), size)]
