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
