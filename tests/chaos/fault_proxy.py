"""A fault-injecting TCP proxy on loopback, placed between a gRPC client and a stage server.

It forwards every connection accepted on 127.0.0.1 to an upstream loopback port, byte for byte,
and injects network faults on demand: TCP resets (once or every few seconds), per-direction
latency, a black hole (bytes are read but held back, as on a dead path), refusal of new
connections, and a switch of upstream port. Used in-process by tests:

    async with FaultProxy(stage_port) as proxy:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
        await proxy.reset_all()

or as a child process, with faults chosen by flags only:

    python -m tests.chaos.fault_proxy --upstream 127.0.0.1:PORT [--listen-port 0] [--reset-every S]

which logs one JSON line {"event": "ready", "port": N, ...} on stderr and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import ipaddress
import itertools
import logging
import random
import signal
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType

from voicepipe.logs import configure_logging

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_CHUNK_BYTES = 64 * 1024
# Chunks held per direction before the proxy stops reading: beyond this the sender feels TCP
# back-pressure, as it would behind a slow or dead path.
_QUEUE_CHUNKS = 256
_CONNECT_TIMEOUT_S = 5.0
_MIN_RESET_INTERVAL_S = 0.01
# SO_LINGER on with a zero timeout: close() discards unsent data and sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    connections_accepted: int = 0
    # Client connections reset on purpose: by reset_all(), reset_every() or refuse().
    connections_reset: int = 0
    connections_refused: int = 0
    reset_rounds: int = 0
    # Accepted connections whose upstream could not be reached (the client gets a reset).
    upstream_failures: int = 0
    client_bytes_read: int = 0
    upstream_bytes_read: int = 0
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0


def require_loopback(host: str) -> None:
    """Chaos traffic stays on this machine: anything but a loopback address is refused."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} (the proxy only talks to loopback)") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address")


def _reset_transport(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Fails only if the socket is already closed, and then there is nothing to reset.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


async def _cancel_and_wait(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancels the tasks and waits until every one has ended, even if cancelled meanwhile."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    interrupted = False
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            # The tasks are already cancelled; leaving now would orphan them.
            interrupted = True
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("proxy task failed", exc_info=error, extra={"task": task.get_name()})
    if interrupted:
        raise asyncio.CancelledError


class _Kind(enum.Enum):
    DATA = enum.auto()
    EOF = enum.auto()
    RESET = enum.auto()


@dataclass(frozen=True)
class _Item:
    release_at: float
    kind: _Kind
    data: bytes = b""


class _Direction:
    """One way through a connection: source -> FIFO with release times -> destination. A FIFO,
    not a sleep per chunk, so that a change of latency can never reorder bytes."""

    def __init__(
        self,
        proxy: FaultProxy,
        source: asyncio.StreamReader,
        destination: asyncio.StreamWriter,
        *,
        to_upstream: bool,
    ) -> None:
        self._proxy = proxy
        self._source = source
        self._destination = destination
        self._to_upstream = to_upstream
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)

    async def read_loop(self) -> None:
        """Reads until EOF or reset; both are queued behind the data, as on the wire."""
        while True:
            try:
                data = await self._source.read(_CHUNK_BYTES)
            except OSError:
                await self._queue.put(_Item(self._proxy._release_time(), _Kind.RESET))
                return
            if not data:
                await self._queue.put(_Item(self._proxy._release_time(), _Kind.EOF))
                return
            self._proxy._record_read(len(data), to_upstream=self._to_upstream)
            await self._queue.put(_Item(self._proxy._release_time(), _Kind.DATA, data))

    async def send_loop(self) -> bool:
        """Forwards queued chunks when due and while the path is open. True when the source's
        EOF was passed on; False when the connection must be reset."""
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            delay = item.release_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the injected latency itself
            await self._proxy._path_open.wait()
            if item.kind is _Kind.RESET:
                return False
            if item.kind is _Kind.EOF:
                try:
                    if self._destination.can_write_eof():
                        self._destination.write_eof()
                except OSError:  # the destination has gone meanwhile
                    return False
                return True
            try:
                self._destination.write(item.data)
                self._proxy._record_forwarded(len(item.data), to_upstream=self._to_upstream)
                await self._destination.drain()
            except OSError:
                return False


class _Ending(enum.Enum):
    GRACEFUL = enum.auto()  # both directions reached EOF: close normally
    RESET = enum.auto()  # RST on both sockets
    ABORT = enum.auto()  # proxy closing or an unexpected error: close without flushing


class _Connection:
    """One accepted client connection and its upstream connection."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._ending = _Ending.ABORT
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"fault-proxy-conn-{number}")

    def reset(self) -> bool:
        """Sends RST to both peers now and ends the connection; False if it was already reset."""
        if self._ending is _Ending.RESET:
            return False
        self._ending = _Ending.RESET
        self._reset_sockets()
        self.task.cancel()
        return True

    def _writers(self) -> list[asyncio.StreamWriter]:
        writers = [self._client_writer]
        if self._upstream_writer is not None:
            writers.append(self._upstream_writer)
        return writers

    def _reset_sockets(self) -> None:
        for writer in self._writers():
            _reset_transport(writer)

    async def _run(self) -> None:
        tasks: list[asyncio.Task[object]] = []
        try:
            proxy = self._proxy
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    upstream_reader, self._upstream_writer = await asyncio.open_connection(
                        proxy.upstream_host, proxy.upstream_port
                    )
            except OSError:  # refused, unreachable or timed out (TimeoutError is an OSError)
                proxy._record_upstream_failure()
                self._ending = _Ending.RESET
                return
            name = self.task.get_name()
            up = _Direction(proxy, self._client_reader, self._upstream_writer, to_upstream=True)
            down = _Direction(proxy, upstream_reader, self._client_writer, to_upstream=False)
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(up.read_loop(), name=f"{name}-read-client"),
                loop.create_task(down.read_loop(), name=f"{name}-read-upstream"),
            ]
            senders: set[asyncio.Task[bool]] = {
                loop.create_task(up.send_loop(), name=f"{name}-send-upstream"),
                loop.create_task(down.send_loop(), name=f"{name}-send-client"),
            }
            tasks += senders
            while senders:
                done, senders = await asyncio.wait(senders, return_when=asyncio.FIRST_COMPLETED)
                if any(task.exception() is not None or not task.result() for task in done):
                    # One peer reset (or a write failed): the other peer hears of it as a reset too.
                    self._ending = _Ending.RESET
                    return
            self._ending = _Ending.GRACEFUL
        finally:
            await _cancel_and_wait(tasks)
            self._close()
            self._proxy._forget(self)

    def _close(self) -> None:
        if self._ending is _Ending.RESET:
            self._reset_sockets()
        elif self._ending is _Ending.GRACEFUL:
            for writer in self._writers():
                writer.close()
        else:
            for writer in self._writers():
                writer.transport.abort()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (port chosen by the OS unless given) to a loopback upstream
    port, with faults that can be switched at run time. Use as an async context manager."""

    def __init__(
        self, upstream_port: int, *, upstream_host: str = LOOPBACK, listen_port: int = 0, seed: int = 0
    ) -> None:
        require_loopback(upstream_host)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.stats = ProxyStats()
        self._listen_port = listen_port
        self._rng = random.Random(seed)
        self._latency_s = 0.0
        self._refusing = False
        # Set while traffic flows; cleared by black_hole(True).
        self._path_open = asyncio.Event()
        self._path_open.set()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._reset_task: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._server is not None or self._closed:
            raise RuntimeError("a FaultProxy starts once")
        self._server = await asyncio.start_server(self._on_accept, LOOPBACK, self._listen_port)
        bound = [sock.getsockname() for sock in self._server.sockets]
        # Never listen on anything but loopback, whatever the platform makes of the host.
        assert len(bound) == 1 and bound[0][0] == LOOPBACK, f"proxy bound to {bound}"
        self._port = int(bound[0][1])

    async def close(self) -> None:
        """Stops listening, stops the reset loop and closes every connection."""
        if self._closed:
            return
        self._closed = True
        await self.stop_resets()
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        await _cancel_and_wait(connection.task for connection in connections)
        if self._server is not None:
            await self._server.wait_closed()
        self._notify()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    # Faults -----------------------------------------------------------------------------

    async def reset_all(self) -> int:
        """Resets every current connection (RST to both peers); returns how many there were."""
        connections = list(self._connections)
        reset = sum(connection.reset() for connection in connections)
        self.stats.connections_reset += reset
        self.stats.reset_rounds += 1
        self._notify()
        if connections:
            log.info("reset connections", extra={"connections": reset})
            # Their sockets are closed by the time their tasks end, so the RSTs are on the wire.
            await asyncio.wait([connection.task for connection in connections])
        return reset

    async def reset_every(self, every_s: float, jitter_s: float = 0.0) -> None:
        """Resets all connections about every `every_s` seconds, +/- up to `jitter_s` (drawn
        from the proxy's seeded generator), until stop_resets() or close()."""
        if every_s <= 0 or not 0 <= jitter_s < every_s:
            raise ValueError(f"need every_s > 0 and 0 <= jitter_s < every_s, got {every_s}, {jitter_s}")
        if self._closed:
            raise RuntimeError("the proxy is closed")
        await self.stop_resets()
        self._reset_task = asyncio.get_running_loop().create_task(
            self._reset_loop(every_s, jitter_s), name="fault-proxy-resets"
        )

    async def stop_resets(self) -> None:
        if self._reset_task is not None:
            task, self._reset_task = self._reset_task, None
            await _cancel_and_wait([task])

    def set_latency(self, ms: float) -> None:
        """Delays every chunk by `ms` in each direction, from now on (order is kept)."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")
        self._latency_s = ms / 1000

    def black_hole(self, on: bool) -> None:
        """While on, connections are accepted and bytes read but nothing is forwarded either
        way, on new and existing connections: a dead path that only keepalive can detect.
        Held bytes (and EOFs and resets) flow again once it is off, as after a partition heals."""
        if on:
            self._path_open.clear()
        else:
            self._path_open.set()

    def refuse(self, on: bool) -> None:
        """While on, new connections are accepted and reset at once."""
        self._refusing = on

    def set_upstream(self, port: int) -> None:
        """New connections go to this upstream port; existing ones keep theirs."""
        self.upstream_port = port

    async def wait_until(self, predicate: Callable[[FaultProxy], bool], limit_s: float = 5.0) -> None:
        """Returns once `predicate(proxy)` holds (re-checked on every counter change); raises
        TimeoutError after `limit_s` seconds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit_s):
            while not predicate(self):
                waiter = loop.create_future()
                self._waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._waiters.discard(waiter)

    # Internals --------------------------------------------------------------------------

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine, so asyncio creates no unnamed task per connection.
        if self._closed:
            writer.transport.abort()
            return
        self.stats.connections_accepted += 1
        if self._refusing:
            self.stats.connections_refused += 1
            self.stats.connections_reset += 1
            _reset_transport(writer)
        else:
            self._connections.add(_Connection(self, next(self._numbers), reader, writer))
        self._notify()

    async def _reset_loop(self, every_s: float, jitter_s: float) -> None:
        while not self._closed:
            delay = every_s + self._rng.uniform(-jitter_s, jitter_s)
            await asyncio.sleep(max(delay, _MIN_RESET_INTERVAL_S))  # the reset schedule itself
            await self.reset_all()

    def _release_time(self) -> float:
        return asyncio.get_running_loop().time() + self._latency_s

    def _record_read(self, size: int, *, to_upstream: bool) -> None:
        if to_upstream:
            self.stats.client_bytes_read += size
        else:
            self.stats.upstream_bytes_read += size
        self._notify()

    def _record_forwarded(self, size: int, *, to_upstream: bool) -> None:
        if to_upstream:
            self.stats.bytes_to_upstream += size
        else:
            self.stats.bytes_to_client += size
        self._notify()

    def _record_upstream_failure(self) -> None:
        self.stats.upstream_failures += 1
        self._notify()

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._notify()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


# Child process ----------------------------------------------------------------------------


def _loopback_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        require_loopback(host)
        if not sep or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in {text!r}")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (expected 127.0.0.1:PORT)") from None
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    host, port = args.upstream
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers before "ready", so a SIGTERM sent right after it is a clean stop, not a kill.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with FaultProxy(
            port, upstream_host=host, listen_port=args.listen_port, seed=args.seed
        ) as proxy:
            proxy.set_latency(args.latency_ms)
            if args.reset_every > 0:
                await proxy.reset_every(args.reset_every, args.reset_jitter)
            log.info("ready", extra={"port": proxy.port, "upstream": f"{host}:{port}"})
            await stop.wait()
        log.info("stopped", extra=asdict(proxy.stats))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.fault_proxy",
        description="Fault-injecting TCP proxy from 127.0.0.1 to a loopback upstream.",
    )
    parser.add_argument("--upstream", required=True, type=_loopback_target, help="127.0.0.1:PORT")
    parser.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 (0: the OS chooses)")
    parser.add_argument("--reset-every", type=float, default=0.0, help="reset all connections every S s")
    parser.add_argument("--reset-jitter", type=float, default=0.0, help="+/- seconds on each reset interval")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency added in each direction")
    parser.add_argument("--seed", type=int, default=0, help="seed for the reset jitter")
    parser.add_argument("--log-level", default="info", help="log level")
    args = parser.parse_args(argv)
    configure_logging("fault_proxy", args.log_level)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
