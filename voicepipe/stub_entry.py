"""What every stage stub's entry point and streaming handler share: the flags (server, latency
profile, fault knobs), the process bootstrap, and reading the config that opens a stream."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from stubs import latency
from stubs.faults import FaultSettings
from stubs.latency import LatencyProfile
from voicepipe.audio_format import InvalidInput
from voicepipe.config import FlagParser, ServerSettings
from voicepipe.logs import bind_correlation
from voicepipe.server import GrpcService, run, serve_until_signal

log = logging.getLogger(__name__)

Settings = TypeVar("Settings")
BuildService = Callable[[ServerSettings, LatencyProfile, FaultSettings], GrpcService]


def parse_stage_args(
    stage: str, description: str, *, port: int, metrics_port: int, argv: list[str] | None = None
) -> argparse.Namespace:
    flags = FlagParser(stage, description)
    ServerSettings.add_flags(flags, port=port, metrics_port=metrics_port)
    latency.add_flags(flags, stage)
    FaultSettings.add_flags(flags)
    return flags.parse(argv)


def run_stage(args: argparse.Namespace, stage: str, build_service: BuildService) -> None:
    async def serve() -> None:
        # Built inside the running loop: grpc.aio binds a server to the loop it was created in.
        service = build_service(
            ServerSettings.from_args(args), latency.from_args(args, stage), FaultSettings.from_args(args)
        )
        await serve_until_signal(service)

    run(serve(), f"{stage}_stub", ServerSettings.from_args(args))


async def open_stream(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
    data_field: str,
    data_name: str,
    parse: Callable[[Any], Settings],
) -> Settings:
    """Reads the config that opens a stream, tags the call's log lines with its correlation ids
    and validates it with `parse`; a bad start ends the call with INVALID_ARGUMENT and the reason,
    a good one is accepted at once (see accept()).
    (grpc.aio runs each call in its own task, so the ids stay with this call.)"""
    try:
        config = await read_config(requests, data_field, data_name)
        bind_correlation(config.correlation.session_id, config.correlation.turn_id)
        settings = parse(config)
    except InvalidInput as error:
        await reject(error, context)
    await accept(context)
    return settings


async def accept(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Sends the response headers as soon as a call is accepted, so that they do not ride with
    (and delay) the first result, which is what the caller is waiting for."""
    await context.send_initial_metadata(())


async def reject(error: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    """Ends the call: INVALID_ARGUMENT with the reason for bad input; anything else re-raised."""
    if isinstance(error, InvalidInput):
        log.info("rejected request", extra={"reason": str(error)})
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    raise error


async def read_config(requests: AsyncIterator[Any], data_field: str, data_name: str) -> Any:
    """The `config` of a stream's first request (a oneof of `config` and `data_field`), or
    InvalidInput saying what came instead."""
    first = await anext(requests, None)
    if first is None:
        raise InvalidInput("request stream ended before config; the first request must carry config")
    kind = first.WhichOneof("request")
    if kind == data_field:
        raise InvalidInput(f"{data_name} arrived before config; the first request must carry config")
    if kind is None:
        raise InvalidInput(
            f"request has neither config nor {data_field} set; the first request must carry config"
        )
    return first.config
