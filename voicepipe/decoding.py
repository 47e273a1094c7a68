"""Request messages are parsed by the runtime, so that bytes which do not parse as the method's
request type end the call with INVALID_ARGUMENT naming that type, one warning line and a count.

Left to grpc.aio, a deserializer's exception becomes UNKNOWN "Unexpected <class DecodeError>" and
an error-level traceback per message: for a unary request it is raised before any handler or
interceptor code runs, for a streaming request inside the handler's own loop over the requests.
So the handler is given the raw bytes (`request_deserializer=None`) and this interceptor parses
them where the call's context is at hand. INVALID_ARGUMENT rather than the INTERNAL that gRPC's
own libraries send: the client's bytes are at fault, not the server, and a caller must not retry
them (the orchestrator retries INTERNAL from a stage as transient)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from voicepipe.audio_format import InvalidInput
from voicepipe.handlers import CallHooks, drain, wrap_handler
from voicepipe.metrics import SERVER_MALFORMED_MESSAGES

log = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


class MalformedRequest(InvalidInput):
    """A request message whose bytes do not parse as the method's request type. Handlers that
    answer InvalidInput with INVALID_ARGUMENT answer it too; one that lets it escape gets the
    same status from the interceptor."""


def message_type(deserializer: Deserializer) -> str:
    """The full name of the message a generated `Message.FromString` parses."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


class _CallDecoder:
    """Parses one call's request messages, counting and logging the first that does not parse."""

    def __init__(self, deserializer: Deserializer, type_name: str, path: str) -> None:
        self._deserializer = deserializer
        self._type_name = type_name
        self._path = path
        self._received = 0

    def decode(self, raw: bytes) -> Any:
        self._received += 1
        try:
            return self._deserializer(raw)
        except DecodeError as error:
            _, service, method = self._path.split("/")
            SERVER_MALFORMED_MESSAGES.labels(service, method).inc()
            # One line, no traceback: the call ends here, so a client sending garbage gets one
            # line per call, like any other rejected call.
            log.warning(
                "malformed request",
                extra={
                    "method": self._path,
                    "message_type": self._type_name,
                    "message_number": self._received,
                    "message_bytes": len(raw),
                },
            )
            raise MalformedRequest(
                f"request message {self._received} of the call ({len(raw)} bytes) does not parse as"
                f" {self._type_name}: {error}"
            ) from None

    async def decode_stream(self, raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_messages:
            try:
                message = self.decode(raw)
            except MalformedRequest:
                await drain(raw_messages)  # the call ends: let the client finish writing first
                raise
            yield message


def _decoding_handler(handler: Any, type_name: str, path: str) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer: Deserializer = handler.request_deserializer
    request_streaming: bool = handler.request_streaming

    def requests(raw: Any) -> Any:
        decoder = _CallDecoder(deserializer, type_name, path)
        return decoder.decode_stream(raw) if request_streaming else decoder.decode(raw)

    @contextlib.asynccontextmanager
    async def decoded(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[CallHooks]:
        try:
            yield CallHooks(requests=requests)
        except MalformedRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    result: grpc.RpcMethodHandler[Any, Any] = wrap_handler(handler, decoded, request_deserializer=None)
    return result


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Hands every handler its requests parsed by the runtime (see the module's docstring)."""

    def __init__(self) -> None:
        self._type_names: dict[str, str] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        original = await continuation(handler_call_details)
        handler: Any = original
        if handler is None or handler.request_deserializer is None:
            return original
        path = handler_call_details.method
        type_name = self._type_names.get(path)
        if type_name is None:
            type_name = self._type_names[path] = message_type(handler.request_deserializer)
        return _decoding_handler(handler, type_name, path)
