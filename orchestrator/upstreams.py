"""One long-lived HTTP/2 channel per stage, shared by every session: keepalive, a retry
service config (gRFC A6), a health Watch that feeds the circuit breaker, and connectivity
metrics (the connection-pool visibility the old HTTP design never had)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from orchestrator.breaker import CircuitBreaker
from voicepipe import keepalive
from voicepipe.aio import cancel_and_wait
from voicepipe.tls import ChannelTls, open_channel

log = logging.getLogger(__name__)

CHANNEL_STATE = Gauge(
    "voicepipe_upstream_channel_state",
    "Connectivity state of each upstream channel: 1 for the current state, 0 for the others.",
    ("upstream", "state"),
)
CHANNEL_STATE_CHANGES = Counter(
    "voicepipe_upstream_channel_state_changes_total",
    "Connectivity state changes of each upstream channel, by the state entered.",
    ("upstream", "state"),
)
UPSTREAM_CALLS_IN_FLIGHT = Gauge(
    "voicepipe_upstream_calls_in_flight",
    "Calls to each upstream that are open now (Transcribe, Generate, Synthesize).",
    ("upstream",),
)
UPSTREAM_SERVING = Gauge(
    "voicepipe_upstream_serving", "1 while the upstream's health Watch reports SERVING.", ("upstream",)
)

# round_robin: a stage's name may resolve to several replicas (`dns:///stt:50052` with
# `docker-compose up --scale stt=3`); the channel connects to every address and spreads calls
# over them (gRPC's default, pick_first, would send every call to the first).
# Calls that may be retried by the channel itself: Generate (gRPC retries a server-streaming
# call only until its first response arrives, which is exactly when retrying is safe) and
# unary health checks. Throttling stops retries while more than half of recent calls fail, so a
# dead stage is not hammered.
RETRY_POLICY: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [
                {"service": "voice.v1.LanguageModelService", "method": "Generate"},
                {"service": "grpc.health.v1.Health", "method": "Check"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.5},
}

# How a stage channel spreads calls over the addresses its target resolves to. round_robin keeps
# a connection to every address (every pod behind a headless Service, `dns:///stt.ns.svc...`)
# and sends each new call to the next; pick_first uses one connection at a time. With
# round_robin the channel also watches each address's grpc.health.v1 status (client-side health
# checking, gRFC A17), so a replica that turns NOT_SERVING (draining) gets no new calls at once.
LB_POLICIES = ("round_robin", "pick_first")


def service_config(lb_policy: str, health_service: str) -> str:
    """The stage channel's service config: the retry policy, the load-balancing policy and the
    service whose health each address reports (`health_service`)."""
    return json.dumps(
        {
            **RETRY_POLICY,
            "loadBalancingConfig": [{lb_policy: {}}],
            "healthCheckConfig": {"serviceName": health_service},
        }
    )


def stage_channel_options(lb_policy: str, health_service: str) -> list[tuple[str, int | str]]:
    """A stage channel's options: keepalive (voicepipe.keepalive) and the service config."""
    return [
        *keepalive.client_options(),
        # Retries as configured above (on by default; stated so it is not lost).
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(lb_policy, health_service)),
    ]


# A Watch is re-opened this often even when nothing happens, so no call lives without a deadline.
HEALTH_WATCH_DEADLINE_S = 300.0
HEALTH_RETRY_MIN_S = 0.02
HEALTH_RETRY_MAX_S = 0.25
HEALTH_FAILURES_DOWN = 3
# How long the Check that asks whether another replica serves may take (its retries included).
SECOND_OPINION_TIMEOUT_S = 0.5


class Upstream:
    """A stage the orchestrator calls: channel, breaker and health, for all sessions."""

    def __init__(
        self,
        name: str,
        target: str,
        service_name: str,
        on_health_change: Callable[[], Awaitable[None]],
        tls: ChannelTls | None = None,
        lb_policy: str = LB_POLICIES[0],
    ) -> None:
        self.name = name
        self.target = target
        self.service_name = service_name
        self.serving = False
        self.breaker = CircuitBreaker(name)
        self._on_health_change = on_health_change
        self.channel = open_channel(target, tls, options=stage_channel_options(lb_policy, service_name))
        self._health: Any = health_pb2_grpc.HealthStub(self.channel)
        # inc() when a stage call is created, dec() in the finally that cancels it.
        self.calls_in_flight = UPSTREAM_CALLS_IN_FLIGHT.labels(name)
        self._tasks: list[asyncio.Task[None]] = []
        UPSTREAM_SERVING.labels(name).set(0)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_health(), name=f"{self.name}-health-watch"),
            asyncio.create_task(self._watch_connectivity(), name=f"{self.name}-connectivity"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self.channel.close()

    async def _set_serving(self, serving: bool, reason: str) -> None:
        self.breaker.health_changed(serving, reason)
        if serving != self.serving:
            self.serving = serving
            UPSTREAM_SERVING.labels(self.name).set(int(serving))
            log.info(
                "upstream health changed", extra={"upstream": self.name, "serving": serving, "reason": reason}
            )
            await self._on_health_change()

    async def _watch_health(self) -> None:
        request = health_pb2.HealthCheckRequest(service=self.service_name)
        failures = 0
        while True:
            # Not wait-for-ready: a stage that cannot be reached must show up as down at once.
            call = self._health.Watch(request, timeout=HEALTH_WATCH_DEADLINE_S)
            try:
                async for response in call:
                    failures = 0
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    if not serving and await self._another_replica_serves(request):
                        # This Watch's replica is draining (or unwell) while another serves:
                        # the stage is up; watch one that serves instead.
                        log.info("upstream replica not serving", extra={"upstream": self.name})
                        break
                    await self._set_serving(serving, status)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    failures += 1
                    # A broken Watch is usually a broken connection (a reset, a GOAWAY) to a
                    # stage that is fine: the stage is down when the channel cannot connect
                    # (TRANSIENT_FAILURE: refused, unreachable) or Watches keep failing.
                    unreachable = self.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
                    if unreachable or failures >= HEALTH_FAILURES_DOWN:
                        await self._set_serving(False, f"health watch failed: {error.code().name}")
            finally:
                call.cancel()
            if failures:
                await asyncio.sleep(min(HEALTH_RETRY_MIN_S * 2 ** (failures - 1), HEALTH_RETRY_MAX_S))

    async def _another_replica_serves(self, request: health_pb2.HealthCheckRequest) -> bool:
        """Whether the channel still finds a replica that is SERVING, after the one the Watch
        follows said otherwise: round_robin picks among the replicas whose health it sees SERVING
        (a single replica that is not serving leaves it nothing to pick: UNAVAILABLE)."""
        try:
            response = await self._health.Check(request, timeout=SECOND_OPINION_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _watch_connectivity(self) -> None:
        state = self.channel.get_state(try_to_connect=True)
        while True:
            for known in grpc.ChannelConnectivity:
                CHANNEL_STATE.labels(self.name, known.name.lower()).set(int(known == state))
            CHANNEL_STATE_CHANGES.labels(self.name, state.name.lower()).inc()
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)


class Upstreams:
    """The three stages; the orchestrator is healthy only while all of them are."""

    def __init__(
        self,
        stt: str,
        llm: str,
        tts: str,
        on_health_change: Callable[[bool], Awaitable[None]],
        *,
        tls: ChannelTls | None = None,
        lb_policy: str = LB_POLICIES[0],
    ) -> None:
        """`tls`: how every stage channel verifies its stage and authenticates (None: plaintext);
        `lb_policy`: one of LB_POLICIES, for every stage channel."""
        self._notify = on_health_change

        async def changed() -> None:
            await self._notify(self.all_serving)

        self.stt = Upstream("stt", stt, "voice.v1.SpeechToTextService", changed, tls, lb_policy)
        self.llm = Upstream("llm", llm, "voice.v1.LanguageModelService", changed, tls, lb_policy)
        self.tts = Upstream("tts", tts, "voice.v1.TextToSpeechService", changed, tls, lb_policy)

    @property
    def all(self) -> tuple[Upstream, Upstream, Upstream]:
        return (self.stt, self.llm, self.tts)

    @property
    def all_serving(self) -> bool:
        return all(u.serving for u in self.all)

    def start(self) -> None:
        for upstream in self.all:
            upstream.start()

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self.all))
