"""Channels to the orchestrator with the keepalive and message limits every link of the project
uses (voicepipe.keepalive), so that a client finds a dead connection as fast as the services do;
TLS (voicepipe.tls) and a bearer token when the orchestrator asks for them.

The token goes out as `authorization: Bearer <token>` on every call. Over TLS it is gRPC call
credentials (which gRPC never sends over plaintext); over a plaintext channel, meant for local
development only, an interceptor adds the same metadata, readable by anyone on the path."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

import grpc

from voicepipe import keepalive
from voicepipe.tls import ChannelTls, open_channel


def channel_options(*, own_connection: bool = False, load_balancing: str = "") -> list[tuple[str, int | str]]:
    """`load_balancing`: gRPC's policy over the addresses a target resolves to, such as
    "round_robin" (every call to a ready replica in turn); empty: gRPC's default, pick_first."""
    options: list[tuple[str, int | str]] = [*keepalive.client_options()]
    if load_balancing:
        options.append(("grpc.lb_policy_name", load_balancing))
    if own_connection:
        # grpcio shares one connection among a process's channels to the same target; a caller
        # simulating many users gives each its own, as every phone or browser has.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


class PlaintextBearerToken(grpc.aio.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to the streaming calls (Converse) of a plaintext
    channel. (grpc.aio files an interceptor under one kind of call only.)"""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def connect(
    target: str,
    *,
    own_connection: bool = False,
    tls: ChannelTls | None = None,
    token: str = "",
    load_balancing: str = "",
) -> grpc.aio.Channel:
    """A channel to `target` (host:port or any gRPC target, such as `dns:///agent:50051` or
    `ipv4:10.0.0.1:50051,10.0.0.2:50051` for several replicas): plaintext unless `tls` is given;
    `token` authenticates every call; `load_balancing` as in channel_options."""
    options = channel_options(own_connection=own_connection, load_balancing=load_balancing)
    if tls is not None:
        credentials = grpc.access_token_call_credentials(token) if token else None
        return open_channel(target, tls, options, call_credentials=credentials)
    return open_channel(target, None, options, interceptors=[PlaintextBearerToken(token)] if token else [])
