"""The runtime every voicepipe server shares: gRPC bootstrap, health, reflection, metrics,
JSON logs, keepalive policy and graceful shutdown. A service supplies only its servicers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voicepipe import keepalive
from voicepipe.decoding import RequestDecodingInterceptor
from voicepipe.logs import configure_logging
from voicepipe.metrics import ServerMetricsInterceptor, start_metrics_endpoint, watch_event_loop
from voicepipe.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A grpc.health.v1 service name that is SERVING from start until SIGTERM, whatever the server's
# readiness (""): its event loop answers. Liveness probes ask for it, so a server that is up but
# not ready (a stage whose backend is down, an orchestrator whose stages are) is not restarted.
LIVENESS = "liveness"


class _StatusRecorder:
    """Wraps a Watch call's context to notice when a not-SERVING status has been sent."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.not_serving_sent = asyncio.Event()

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if response.status != SERVING:
            self.not_serving_sent.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end once they have told their client NOT_SERVING
    during shutdown. The library's Watch never ends, so each open Watch (the orchestrator keeps
    one per stage) would hold `server.stop(grace)` for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining.set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        recorder = _StatusRecorder(context)

        async def drained() -> None:
            await self._draining.wait()
            await recorder.not_serving_sent.wait()

        watch = asyncio.create_task(super().Watch(request, cast(Any, recorder)), name="health-watch")
        drain = asyncio.create_task(drained(), name="health-watch-drain")
        try:
            await asyncio.wait([watch, drain], return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.result()  # the library's errors (like an abort) reach the client
        finally:
            for task in (watch, drain):
                task.cancel()
            await asyncio.gather(watch, drain, return_exceptions=True)


@dataclass(frozen=True)
class Registration:
    """One gRPC service to host: its full name (as health and reflection see it), the generated
    `add_XServicer_to_server` function, and the servicer."""

    full_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object


def runtime_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What the runtime wraps every handler in, outermost first: metrics, then request parsing
    (so a call ended by a malformed request is counted with its status)."""
    return [ServerMetricsInterceptor(), RequestDecodingInterceptor()]


class GrpcService:
    """A grpc.aio server with the shared runtime around the given registrations."""

    health: DrainingHealthServicer
    port: int
    metrics_port: int

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        registrations: Sequence[Registration],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`interceptors` run inside the runtime's own, around every handler: they see parsed
        requests."""
        self.name = name
        self.settings = settings
        self.registrations = tuple(registrations)
        self.server = grpc.aio.server(
            interceptors=[*runtime_interceptors(), *interceptors],
            options=keepalive.server_options(
                settings.max_connection_age_s, settings.max_connection_age_grace_s
            ),
        )
        self.health = DrainingHealthServicer()
        self._drained = False
        for registration in self.registrations:
            registration.add_to_server(registration.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [
                    *(r.full_name for r in self.registrations),
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                self.server,
            )
        self.port = 0
        self.metrics_port = -1

    async def start(self, *, serving: bool = True) -> None:
        """Binds, starts serving, and logs the "ready" line with the bound ports."""
        watch_event_loop(asyncio.get_running_loop())
        await self.health.set(LIVENESS, SERVING)
        await self.set_serving(serving)
        address = f"{self.settings.host}:{self.settings.port}"
        tls = self.settings.tls
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            try:
                credentials = tls.credentials()
            except ValueError as error:
                raise SystemExit(f"cannot serve TLS: {error}") from None
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port}")
        if self.settings.metrics_port >= 0:
            self.metrics_port = start_metrics_endpoint(self.settings.host, self.settings.metrics_port)
        await self.server.start()
        log.info(
            "ready",
            extra={
                "host": self.settings.host,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "tls": tls.mode if tls else "off",
                "reflection": self.settings.reflection,
            },
        )

    async def set_serving(self, serving: bool) -> None:
        """Sets the health of every hosted service and of the server as a whole ("")."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *(r.full_name for r in self.registrations)):
            await self.health.set(name, status)

    async def drain(self) -> None:
        """Health goes NOT_SERVING at once while new calls are still accepted for
        `--drain-delay`, so that endpoints and load balancers stop sending them."""
        if self._drained:
            return
        self._drained = True
        delay_s = self.settings.drain_delay_s
        log.info("draining", extra={"drain_delay_s": delay_s})
        await self.health.enter_graceful_shutdown()
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    async def stop(self) -> None:
        """The drain (unless drain() ran already), then the server stops accepting and in-flight
        calls get `--shutdown-grace` to finish."""
        await self.drain()
        log.info("shutting down", extra={"grace_s": self.settings.shutdown_grace_s})
        await self.server.stop(self.settings.shutdown_grace_s)
        log.info("stopped")


async def wait_for_shutdown_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, received.set)
    try:
        await received.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve_until_signal(service: GrpcService) -> None:
    """Runs a service until SIGTERM/SIGINT, then shuts it down gracefully."""
    await service.start()
    try:
        await wait_for_shutdown_signal()
    finally:
        await service.stop()


def run(main: Coroutine[Any, Any, None], service: str, settings: ServerSettings) -> None:
    """Process entry point: JSON logging, then the event loop (asyncio's or uvloop)."""
    configure_logging(service, settings.log_level)
    if settings.event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
