"""Server-side handling of calls shared by every service.

`wrap_handler` is the one way for a server interceptor to wrap a method handler: it builds a
handler of the same kind (unary or streaming requests and responses) whose every call runs inside
the interceptor's own async context manager. The context manager sees the call start and end
(the exception it ends with, AbortError and cancellation included, passes through it) and yields
the call's `CallHooks`: what the handler is given as its request argument, and what happens as
each response goes out.

`drain` is how a call that ends a request stream early for bad input lets the client finish
writing first, so that it reads the real status."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc

from voicepipe.audio_format import InvalidInput

Context = grpc.aio.ServicerContext[Any, Any]
# A call ended for bad input reads on what its client still sends (see drain()) for at most
# DRAIN_S, and stops once nothing has come for QUIET_S: a client waiting for the answer waits
# that much longer for it.
DRAIN_S = 2.0
QUIET_S = 0.25


async def drain(requests: AsyncIterator[Any], seconds: float = DRAIN_S, quiet_s: float = QUIET_S) -> None:
    """Reads and drops what the client still sends, until it half-closes, sends more bad input,
    is quiet for `quiet_s` or `seconds` pass. A status sent while the client is still writing can
    reach it as INTERNAL instead of the status itself (grpc/grpc#36066): a call rejected
    mid-stream drains the stream before it ends, so that a client that writes on still reads the
    real code and message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with contextlib.suppress(StopAsyncIteration, TimeoutError, InvalidInput):
        while (left := deadline - loop.time()) > 0:
            async with asyncio.timeout(min(quiet_s, left)):
                await anext(requests)


async def _nothing(response: Any) -> None:
    return None


def _unchanged(request: Any) -> Any:
    return request


@dataclass(frozen=True)
class CallHooks:
    """`requests` turns the request argument (a message, or an async iterator of them) into what
    the wrapped handler receives; `sent` is awaited before each response goes out (it may abort
    the call or hold the response back)."""

    requests: Callable[[Any], Any] = _unchanged
    sent: Callable[[Any], Awaitable[None]] = _nothing


OpenCall = Callable[[Context], AbstractAsyncContextManager[CallHooks]]
_SAME: Any = object()


def wrap_handler(handler: Any, open_call: OpenCall, *, request_deserializer: Any = _SAME) -> Any:
    """`handler` (a grpc.RpcMethodHandler) with each call run inside `open_call(context)`.
    `request_deserializer` replaces the handler's own (None: the handler gets the raw bytes)."""
    request_streaming: bool = handler.request_streaming
    deserializer = handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    if handler.response_streaming:
        behavior = handler.stream_stream if request_streaming else handler.unary_stream

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async with open_call(context) as hooks:
                result = behavior(hooks.requests(request), context)
                if not hasattr(result, "__aiter__"):  # handlers that use context.write()
                    await result
                    return
                # aclosing: a cancelled call closes the handler's generator now, not at GC.
                async with contextlib.aclosing(result) as responses:
                    async for response in responses:
                        await hooks.sent(response)
                        yield response

        streaming_factory = (
            grpc.stream_stream_rpc_method_handler
            if request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return streaming_factory(
            streaming, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )

    behavior_unary = handler.stream_unary if request_streaming else handler.unary_unary

    async def unary(request: Any, context: Context) -> Any:
        async with open_call(context) as hooks:
            response = await behavior_unary(hooks.requests(request), context)
            await hooks.sent(response)
            return response

    unary_factory = (
        grpc.stream_unary_rpc_method_handler if request_streaming else grpc.unary_unary_rpc_method_handler
    )
    return unary_factory(
        unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
    )
