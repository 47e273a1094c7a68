"""Channels to the orchestrator with the keepalive and message limits every link of the project
uses (voicepipe.keepalive), so that a client finds a dead connection as fast as the services do."""

from __future__ import annotations

import grpc

from voicepipe import keepalive


def channel_options(*, own_connection: bool = False) -> list[tuple[str, int]]:
    options = keepalive.client_options()
    if own_connection:
        # grpcio shares one connection among a process's channels to the same target; a caller
        # simulating many users gives each its own, as every phone or browser has.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def connect(target: str, *, own_connection: bool = False) -> grpc.aio.Channel:
    """An insecure channel to `target` (host:port or any gRPC target)."""
    return grpc.aio.insecure_channel(target, options=channel_options(own_connection=own_connection))
