"""Start voicepipe services as child processes and stop them again: used by the tests, the
local stack (`make up`), the demo and the benchmarks."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """`python -m <module> <args>`, waited on until it logs "ready"; its log lines are kept."""

    def __init__(self, module: str, args: Sequence[str] = (), *, ready_timeout_s: float = 30.0) -> None:
        self.module = module
        self.args = list(args)
        self.log_lines: collections.deque[str] = collections.deque(maxlen=5000)
        self.port = 0
        self.metrics_port = -1
        self._ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *self.args],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_logs, name=f"logs-{module}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(list(self.log_lines)[-20:])
                raise RuntimeError(f"{module} did not become ready:\n{tail}")

    def _read_logs(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip("\n"))
            if not self._ready.is_set():
                event = self._parse(line)
                if event.get("event") == "ready":
                    self.port = int(event["port"])
                    self.metrics_port = int(event.get("metrics_port", -1))
                    self._ready.set()

    @staticmethod
    def _parse(line: str) -> dict[str, Any]:
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return [event for line in list(self.log_lines) if (event := self._parse(line))]

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited in time; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, as far as its peers can tell."""
        self.process.kill()
        self.process.wait()
        self._reader.join(5)


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it; the socket is closed again): for a
    service that must come back on the same port after a restart."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stage_args(port: int = 0, metrics_port: int = 0, *extra: str) -> list[str]:
    """The flags every test or local run gives a service: loopback, chosen ports."""
    return ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), *extra]
