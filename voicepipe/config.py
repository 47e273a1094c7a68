"""Command-line flags that each have an environment variable of the same meaning.

A flag `--metrics-port` of service `stt` reads `VOICEPIPE_STT_METRICS_PORT` as its default;
the command line wins over the environment, the environment over the built-in default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_bool(value: str) -> bool:
    """`true`/`false` (also yes/no, on/off, 1/0) as a flag's or a variable's value."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def env_var_name(service: str, flag: str) -> str:
    """`("stt", "--metrics-port")` -> `"VOICEPIPE_STT_METRICS_PORT"`."""
    return f"VOICEPIPE_{service}_{flag.lstrip('-')}".upper().replace("-", "_")


class FlagParser:
    """An argparse parser whose every flag also reads an environment variable."""

    def __init__(self, service: str, description: str, *, module: str | None = None) -> None:
        """`service` names the variables (VOICEPIPE_<SERVICE>_...); `module` is what the help
        text says to run (`python -m <module>`), the service by default."""
        self.service = service
        self.parser = argparse.ArgumentParser(
            prog=f"python -m {module or service}",
            description=description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )

    def add(
        self,
        flag: str,
        *,
        type: Callable[[str], Any],
        default: Any,
        help: str,
        choices: tuple[Any, ...] | None = None,
    ) -> None:
        env = env_var_name(self.service, flag)
        raw = os.environ.get(env)
        value = type(raw) if raw not in (None, "") else default
        self.parser.add_argument(flag, type=type, default=value, choices=choices, help=f"{help} [env {env}]")

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        return self.parser.parse_args(argv)


def add_service_flags(flags: FlagParser, *, port: int, metrics_port: int, listener: str) -> None:
    """The flags every service takes, gRPC servers and the gateway alike: where it listens (a
    `listener` port: "gRPC", "HTTP/WebSocket"), its /metrics, its log level, and the shutdown (the
    drain, then the grace). Each reads VOICEPIPE_<SERVICE>_<FLAG> like every flag."""
    flags.add("--host", type=str, default="127.0.0.1", help="address to listen on")
    flags.add("--port", type=int, default=port, help=f"{listener} port (0: the OS chooses)")
    flags.add(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="Prometheus /metrics port (0: the OS chooses; -1: no endpoint)",
    )
    flags.add("--log-level", type=str, default="info", choices=LOG_LEVELS, help="log level")
    flags.add(
        "--drain-delay",
        type=float,
        default=0.0,
        help="seconds after SIGTERM during which health says not ready (gRPC NOT_SERVING, /healthz 503)"
        " but new calls are still accepted, so that load balancers and endpoints stop sending them"
        " (then the grace begins)",
    )
    flags.add(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds calls in flight (open sockets) may run after the drain before they are ended",
    )
