"""Token authentication and tenant quotas on Converse, against a real orchestrator and stages:
who is refused and with what, one tenant at its quota while another gets in, tokens issued and
revoked while the orchestrator runs, health open to probes, and no token in any log line or metric."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from orchestrator import auth
from tests.helpers import CALL_TIMEOUT_S, exchange, read_metric, scrape, wait_for_metric
from tests.stack_fixtures import Caller, instant_stack
from voice.v1 import voice_agent_pb2 as pb
from voice.v1 import voice_agent_pb2_grpc
from voicepipe.healthcheck import check
from voicepipe.processes import ServiceProcess
from voicepipe_client import SessionSettings, connect
from voicepipe_tools.stack import LocalStack

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
OK = grpc.StatusCode.OK
# Reloading waits for the file's next check (auth.RELOAD_CHECK_INTERVAL_S); bounded here.
RELOAD_TIMEOUT_S = 10.0


class Tenants:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokens = {"acme": auth.issue(path, "acme", 1), "globex": auth.issue(path, "globex", None)}


@pytest.fixture
def tenants(tmp_path: Path) -> Tenants:
    return Tenants(tmp_path / "tenants.json")


@pytest.fixture
async def stack(tenants: Tenants) -> AsyncIterator[LocalStack]:
    flags = ["--tokens-file", str(tenants.path), "--tenant-max-sessions", "5", "--log-level", "debug"]
    async with instant_stack(orchestrator_flags=flags) as running:
        yield running


def orchestrator_of(stack: LocalStack) -> ServiceProcess:
    assert stack.orchestrator is not None
    return stack.orchestrator


async def refusal(target: str, token: str) -> tuple[grpc.StatusCode, str]:
    """How a Converse call with `token` ("" for none) ends when it sends nothing."""
    async with connect(target, token=token) as channel:
        stub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        outcome = await exchange(stub.Converse, [], half_close=False)
    return outcome.code, outcome.details


async def converses(target: str, token: str) -> str:
    """The reply to one typed turn of a conversation opened with `token`."""
    async with connect(target, token=token) as channel, Caller(channel) as caller:
        await caller.open()
        await caller.type("hello")
        turn = await caller.turn_ended("1")
        await caller.end_input()
        assert await caller.ended() == (OK, "")
        return turn.agent_text


async def test_no_token_or_a_wrong_one_is_unauthenticated(stack: LocalStack, tenants: Tenants) -> None:
    target = orchestrator_of(stack).target
    code, details = await refusal(target, "")
    assert code == UNAUTHENTICATED
    assert "no token" in details and "authorization: Bearer" in details
    code, details = await refusal(target, "not-a-token-of-anyone")
    assert (code, details) == (UNAUTHENTICATED, "unknown token")
    # A token of another scheme is refused too.
    async with connect(target) as channel:
        stub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        call = stub.Converse(metadata=(("authorization", f"Basic {tenants.tokens['acme']}"),), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == UNAUTHENTICATED
    assert await converses(target, tenants.tokens["globex"]) == "Hello! How can I help you today?"
    metrics = orchestrator_of(stack).metrics_port
    assert await read_metric(metrics, "voicepipe_sessions_rejected_total", reason="unauthenticated") == 3
    assert await read_metric(metrics, "voicepipe_authentication_failures_total", reason="unknown") == 1


async def test_health_stays_open_without_a_token(stack: LocalStack) -> None:
    assert await check(orchestrator_of(stack).target)


async def test_a_tenant_at_its_quota_is_refused_while_another_gets_in(
    stack: LocalStack, tenants: Tenants
) -> None:
    orchestrator = orchestrator_of(stack)
    async with connect(orchestrator.target, token=tenants.tokens["acme"]) as channel:
        first = await Caller(channel, session_id="acme-1").open()
        async with first:
            await first.wait_for(lambda: first.of_kind("session_started"), what="session_started")
            code, details = await refusal(orchestrator.target, tenants.tokens["acme"])
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details == "tenant acme is at its limit of 1 concurrent conversations; retry later"
            assert await converses(orchestrator.target, tenants.tokens["globex"]) == (
                "Hello! How can I help you today?"
            )
            metrics = orchestrator.metrics_port
            assert await read_metric(metrics, "voicepipe_tenant_sessions_rejected_total", tenant="acme") == 1
            assert await read_metric(metrics, "voicepipe_tenant_active_sessions", tenant="acme") == 1
            await first.end_input()
            assert await first.ended() == (OK, "")
        await wait_for_metric(
            orchestrator.metrics_port,
            "voicepipe_tenant_active_sessions",
            lambda v: v == 0,
            labels={"tenant": "acme"},
        )
    # Its slot is free again.
    assert await converses(orchestrator.target, tenants.tokens["acme"]) == "Hello! How can I help you today?"
    started = [e for e in orchestrator.events() if e.get("event") == "session started"]
    assert {e["tenant"] for e in started} == {"acme", "globex"}


async def admission(target: str, token: str) -> grpc.StatusCode:
    """OK if a conversation opened with `token` starts, else the status it ends with."""
    async with connect(target, token=token) as channel:
        stub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        call = stub.Converse(timeout=CALL_TIMEOUT_S)
        try:
            await call.write(SessionSettings().config())
            response = await call.read()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return await call.code()
        finally:
            call.cancel()
        assert isinstance(response, pb.ConverseResponse), response
        assert response.WhichOneof("event") == "session_started"
        return OK


async def eventually(target: str, token: str, code: grpc.StatusCode) -> None:
    """Waits (bounded) until a conversation opened with `token` gets `code`: the file is looked
    at again one check interval after the last look."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while (got := await admission(target, token)) != code:
        assert time.monotonic() < deadline, f"still {got.name}, not {code.name}, after {RELOAD_TIMEOUT_S} s"
        await asyncio.sleep(0.1)


async def test_tokens_are_issued_and_revoked_while_the_orchestrator_runs(
    stack: LocalStack, tenants: Tenants
) -> None:
    target = orchestrator_of(stack).target
    initech = auth.issue(tenants.path, "initech", 2)
    await eventually(target, initech, OK)
    assert await converses(target, initech) == "Hello! How can I help you today?"
    assert auth.revoke(tenants.path, "initech")
    await eventually(target, initech, UNAUTHENTICATED)
    # A file that no longer parses keeps the tenants loaded before.
    tenants.path.write_text("{not json")
    await wait_for_log_event(
        orchestrator_of(stack), "tenants file not reloaded; keeping the tenants loaded before"
    )
    assert await converses(target, tenants.tokens["acme"]) == "Hello! How can I help you today?"


async def wait_for_log_event(process: ServiceProcess, event: str) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while not any(e.get("event") == event for e in process.events()):
        assert time.monotonic() < deadline, f"no {event!r} log line within {RELOAD_TIMEOUT_S} s"
        # A conversation's admission is when the file is looked at.
        await refusal(process.target, "not-a-token")


async def test_no_token_appears_in_any_log_line_or_metric(stack: LocalStack, tenants: Tenants) -> None:
    target = orchestrator_of(stack).target
    wrong = "wrong-" + tenants.tokens["acme"][::-1]
    await refusal(target, wrong)
    await refusal(target, "")
    assert await converses(target, tenants.tokens["acme"]) == "Hello! How can I help you today?"
    assert await converses(target, tenants.tokens["globex"]) == "Hello! How can I help you today?"
    secrets = [*tenants.tokens.values(), wrong, *(auth.token_hash(t) for t in tenants.tokens.values())]
    for process in stack.processes:
        lines = list(process.log_lines)
        assert lines, process.module
        for secret in secrets:
            assert not [line for line in lines if secret in line], f"{process.module} logged a token"
        exposition = scrape(process.metrics_port)
        assert not [secret for secret in secrets if secret in exposition]
    # The orchestrator did log the refusals and the sessions, with tenant names.
    events = orchestrator_of(stack).events()
    assert [e["detail"] for e in events if e.get("event") == "session refused"] == [
        "unknown token",
        "no token: send metadata authorization: Bearer <token>",
    ]


def test_a_bad_tokens_file_stops_the_orchestrator_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"acme": {"token_sha256": "secret-in-plain-text"}}}))
    with pytest.raises(RuntimeError) as failure:
        ServiceProcess("orchestrator", ["--port", "0", "--metrics-port", "-1", "--tokens-file", str(path)])
    assert "tenant acme: token_sha256 must be 64 lower-case hex digits" in str(failure.value)
    assert "secret-in-plain-text" not in str(failure.value)


def test_the_issue_command_prints_a_token_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    token = auth.issue(path, "acme", 3)
    stored = json.loads(path.read_text())
    assert stored == {"tenants": {"acme": {"token_sha256": auth.token_hash(token), "max_sessions": 3}}}
    assert token not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    # A new token replaces the old one and keeps the quota.
    again = auth.issue(path, "acme", None)
    assert again != token
    assert json.loads(path.read_text())["tenants"]["acme"]["max_sessions"] == 3
