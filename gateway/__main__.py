"""`python -m gateway`: the web page and its WebSocket endpoint in front of the orchestrator."""

from __future__ import annotations

import argparse
import asyncio
import logging

import uvloop

from gateway.app import Admission, Gateway
from gateway.session import SessionLimits
from voicepipe.config import FlagParser, add_service_flags
from voicepipe.engines import PORTS
from voicepipe.logs import configure_logging
from voicepipe.metrics import start_metrics_endpoint, watch_event_loop
from voicepipe.server import wait_for_shutdown_signal
from voicepipe.tls import ChannelTls, ServerTls
from voicepipe_client import connect

log = logging.getLogger("gateway")

# Events buffered for a socket that reads slowly before it is closed with 4008.
MAX_PENDING_EVENTS = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("gateway", "Serves the voice page and bridges each WebSocket to one conversation.")
    gateway = PORTS["gateway"]
    add_service_flags(flags, port=gateway.port, metrics_port=gateway.metrics_port, listener="HTTP/WebSocket")
    ServerTls.add_flags(flags)
    flags.add(
        "--orchestrator",
        type=str,
        default=f"127.0.0.1:{PORTS['orchestrator'].port}",
        help="gRPC target of the orchestrator",
    )
    ChannelTls.add_flags(flags, "--orchestrator-tls", peer="the orchestrator")
    flags.add(
        "--orchestrator-token",
        type=str,
        default="",
        help="bearer token for callers who bring none (the page's token box or --token-header win)",
    )
    flags.add(
        "--token-header",
        type=str,
        default="Authorization",
        help="request header a reverse proxy puts the caller's bearer token in (empty: none)",
    )
    flags.add(
        "--allowed-origins",
        type=str,
        default="",
        help="comma-separated origins whose pages may connect (empty: the gateway's own; *: any)",
    )
    flags.add("--max-sessions", type=int, default=1000, help="open conversations; more are closed with 4008")
    flags.add(
        "--max-frame-bytes", type=int, default=65536, help="largest WebSocket message (larger: closed, 1009)"
    )
    flags.add(
        "--max-messages-per-second",
        type=float,
        default=200.0,
        help="messages one socket may send per second (bursts of one second's worth); more closes with 4008",
    )
    flags.add("--config-timeout", type=float, default=10.0, help="seconds a new socket has for its config")
    flags.add(
        "--connect-timeout",
        type=float,
        default=3.0,
        help="seconds to wait for the orchestrator before closing a new socket with 4014",
    )
    flags.add("--session-timeout", type=float, default=3600.0, help="longest conversation, in seconds")
    return flags.parse(argv)


async def serve(args: argparse.Namespace) -> None:
    tls = ServerTls.from_args(args)
    limits = SessionLimits(
        max_frame_bytes=args.max_frame_bytes,
        max_messages_per_second=args.max_messages_per_second,
        config_timeout_s=args.config_timeout,
        connect_timeout_s=args.connect_timeout,
        session_timeout_s=args.session_timeout,
        max_pending_events=MAX_PENDING_EVENTS,
    )
    admission = Admission(
        allowed_origins=frozenset(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        token_header=args.token_header,
        default_token=args.orchestrator_token,
        max_sessions=args.max_sessions,
    )
    watch_event_loop(asyncio.get_running_loop())
    async with connect(args.orchestrator, tls=ChannelTls.from_args(args, "orchestrator_tls")) as channel:
        gateway = Gateway(channel, limits, admission)
        port = await gateway.start(args.host, args.port, tls)
        metrics_port = start_metrics_endpoint(args.host, args.metrics_port) if args.metrics_port >= 0 else -1
        log.info(
            "ready",
            extra={
                "host": args.host,
                "port": port,
                "metrics_port": metrics_port,
                "tls": tls.mode if tls else "off",
                "orchestrator": args.orchestrator,
            },
        )
        try:
            await wait_for_shutdown_signal()
        finally:
            await gateway.stop(args.drain_delay, args.shutdown_grace)


def main() -> None:
    args = parse_args()
    configure_logging("gateway", args.log_level)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
