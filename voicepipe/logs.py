"""JSON logs, one line per event on stderr, with the correlation ids of the current task."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

# Set by whoever handles a session or turn; asyncio copies them into child tasks, so every log
# line written on behalf of a session carries its ids without passing them around.
session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="")
turn_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("turn_id", default="")
# The tenant a conversation was admitted for (orchestrator.auth), on every line of its session.
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")


def bind_correlation(session_id: str, turn_id: str = "") -> None:
    """Tags every later log line of this task (and of tasks it starts) with these ids."""
    session_id_var.set(session_id)
    turn_id_var.set(turn_id)


# Attributes every LogRecord has; anything else came from `extra=` and goes into the JSON.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, service, event, ids, extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "event": record.getMessage(),
        }
        if session_id := session_id_var.get():
            line["session_id"] = session_id
        if turn_id := turn_id_var.get():
            line["turn_id"] = turn_id
        if tenant := tenant_var.get():
            line["tenant"] = tenant
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, level: str) -> None:
    """Sends every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
