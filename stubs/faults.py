"""Fault knobs for tests and chaos runs; all off unless a flag turns them on.

They act on a server's own streaming RPCs (never on health or reflection), as an interceptor
any server can be given (`FaultSettings.interceptors()`):
- `--fault-fail-first N`: the first N calls fail with UNAVAILABLE before any response;
- `--fault-stall-after K`: after K responses the call sends nothing more, not even its status,
  until cancelled;
- `--fault-break-after K`: after K responses the call fails with UNAVAILABLE;
- `--fault-calls M`: stall/break only the first M calls after the failed ones (0: every call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from voicepipe.config import FlagParser
from voicepipe.handlers import CallHooks, wrap_handler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultSettings:
    fail_first: int = 0
    stall_after: int = -1
    break_after: int = -1
    calls: int = 0

    @property
    def enabled(self) -> bool:
        return self.fail_first > 0 or self.stall_after >= 0 or self.break_after >= 0

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The fault interceptor when a knob is on, else none."""
        if not self.enabled:
            return []
        log.warning("fault injection enabled", extra={"faults": repr(self)})
        return [FaultInjector(self)]

    @staticmethod
    def add_flags(flags: FlagParser) -> None:
        flags.add(
            "--fault-fail-first",
            type=int,
            default=0,
            help="fail the first N calls with UNAVAILABLE",
        )
        flags.add(
            "--fault-stall-after",
            type=int,
            default=-1,
            help="stall calls after K responses (-1: off)",
        )
        flags.add(
            "--fault-break-after",
            type=int,
            default=-1,
            help="break calls with UNAVAILABLE after K responses (-1: off)",
        )
        flags.add(
            "--fault-calls",
            type=int,
            default=0,
            help="apply stall/break to the first M calls only (0: all)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FaultSettings:
        return cls(args.fault_fail_first, args.fault_stall_after, args.fault_break_after, args.fault_calls)


# Services the knobs leave alone: probes and tools must keep working under injected faults.
UNTOUCHED_SERVICES = ("/grpc.health.v1.", "/grpc.reflection.")


class FaultInjector(grpc.aio.ServerInterceptor):
    """Applies FaultSettings to the server's streaming RPCs (health and reflection excepted)."""

    def __init__(self, settings: FaultSettings) -> None:
        self._settings = settings
        self._calls = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        original = await continuation(handler_call_details)
        handler: Any = original
        if (
            handler is None
            or not handler.response_streaming
            or handler_call_details.method.startswith(UNTOUCHED_SERVICES)
        ):
            return original
        settings = self._settings
        self._calls += 1
        call_number = self._calls
        injected = settings.calls == 0 or call_number <= settings.fail_first + settings.calls

        @contextlib.asynccontextmanager
        async def faulty(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[CallHooks]:
            if call_number <= settings.fail_first:
                log.warning("fault: failing call", extra={"call": call_number})
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"fault injection: call {call_number} fails")
            sent = 0

            async def stall_here() -> None:
                if injected and sent == settings.stall_after:
                    log.warning("fault: stalling call", extra={"call": call_number, "after": sent})
                    await asyncio.Event().wait()  # until the client cancels or the deadline passes

            async def before_response(response: Any) -> None:
                nonlocal sent
                await stall_here()
                if injected and sent == settings.break_after:
                    log.warning("fault: breaking call", extra={"call": call_number, "after": sent})
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"fault injection: stream broken after {sent} messages"
                    )
                sent += 1

            yield CallHooks(sent=before_response)
            await stall_here()  # K was every response: the call does not end either

        wrapped: grpc.RpcMethodHandler[Any, Any] = wrap_handler(handler, faulty)
        return wrapped


class _FaultKnobs:
    """The knobs as a server extension (voicepipe.stage.main.ServerExtension): their flags, and
    the interceptor they ask for."""

    def add_flags(self, flags: FlagParser) -> None:
        FaultSettings.add_flags(flags)

    def interceptors(self, args: argparse.Namespace) -> list[grpc.aio.ServerInterceptor]:
        return FaultSettings.from_args(args).interceptors()


FAULT_KNOBS = _FaultKnobs()
