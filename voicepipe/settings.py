"""What every server takes: where to listen, logging, connection management, shutdown, TLS,
as flags (each with its VOICEPIPE_<SERVICE>_<FLAG> variable, voicepipe.config)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from voicepipe.config import FlagParser, add_service_flags, parse_bool
from voicepipe.tls import ServerTls


@dataclass(frozen=True)
class ServerSettings:
    """What every server takes: where to listen, logging, connection management, shutdown."""

    host: str
    port: int
    metrics_port: int
    log_level: str
    shutdown_grace_s: float
    drain_delay_s: float
    max_connection_age_s: float
    max_connection_age_grace_s: float
    event_loop: str
    tls: ServerTls | None = None
    reflection: bool = True

    @staticmethod
    def add_flags(flags: FlagParser, *, port: int, metrics_port: int) -> None:
        add_service_flags(flags, port=port, metrics_port=metrics_port, listener="gRPC")
        flags.add(
            "--max-connection-age",
            type=float,
            default=300.0,
            help="seconds after which a client connection is sent GOAWAY so clients rebalance (0: never)",
        )
        flags.add(
            "--max-connection-age-grace",
            type=float,
            default=30.0,
            help="seconds calls may continue on a connection after its GOAWAY",
        )

        flags.add(
            "--event-loop",
            type=str,
            default="uvloop",
            choices=("uvloop", "asyncio"),
            help="event loop implementation (uvloop measured ~10 %% less CPU; see BENCHMARKS.md)",
        )
        ServerTls.add_flags(flags)
        flags.add(
            "--reflection",
            type=parse_bool,
            default=True,
            help="serve gRPC reflection (false in production: clients then need the protos)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        return cls(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            log_level=args.log_level,
            shutdown_grace_s=args.shutdown_grace,
            drain_delay_s=args.drain_delay,
            max_connection_age_s=args.max_connection_age,
            max_connection_age_grace_s=args.max_connection_age_grace,
            event_loop=args.event_loop,
            tls=ServerTls.from_args(args),
            reflection=args.reflection,
        )
