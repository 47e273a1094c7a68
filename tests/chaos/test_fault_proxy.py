"""The fault proxy does what the chaos tests rely on: bytes pass unchanged, and each fault is
seen by real peers (an echo server, a gRPC server and client) the way a real network fault is."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator.upstreams import stage_channel_options
from tests.chaos.fault_proxy import FaultProxy
from tests.conftest import StartService
from voicepipe import keepalive
from voicepipe.processes import PROJECT_ROOT, ServiceProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
# Generous bounds for things that happen in milliseconds on loopback.
STEP_S = 5.0
# How long "nothing arrives" is watched for: an observation window, not synchronisation.
QUIET_WINDOW_S = 0.3
KEEPALIVE_DETECTION_S = (keepalive.CLIENT_PING_INTERVAL_MS + keepalive.CLIENT_PING_TIMEOUT_MS) / 1000


class EchoServer:
    """Sends every byte back on 127.0.0.1; half-closes when the client does. Counts what it saw."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.bytes_received = 0
        self.resets_seen = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._on_accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        await self._server.wait_closed()

    async def wait_until(self, predicate: Callable[[EchoServer], bool]) -> None:
        async with asyncio.timeout(STEP_S), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.get_running_loop().create_task(
            self._echo(reader, writer), name=f"echo-{self.port}-{self.connections}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.bytes_received += len(data)
                await self._notify()
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionResetError:
            self.resets_seen += 1
        finally:
            writer.transport.abort()
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo.port) as started:
        yield started


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(STEP_S):
        return await reader.readexactly(len(data))


async def assert_nothing_arrives(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET_WINDOW_S):
            data = await reader.read(1)
            pytest.fail(f"expected silence, got {data!r}")


@pytest.mark.chaos
async def test_bytes_pass_through_unchanged_both_ways(echo: EchoServer, proxy: FaultProxy) -> None:
    payload = random.Random(7).randbytes(1_000_003)
    reader, writer = await connect(proxy)

    async def send() -> None:
        for start in range(0, len(payload), 4096):
            writer.write(payload[start : start + 4096])
            await writer.drain()
        writer.write_eof()

    async with asyncio.timeout(STEP_S), asyncio.TaskGroup() as group:
        group.create_task(send(), name="send-payload")
        # The echo half-closes after the client does, so read() ends at a clean EOF.
        echoed = group.create_task(reader.read(), name="read-echo")
    writer.close()

    assert echoed.result() == payload
    assert echo.bytes_received == len(payload)
    assert proxy.stats.bytes_to_upstream == proxy.stats.bytes_to_client == len(payload)
    await proxy.wait_until(lambda p: p.active_connections == 0)
    assert proxy.stats.connections_reset == 0


@pytest.mark.chaos
async def test_reset_all_is_a_connection_reset_for_both_peers(echo: EchoServer, proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"hello") == b"hello"

    assert await proxy.reset_all() == 1

    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(STEP_S):
            await reader.read()  # a clean EOF would return b"" instead
    writer.close()
    await echo.wait_until(lambda e: e.resets_seen == 1)
    assert proxy.active_connections == 0
    assert proxy.stats.connections_reset == 1

    # The proxy itself carries on.
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"again") == b"again"
    writer.close()


@pytest.mark.chaos
async def test_latency_delays_each_direction_and_keeps_order(proxy: FaultProxy) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await connect(proxy)
    proxy.set_latency(100)
    started = loop.time()
    assert await round_trip(reader, writer, b"ping") == b"ping"
    assert loop.time() - started >= 2 * 0.1 * 0.95

    # A chunk sent after the latency drops must still arrive after the delayed one before it.
    proxy.set_latency(300)
    started = loop.time()
    writer.write(b"first,")
    await proxy.wait_until(lambda p: p.stats.client_bytes_read == 4 + 6)
    proxy.set_latency(0)
    writer.write(b"second")
    async with asyncio.timeout(STEP_S):
        echoed = await reader.readexactly(12)
    assert echoed == b"first,second"
    assert loop.time() - started >= 0.3 * 0.95
    writer.close()


@pytest.mark.chaos
async def test_black_hole_holds_traffic_on_old_and_new_connections(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    old_reader, old_writer = await connect(proxy)
    assert await round_trip(old_reader, old_writer, b"before") == b"before"

    proxy.black_hole(True)
    old_writer.write(b"into the hole")
    new_reader, new_writer = await connect(proxy)
    new_writer.write(b"new")
    # The proxy reads both connections' bytes ...
    await proxy.wait_until(lambda p: p.stats.client_bytes_read == 6 + 13 + 3)
    assert proxy.stats.connections_accepted == 2
    # ... but nothing reaches either peer.
    await assert_nothing_arrives(old_reader)
    await assert_nothing_arrives(new_reader)
    assert echo.bytes_received == 6
    assert proxy.stats.bytes_to_upstream == proxy.stats.bytes_to_client == 6

    # When the path comes back, the held bytes flow, as after a partition heals.
    proxy.black_hole(False)
    async with asyncio.timeout(STEP_S):
        assert await old_reader.readexactly(13) == b"into the hole"
        assert await new_reader.readexactly(3) == b"new"
    old_writer.close()
    new_writer.close()


@pytest.mark.chaos
async def test_refuse_resets_new_connections_only(echo: EchoServer, proxy: FaultProxy) -> None:
    old_reader, old_writer = await connect(proxy)
    assert await round_trip(old_reader, old_writer, b"old") == b"old"

    proxy.refuse(True)
    reader, writer = await connect(proxy)
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(STEP_S):
            await reader.read()
    writer.close()
    assert proxy.stats.connections_refused == 1
    assert echo.connections == 1  # the refused one never reached the upstream
    assert await round_trip(old_reader, old_writer, b"still up") == b"still up"

    proxy.refuse(False)
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"back") == b"back"
    for w in (old_writer, writer):
        w.close()


@pytest.mark.chaos
async def test_set_upstream_moves_new_connections(echo: EchoServer, proxy: FaultProxy) -> None:
    old_reader, old_writer = await connect(proxy)
    assert await round_trip(old_reader, old_writer, b"one") == b"one"
    async with EchoServer() as other:
        proxy.set_upstream(other.port)
        reader, writer = await connect(proxy)
        assert await round_trip(reader, writer, b"two") == b"two"
        assert await round_trip(old_reader, old_writer, b"three") == b"three"
        assert (echo.bytes_received, other.bytes_received) == (3 + 5, 3)
        writer.close()
    old_writer.close()


@pytest.mark.chaos
async def test_unreachable_upstream_resets_the_client(echo: EchoServer) -> None:
    async with EchoServer() as gone:
        port = gone.port
    async with FaultProxy(port) as proxy:
        reader, writer = await connect(proxy)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(STEP_S):
                await reader.read()
        writer.close()
        assert proxy.stats.upstream_failures == 1


@pytest.mark.chaos
async def test_reset_every_keeps_resetting_until_stopped(proxy: FaultProxy) -> None:
    await proxy.reset_every(0.05, jitter_s=0.02)
    for round_number in range(3):
        reader, writer = await connect(proxy)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(STEP_S):
                await reader.read()
        writer.close()
        assert proxy.stats.connections_reset >= round_number + 1
    await proxy.stop_resets()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "fault-proxy-resets"]


@pytest.mark.chaos
async def test_counters_count(echo: EchoServer, proxy: FaultProxy) -> None:
    first = await connect(proxy)
    second = await connect(proxy)
    assert await round_trip(*first, b"12345") == b"12345"
    assert await round_trip(*second, b"678") == b"678"
    assert proxy.active_connections == 2

    assert await proxy.reset_all() == 2

    stats = proxy.stats
    assert (stats.connections_accepted, stats.connections_reset, stats.reset_rounds) == (2, 2, 1)
    assert (stats.client_bytes_read, stats.bytes_to_upstream) == (8, 8)
    assert (stats.upstream_bytes_read, stats.bytes_to_client) == (8, 8)
    assert proxy.active_connections == 0
    for _, writer in (first, second):
        writer.close()


@pytest.mark.chaos
async def test_close_ends_every_connection_and_leaves_no_tasks(echo: EchoServer) -> None:
    before = asyncio.all_tasks()
    proxy = FaultProxy(echo.port)
    async with proxy:
        await proxy.reset_every(60)
        proxy.set_latency(50)
        clients = [await connect(proxy) for _ in range(3)]
        for _, writer in clients:
            writer.write(b"in flight")
        await proxy.wait_until(lambda p: p.stats.client_bytes_read == 3 * 9)
        proxy.black_hole(True)
        assert proxy.active_connections == 3

    assert proxy.active_connections == 0
    leftover = asyncio.all_tasks() - before - echo.tasks
    assert not leftover, f"tasks still running after close: {[t.get_name() for t in leftover]}"
    for reader, writer in clients:
        async with asyncio.timeout(STEP_S):
            # Closed: whatever was delivered, then EOF (or a reset if data was unread).
            try:
                while await reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        writer.close()
    if echo.tasks:
        # The echo's handlers end once they see the proxy's side closed.
        await asyncio.wait(set(echo.tasks), timeout=STEP_S)
    assert asyncio.all_tasks() == before


@pytest.mark.chaos
def test_refuses_non_loopback_upstream() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        FaultProxy(50052, upstream_host="10.1.2.3")


@pytest.mark.chaos
async def test_child_process_forwards_resets_and_stops_cleanly(echo: EchoServer) -> None:
    process = await asyncio.to_thread(
        ServiceProcess, "tests.chaos.fault_proxy", ["--upstream", echo.target, "--reset-every", "1.0"]
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        assert await round_trip(reader, writer, b"via child") == b"via child"
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(STEP_S):
                await reader.read()
        writer.close()
    finally:
        code = await asyncio.to_thread(process.stop)
    assert code == 0
    stopped = [e for e in process.events() if e.get("event") == "stopped"]
    assert stopped and stopped[0]["connections_reset"] >= 1


# gRPC through the proxy --------------------------------------------------------------------


@pytest.fixture
async def stage_port(start_service: StartService) -> AsyncIterator[int]:
    """A stage's gRPC port: the LLM stub in a child process once it exists, else an in-process
    grpc.aio server with the health service and the stages' keepalive policy."""
    if (PROJECT_ROOT / "llm_stub" / "__main__.py").exists():
        stage = await asyncio.to_thread(start_service, "llm_stub", "--latency-profile", "instant")
        yield stage.port
        return
    server = grpc.aio.server(options=keepalive.server_options(0, 0))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


# The health stubs' type hints declare no methods on HealthStub, so the calls are typed here.
HealthRequest = health_pb2.HealthCheckRequest
HealthResponse = health_pb2.HealthCheckResponse


class Health:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._check: grpc.aio.UnaryUnaryMultiCallable[HealthRequest, HealthResponse] = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthRequest.SerializeToString,
            response_deserializer=HealthResponse.FromString,
        )
        self._watch: grpc.aio.UnaryStreamMultiCallable[HealthRequest, HealthResponse] = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=HealthRequest.SerializeToString,
            response_deserializer=HealthResponse.FromString,
        )

    async def check(self) -> None:
        response = await self._check(HealthRequest(), timeout=STEP_S)
        assert response.status == SERVING

    async def start_watch(self) -> grpc.aio.UnaryStreamCall[HealthRequest, HealthResponse]:
        """A server-streaming call that stays in flight; returns once its first message arrived."""
        watch = self._watch(HealthRequest(), timeout=120)
        async with asyncio.timeout(STEP_S):
            first = await watch.read()
        assert isinstance(first, HealthResponse) and first.status == SERVING
        return watch


@pytest.mark.chaos
async def test_grpc_call_fails_unavailable_on_reset_and_channel_reconnects(stage_port: int) -> None:
    async with (
        FaultProxy(stage_port) as proxy,
        # With the retry policy, a Check that races the reset (sent on the dying connection:
        # "Broken pipe") is retried on the new one.
        grpc.aio.insecure_channel(proxy.target, options=stage_channel_options("pick_first", "")) as channel,
    ):
        health_service = Health(channel)
        await health_service.check()
        watch = await health_service.start_watch()

        await proxy.reset_all()

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async with asyncio.timeout(STEP_S):
                await watch.read()
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        # No wait_for_ready: the same channel reconnects for the next call by itself.
        await health_service.check()
        assert proxy.stats.connections_accepted >= 2


@pytest.mark.chaos
async def test_grpc_keepalive_detects_black_hole_with_call_in_flight(stage_port: int) -> None:
    loop = asyncio.get_running_loop()
    async with (
        FaultProxy(stage_port) as proxy,
        # The orchestrator's channel options: with its retry policy, the Check after the black
        # hole lifts that races the dead connection's close ("Delayed close due to in-progress
        # write (ping timeout)") is retried on the new one.
        grpc.aio.insecure_channel(proxy.target, options=stage_channel_options("pick_first", "")) as channel,
    ):
        health_service = Health(channel)
        await health_service.check()
        watch = await health_service.start_watch()

        proxy.black_hole(True)
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async with asyncio.timeout(KEEPALIVE_DETECTION_S + STEP_S):
                await watch.read()
        detected_s = loop.time() - started
        print(f"keepalive detected the black hole (call in flight) after {detected_s:.2f} s")
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        assert detected_s <= KEEPALIVE_DETECTION_S + 1.0

        proxy.black_hole(False)
        await health_service.check()
        assert proxy.stats.connections_accepted == 2


@pytest.mark.chaos
async def test_grpc_keepalive_detects_black_hole_on_idle_channel(stage_port: int) -> None:
    loop = asyncio.get_running_loop()
    async with (
        FaultProxy(stage_port) as proxy,
        grpc.aio.insecure_channel(proxy.target, options=stage_channel_options("pick_first", "")) as channel,
    ):
        health_service = Health(channel)
        await health_service.check()
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        proxy.black_hole(True)
        started = loop.time()
        async with asyncio.timeout(KEEPALIVE_DETECTION_S + STEP_S):
            await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        detected_s = loop.time() - started
        print(f"keepalive detected the black hole (idle channel) after {detected_s:.2f} s")
        assert detected_s <= KEEPALIVE_DETECTION_S + 1.0

        proxy.black_hole(False)
        await health_service.check()
        assert proxy.stats.connections_accepted == 2
