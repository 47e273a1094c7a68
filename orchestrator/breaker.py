"""Circuit breaker per upstream stage: closed, open, half-open.

Fed by call outcomes (errors of a reachable stage, such as deadlines or internal errors) and by
the stage's grpc.health.v1 Watch (reachability: it opens within milliseconds of a refused
connection). While open, calls fail at once
(turns get an error event naming the stage within milliseconds instead of waiting for a
deadline); after `open_for_s` one trial call is let through (half-open), and a success or a
SERVING health report closes it again.
"""

from __future__ import annotations

import enum
import logging
import time

import grpc
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

BREAKER_STATE = Gauge(
    "voicepipe_upstream_breaker_state",
    "Circuit breaker state per upstream: 1 for the current state, 0 for the others.",
    ("upstream", "state"),
)
BREAKER_TRANSITIONS = Counter(
    "voicepipe_upstream_breaker_transitions_total",
    "Circuit breaker state changes per upstream.",
    ("upstream", "state"),
)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOpen(Exception):
    """Raised instead of calling a stage that is known to be down."""

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(f"{upstream} is unavailable ({reason}); failing fast")
        self.upstream = upstream


class CircuitBreaker:
    """Counts consecutive failures; opens at `failure_threshold` or when health says so."""

    def __init__(self, upstream: str, *, failure_threshold: int = 3, open_for_s: float = 1.0) -> None:
        self.upstream = upstream
        self.failure_threshold = failure_threshold
        self.open_for_s = open_for_s
        self.state = BreakerState.CLOSED
        self.reason = ""
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._export()

    def check(self) -> None:
        """Raises BreakerOpen unless a call may go ahead now."""
        if self.state is BreakerState.CLOSED:
            return
        if self.state is BreakerState.OPEN and time.monotonic() - self._opened_at >= self.open_for_s:
            self._move(BreakerState.HALF_OPEN, "cool-down over; trying one call")
        if self.state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return
        raise BreakerOpen(self.upstream, self.reason)

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED, "call succeeded")

    def record_failure(self, code: grpc.StatusCode) -> None:
        """A failed call. UNAVAILABLE is a connection event (a reset, a GOAWAY cutting every
        stream on a connection at once, a restart): whether the stage is reachable is the health
        Watch's to say, so it is not counted; failures of a reachable stage are."""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._trial_in_flight = False
            return
        reason = code.name
        self._failures += 1
        self._trial_in_flight = False
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._open(reason)

    def health_changed(self, serving: bool, reason: str) -> None:
        """The stage's own health report: NOT_SERVING or unreachable opens, SERVING closes."""
        if serving:
            self._failures = 0
            self._trial_in_flight = False
            if self.state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED, reason)
        elif self.state is BreakerState.CLOSED:
            self._open(reason)

    def _open(self, reason: str) -> None:
        self._opened_at = time.monotonic()
        self._move(BreakerState.OPEN, reason)

    def _move(self, state: BreakerState, reason: str) -> None:
        if state is self.state and state is not BreakerState.OPEN:
            return
        previous, self.state, self.reason = self.state, state, reason
        if previous is not state:
            BREAKER_TRANSITIONS.labels(self.upstream, state.value).inc()
            log.warning(
                "breaker state changed",
                extra={
                    "upstream": self.upstream,
                    "from": previous.value,
                    "to": state.value,
                    "reason": reason,
                },
            )
        self._export()

    def _export(self) -> None:
        for state in BreakerState:
            BREAKER_STATE.labels(self.upstream, state.value).set(1 if state is self.state else 0)
