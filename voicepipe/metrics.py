"""Prometheus metrics for every server: RPC metrics named as go-grpc-prometheus names them,
plus process-level gauges that make leaks visible (asyncio tasks, RPCs in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from voicepipe.handlers import CallHooks, wrap_handler

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    (*_LABELS, "grpc_code"),
)
SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its completion by the server.",
    _LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Stream messages received by the server.", _LABELS
)
SERVER_MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.", _LABELS)
SERVER_RETRIED = Counter(
    "voicepipe_server_retried_calls_total",
    "Calls that arrived as a client's retry attempt (gRFC A6 grpc-previous-rpc-attempts header):"
    " retries made by clients' channels, which their own code cannot see.",
    ("grpc_service", "grpc_method"),
)
SERVER_MALFORMED_MESSAGES = Counter(
    "voicepipe_server_malformed_messages_total",
    "Request messages whose bytes did not parse as the method's request type (the call ends"
    " with INVALID_ARGUMENT).",
    ("grpc_service", "grpc_method"),
)
RPCS_IN_FLIGHT = Gauge(
    "voicepipe_rpcs_in_flight", "RPCs currently being handled.", ("grpc_service", "grpc_method")
)


def _rpc_type(handler: Any) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _final_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    # grpc.aio reports codes set by abort() as the raw cygrpc enum value.
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class _RpcObserver:
    """Counts one RPC's messages and records its outcome."""

    def __init__(self, rpc_type: str, service: str, method: str, request_streaming: bool) -> None:
        self.labels = (rpc_type, service, method)
        self._service_method = (service, method)
        self._request_streaming = request_streaming
        self._started = time.perf_counter()
        # Label lookups take a lock: once per call, not once per message.
        self._received = SERVER_MSG_RECEIVED.labels(*self.labels)
        self._sent = SERVER_MSG_SENT.labels(*self.labels)
        SERVER_STARTED.labels(*self.labels).inc()
        RPCS_IN_FLIGHT.labels(*self._service_method).inc()

    def requests(self, request: Any) -> Any:
        """The handler's request argument, counted as it is consumed."""
        if not self._request_streaming:
            self._received.inc()
            return request
        return self._count_received(request)

    async def _count_received(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            self._received.inc()
            yield request

    async def sent(self, response: Any) -> None:
        self._sent.inc()

    @contextlib.contextmanager
    def outcome(self, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
        """Records the status code the handler ends with, and its duration."""
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = _final_code(context)
        except grpc.aio.AbortError:
            code = _final_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the call was cancelled, or its stream closed
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            SERVER_HANDLED.labels(*self.labels, code.name).inc()
            SERVER_HANDLING_SECONDS.labels(*self.labels).observe(time.perf_counter() - self._started)
            RPCS_IN_FLIGHT.labels(*self._service_method).dec()


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler to record go-grpc-prometheus server metrics."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        _, service, method = handler_call_details.method.split("/")
        rpc_type = _rpc_type(handler)
        metadata = handler_call_details.invocation_metadata or ()
        if any(key == "grpc-previous-rpc-attempts" for key, _ in metadata):
            SERVER_RETRIED.labels(service, method).inc()
        request_streaming: bool = handler.request_streaming

        @contextlib.asynccontextmanager
        async def observed(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[CallHooks]:
            observer = _RpcObserver(rpc_type, service, method, request_streaming)
            with observer.outcome(context):
                yield CallHooks(requests=observer.requests, sent=observer.sent)

        wrapped: grpc.RpcMethodHandler[Any, Any] = wrap_handler(handler, observed)
        return wrapped


def start_metrics_endpoint(host: str, port: int) -> int:
    """Serves /metrics over HTTP on a daemon thread; returns the bound port."""
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    return int(server.server_port)


def watch_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Exports the loop's task count: after sessions end it must return to its idle value."""
    Gauge("voicepipe_asyncio_tasks", "asyncio tasks alive in the server's event loop.").set_function(
        lambda: len(asyncio.all_tasks(loop))
    )
