"""TLS and mutual TLS on real servers over real sockets, with certificates made in the test's own
directory: what a client that should not get in sees, what one that should sees, certificate
rotation under an open conversation, grpcurl with TLS, and a whole conversation with mutual TLS on
every link."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator import auth
from stubs.audio_code import normalize_text
from tests.conftest import StartService
from tests.stack_fixtures import Caller, heard, instant_stack
from tests.test_grpcurl import GRPCURL, GRPCURL_TIMEOUT_S, json_stream, requests
from voicepipe.processes import PROJECT_ROOT, ServiceProcess
from voicepipe.tls import ChannelTls, open_channel
from voicepipe_client import PCM_16K, connect
from voicepipe_tools.certs import Authority, Issued, serial_number, write_local_pki
from voicepipe_tools.stack import LocalStack, StackCertificates

HEALTH_TIMEOUT_S = 10.0


class Pki:
    """Two unrelated CAs in one directory: `ours` (the services' and clients') and `theirs`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ours = Authority("our CA")
        self.theirs = Authority("their CA")
        self.ca = self.write(self.ours.own(), "ca")
        self.their_ca = self.write(self.theirs.own(), "their-ca")
        self.write(self.ours.issue("server"), "server")
        self.write(self.ours.issue("client"), "client")
        self.write(self.theirs.issue("server"), "their-server")
        self.write(self.theirs.issue("client"), "their-client")
        yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        self.write(self.ours.issue("server", not_after=yesterday), "expired-server")
        self.write(self.ours.issue("client", not_after=yesterday), "expired-client")

    def write(self, issued: Issued, name: str) -> Path:
        issued.write(self.directory, name)
        return self.directory / f"{name}.pem"

    @staticmethod
    def client_pair(directory: Path, authority: Authority) -> tuple[Path, Path]:
        """A client certificate of `authority` in `directory`: (certificate, key)."""
        authority.issue("client").write(directory, "client")
        return directory / "client.pem", directory / "client-key.pem"

    def pem(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"

    def serve(self, name: str, *, mtls: bool = False) -> list[str]:
        """Server flags presenting certificate `name`; with `mtls`, clients need one of ours."""
        flags = [f"--tls-cert={self.pem(name)}", f"--tls-key={self.key(name)}"]
        return [*flags, f"--tls-client-ca={self.ca}"] if mtls else flags

    def client(self, *, trust: str = "ca", certificate: str | None = None) -> ChannelTls:
        return ChannelTls(
            self.pem(trust),
            self.pem(certificate) if certificate else None,
            self.key(certificate) if certificate else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def health(target: str, tls: ChannelTls | None) -> tuple[grpc.StatusCode, str]:
    """The status of one health Check over a new connection: OK means the handshake passed."""
    async with open_channel(target, tls) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK, ""


async def assert_refused(target: str, tls: ChannelTls | None) -> None:
    code, details = await health(target, tls)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)


# --- who gets in ------------------------------------------------------------------------------------


async def test_a_plaintext_client_is_refused_by_a_tls_server(pki: Pki, start_service: StartService) -> None:
    stage = start_service("stt_stub", *pki.serve("server"))
    assert await health(stage.target, pki.client()) == (grpc.StatusCode.OK, "")
    await assert_refused(stage.target, None)


async def test_a_server_certificate_from_another_ca_is_refused(pki: Pki, start_service: StartService) -> None:
    ours = start_service("llm_stub", *pki.serve("server"))
    theirs = start_service("llm_stub", *pki.serve("their-server"))
    assert await health(ours.target, pki.client()) == (grpc.StatusCode.OK, "")
    await assert_refused(theirs.target, pki.client())
    # Trusting their CA instead turns it around.
    assert await health(theirs.target, pki.client(trust="their-ca")) == (grpc.StatusCode.OK, "")
    await assert_refused(ours.target, pki.client(trust="their-ca"))


async def test_an_mtls_server_refuses_clients_without_a_certificate_of_its_ca(
    pki: Pki, start_service: StartService
) -> None:
    stage = start_service("tts_stub", *pki.serve("server", mtls=True))
    assert await health(stage.target, pki.client(certificate="client")) == (grpc.StatusCode.OK, "")
    await assert_refused(stage.target, pki.client())
    await assert_refused(stage.target, pki.client(certificate="their-client"))
    await assert_refused(stage.target, None)


async def test_expired_certificates_are_refused(pki: Pki, start_service: StartService) -> None:
    expired = start_service("stt_stub", *pki.serve("expired-server"))
    await assert_refused(expired.target, pki.client())
    # And an mTLS server refuses a client whose certificate has expired.
    strict = start_service("stt_stub", *pki.serve("server", mtls=True))
    assert await health(strict.target, pki.client(certificate="client")) == (grpc.StatusCode.OK, "")
    await assert_refused(strict.target, pki.client(certificate="expired-client"))


def test_a_server_without_its_key_says_which_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere-key.pem"
    with pytest.raises(RuntimeError) as failure:
        ServiceProcess(
            "stt_stub", ["--port", "0", "--tls-cert", str(pki.pem("server")), "--tls-key", str(missing)]
        )
    assert f"cannot serve TLS: cannot read {missing}: No such file or directory" in str(failure.value)


# --- rotation -----------------------------------------------------------------------------------------


def served_certificate_serial(port: int, tls: ChannelTls) -> int:
    """The serial number of the certificate the server presents on a new connection."""
    assert tls.ca and tls.certificate and tls.key
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.certificate), str(tls.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=HEALTH_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_rotated_certificate_is_served_to_new_connections_while_a_conversation_goes_on(
    tmp_path: Path,
) -> None:
    authority = write_local_pki(tmp_path)
    certificates = StackCertificates(tmp_path)
    client = certificates.channel("client")
    async with instant_stack(certificates=certificates) as stack:
        assert stack.orchestrator is not None
        orchestrator = stack.orchestrator
        before = serial_number((tmp_path / "orchestrator.pem").read_bytes())
        assert await asyncio.to_thread(served_certificate_serial, orchestrator.port, client) == before
        async with connect(orchestrator.target, tls=client) as channel:
            caller = await Caller(channel, session_id="rotation").open()
            async with caller:
                await caller.type("my name is Ada")
                assert (await caller.turn_ended("1")).agent_text == "Nice to meet you, Ada."

                # What cert-manager does: a new certificate for the same names from the same CA,
                # written over the old files.
                authority.issue("orchestrator").write(tmp_path, "orchestrator")
                after = serial_number((tmp_path / "orchestrator.pem").read_bytes())
                assert after != before
                served = await asyncio.to_thread(served_certificate_serial, orchestrator.port, client)
                assert served == after
                # The open conversation goes on over its connection.
                await caller.type("what is my name")
                assert (await caller.turn_ended("2")).agent_text == "Your name is Ada."
                await caller.end_input()
                assert await caller.ended() == (grpc.StatusCode.OK, "")
            # And a new gRPC connection is made with the new certificate.
            assert await health(orchestrator.target, client) == (grpc.StatusCode.OK, "")
        assert any(e.get("event") == "tls certificate reloaded" for e in orchestrator.events())


async def test_a_half_rewritten_pair_keeps_the_old_certificate_until_the_key_follows(
    tmp_path: Path, start_service: StartService
) -> None:
    """cert-manager may replace the certificate a moment before the key: the server must not
    switch to a certificate whose key it does not have, and must switch once the key is there."""
    authority = Authority()
    (tmp_path / "ca.pem").write_bytes(authority.certificate)
    old = authority.issue("stage")
    old.write(tmp_path, "stage")
    stage = start_service(
        "stt_stub", f"--tls-cert={tmp_path / 'stage.pem'}", f"--tls-key={tmp_path / 'stage-key.pem'}"
    )
    probe = ChannelTls(tmp_path / "ca.pem", *(Pki.client_pair(tmp_path, authority)))
    assert await asyncio.to_thread(served_certificate_serial, stage.port, probe) == serial_number(
        old.certificate
    )
    new = authority.issue("stage")
    Issued(new.certificate, old.key).write(tmp_path, "stage")
    assert await asyncio.to_thread(served_certificate_serial, stage.port, probe) == serial_number(
        old.certificate
    )
    new.write(tmp_path, "stage")
    assert await asyncio.to_thread(served_certificate_serial, stage.port, probe) == serial_number(
        new.certificate
    )
    assert any("not a certificate and its key" in e.get("error", "") for e in stage.events())


def test_a_key_that_is_not_the_certificates_stops_the_server_with_the_reason(pki: Pki) -> None:
    with pytest.raises(RuntimeError) as failure:
        ServiceProcess(
            "stt_stub",
            ["--port", "0", "--tls-cert", str(pki.pem("server")), "--tls-key", str(pki.key("client"))],
        )
    assert "are not a certificate and its key" in str(failure.value)


# --- grpcurl and reflection -------------------------------------------------------------------------


def grpcurl_tls(
    pki: Pki, target: str, *args: str, data: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        GRPCURL,
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.pem("client")),
        "-key",
        str(pki.key("client")),
        *(["-d", "@"] if data is not None else []),
        target,
        *args,
    ]
    return subprocess.run(
        command, input=data, capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_S, check=False
    )


def test_grpcurl_lists_and_calls_an_mtls_server(pki: Pki, start_service: StartService) -> None:
    stage = start_service("llm_stub", *pki.serve("server", mtls=True))
    listed = grpcurl_tls(pki, stage.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "voice.v1.LanguageModelService" in listed.stdout.split()
    request = {"messages": [{"role": "ROLE_USER", "content": "my name is Ada"}]}
    generated = grpcurl_tls(
        pki, stage.target, "voice.v1.LanguageModelService/Generate", data=json.dumps(request)
    )
    assert generated.returncode == 0, generated.stderr
    *deltas, last = json_stream(generated.stdout)
    assert "".join(d["delta"]["text"] for d in deltas) == "Nice to meet you, Ada."
    assert last["complete"]["finish_reason"] == "FINISH_REASON_STOP"
    # grpcurl's -plaintext against the same server does not get through.
    plaintext = subprocess.run(
        [GRPCURL, "-plaintext", "-connect-timeout", "2", stage.target, "list"],
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
        check=False,
    )
    assert plaintext.returncode != 0


async def test_reflection_switched_off_leaves_health_open(pki: Pki, start_service: StartService) -> None:
    stage = start_service("stt_stub", *pki.serve("server", mtls=True), "--reflection", "false")
    listed = grpcurl_tls(pki, stage.target, "list")
    assert listed.returncode != 0
    assert "does not support the reflection API" in listed.stderr, listed.stderr
    assert await health(stage.target, pki.client(certificate="client")) == (grpc.StatusCode.OK, "")


# --- the whole pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureStack:
    """The four services with mutual TLS on every link, and a tenant's token for Converse."""

    stack: LocalStack
    certificates: StackCertificates
    token: str

    @property
    def orchestrator(self) -> ServiceProcess:
        assert self.stack.orchestrator is not None
        return self.stack.orchestrator

    def client_flags(self) -> list[str]:
        client = self.certificates.channel("client")
        return [f"--tls-ca={client.ca}", f"--tls-cert={client.certificate}", f"--tls-key={client.key}"]


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureStack]:
    directory = tmp_path_factory.mktemp("secure")
    write_local_pki(directory)
    certificates = StackCertificates(directory)
    tenants = directory / "tenants.json"
    token = auth.issue(tenants, "acme", None)
    flags = ["--tokens-file", str(tenants)]
    async with instant_stack(certificates=certificates, orchestrator_flags=flags) as stack:
        yield SecureStack(stack, certificates, token)


async def test_a_spoken_conversation_passes_with_mutual_tls_on_every_link(secure: SecureStack) -> None:
    """Every link mutual TLS, and the client authenticated by its token as call credentials."""
    for process in secure.stack.processes:
        ready = next(e for e in process.events() if e.get("event") == "ready")
        assert ready["tls"] == "mtls", (process.module, ready)
    client = secure.certificates.channel("client")
    async with connect(secure.orchestrator.target, tls=client, token=secure.token) as channel:
        caller = await Caller(channel, session_id="mtls").open()
        async with caller:
            script = [
                ("Hello, my name is Ada.", "Nice to meet you, Ada."),
                ("What is my name?", "Your name is Ada."),
            ]
            for number, (said, reply) in enumerate(script, start=1):
                await caller.speak(said)
                turn = await caller.turn_ended(str(number))
                assert turn.user_text == normalize_text(said)
                assert turn.agent_text == reply
                assert heard(turn.audio, PCM_16K) == [normalize_text(reply)]
            await caller.end_input()
            assert await caller.ended() == (grpc.StatusCode.OK, "")
    session = next(e for e in secure.orchestrator.events() if e.get("session_id") == "mtls")
    assert session["tenant"] == "acme"


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_converses_over_mutual_tls_with_its_token(secure: SecureStack, tmp_path: Path) -> None:
    args = ["--target", secure.orchestrator.target, *secure.client_flags(), "--out-dir", str(tmp_path)]
    done = await asyncio.to_thread(
        run_module,
        "voicepipe_tools.client",
        *args,
        "--type",
        "my name is Ada",
        env={"VOICEPIPE_CLIENT_TOKEN": secure.token},
    )
    assert done.returncode == 0, done.stderr
    assert "agent: Nice to meet you, Ada." in done.stdout
    refused = await asyncio.to_thread(run_module, "voicepipe_tools.client", *args, "--type", "hello")
    assert refused.returncode == 1
    assert "conversation ended with UNAUTHENTICATED" in refused.stderr


async def test_the_health_check_command_speaks_mutual_tls(secure: SecureStack) -> None:
    target = secure.orchestrator.target
    by_flags = await asyncio.to_thread(run_module, "voicepipe.healthcheck", target, *secure.client_flags())
    assert by_flags.returncode == 0, by_flags.stderr
    client = secure.certificates.channel("client")
    variables = {
        "VOICEPIPE_HEALTHCHECK_TLS_CA": str(client.ca),
        "VOICEPIPE_HEALTHCHECK_TLS_CERT": str(client.certificate),
        "VOICEPIPE_HEALTHCHECK_TLS_KEY": str(client.key),
    }
    by_environment = await asyncio.to_thread(run_module, "voicepipe.healthcheck", target, env=variables)
    assert by_environment.returncode == 0, by_environment.stderr
    assert (await asyncio.to_thread(run_module, "voicepipe.healthcheck", target)).returncode == 1


def test_grpcurl_converses_with_an_mtls_orchestrator_given_a_token(secure: SecureStack) -> None:
    """The README's recipe for a secured orchestrator: mTLS flags and the token as a header."""
    client = secure.certificates.channel("client")
    conversation = requests(
        {"config": {"input_audio_format": {"encoding": "AUDIO_ENCODING_LINEAR16"}}},
        {"text": {"text": "my name is Ada"}},
        {"control": {"type": "CONTROL_TYPE_END_OF_INPUT"}},
    )
    command = [
        GRPCURL,
        "-cacert",
        str(client.ca),
        "-cert",
        str(client.certificate),
        "-key",
        str(client.key),
        "-H",
        f"authorization: Bearer {secure.token}",
        "-d",
        "@",
        secure.orchestrator.target,
        "voice.v1.VoiceAgentService/Converse",
    ]
    done = subprocess.run(
        command, input=conversation, capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr
    completed = [e["turn_completed"]["agent_text"] for e in json_stream(done.stdout) if "turn_completed" in e]
    assert completed == ["Nice to meet you, Ada."]
    without_token = subprocess.run(
        [*command[:7], *command[9:]],
        input=conversation,
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
        check=False,
    )
    assert "Unauthenticated" in without_token.stderr, without_token.stderr
