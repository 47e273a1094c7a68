"""TLS for every server and every channel of the project, from PEM files.

Servers: `--tls-cert` and `--tls-key` serve TLS; `--tls-client-ca` also requires client
certificates issued by that CA (mTLS). The files are re-read when they change (as cert-manager
or a kubelet rewrites a mounted secret), so new connections get the new certificate without a
restart; connections already open keep theirs. grpcio asks for the certificate configuration
before every handshake (dynamic server credentials), so the check is one stat per file per new
connection.

Channels: a CA to verify the server with, optionally a client certificate and key (mTLS), and
optionally the name to verify in the server's certificate when it differs from the target's host
(`grpc.ssl_target_name_override`). A channel's files are read once, when it is created.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from voicepipe.config import FlagParser

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the {what} {path}: {error.strerror}") from None


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


@dataclass(frozen=True)
class ServerTls:
    """The certificate and key a server presents, and the CA its clients' certificates must come
    from (None: clients need no certificate)."""

    certificate: Path
    key: Path
    client_ca: Path | None = None

    @staticmethod
    def add_flags(flags: FlagParser) -> None:
        flags.add(
            "--tls-cert",
            type=str,
            default="",
            help="PEM certificate chain to serve TLS with (empty: plaintext)",
        )
        flags.add("--tls-key", type=str, default="", help="PEM private key of --tls-cert")
        flags.add(
            "--tls-client-ca",
            type=str,
            default="",
            help="PEM CA bundle; when set, clients must present a certificate it issued (mTLS)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerTls | None:
        """None for plaintext; a usage error when the flags do not make sense together."""
        if not args.tls_cert and not args.tls_key:
            if args.tls_client_ca:
                raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        return cls(Path(args.tls_cert), Path(args.tls_key), _optional_path(args.tls_client_ca))

    @property
    def mode(self) -> str:
        """What the "ready" log line says: "tls" or "mtls"."""
        return "mtls" if self.client_ca else "tls"

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials that follow the files (ValueError if they cannot be read now)."""
        files = ServerCertificateFiles(self)
        # The type stubs leave out that the fetcher may return None ("no change"), as grpcio says.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], files.fetch)
        return grpc.dynamic_ssl_server_credentials(
            files.load(), fetch, require_client_authentication=self.client_ca is not None
        )


# (mtime in ns, size, inode) of each file: what tells a rewritten file from the one loaded.
_Stamp = tuple[tuple[int, int, int], ...]


class ServerCertificateFiles:
    """The files of a ServerTls, as grpcio's certificate-configuration fetcher: `fetch` returns
    a new configuration when any file changed since the last load, None otherwise."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._paths = [p for p in (tls.certificate, tls.key, tls.client_ca) if p is not None]
        self._stamp: _Stamp = ()
        # grpcio may call the fetcher from its own threads.
        self._lock = threading.Lock()

    def _current_stamp(self) -> _Stamp:
        stamp = []
        for path in self._paths:
            try:
                stat = os.stat(path)
            except OSError as error:
                raise ValueError(f"cannot read {path}: {error.strerror}") from None
            stamp.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(stamp)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The configuration the files hold now; ValueError if they are unreadable or the key
        does not belong to the certificate."""
        with self._lock:
            stamp, configuration = self._stamped_configuration()
            self._stamp = stamp
            return configuration

    def _stamped_configuration(self) -> tuple[_Stamp, grpc.ServerCertificateConfiguration]:
        """The files' configuration and their stamp. The stamp is empty (so the next look loads
        again) when a file changed while being read, as between the certificate's and the key's
        rewrite."""
        before = self._current_stamp()
        try:
            # Only to check that the pair matches: grpcio would refuse every handshake otherwise.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self._tls.certificate, self._tls.key)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"{self._tls.certificate} and {self._tls.key} are not a certificate and its key: {error}"
            ) from None
        pair = (_read(self._tls.key, "TLS key"), _read(self._tls.certificate, "TLS certificate"))
        client_ca = _read(self._tls.client_ca, "client CA") if self._tls.client_ca else None
        configuration = grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)
        return (before if self._current_stamp() == before else ()), configuration

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpcio before every handshake. Files that cannot be used right now (in the
        middle of a rewrite: missing, or a new certificate beside the old key) keep the
        configuration already loaded; the next handshake looks again."""
        try:
            with self._lock:
                if self._current_stamp() == self._stamp:
                    return None
                stamp, configuration = self._stamped_configuration()
                self._stamp = stamp
        except ValueError as error:
            log.warning("tls files not usable; keeping the loaded certificate", extra={"error": str(error)})
            return None
        log.info("tls certificate reloaded", extra={"certificate": str(self._tls.certificate)})
        return configuration


@dataclass(frozen=True)
class ChannelTls:
    """How a channel verifies its server and, for mTLS, authenticates itself."""

    ca: Path | None = None
    certificate: Path | None = None
    key: Path | None = None
    server_name: str = ""

    @staticmethod
    def add_flags(flags: FlagParser, prefix: str = "--tls", *, peer: str = "the server") -> None:
        """`<prefix>-ca`, `<prefix>-cert`, `<prefix>-key`, `<prefix>-server-name`."""
        flags.add(
            f"{prefix}-ca",
            type=str,
            default="",
            help=f"PEM CA bundle that verifies {peer}; turns TLS on (empty: plaintext)",
        )
        flags.add(f"{prefix}-cert", type=str, default="", help="PEM client certificate for mTLS")
        flags.add(f"{prefix}-key", type=str, default="", help="PEM private key of the client certificate")
        flags.add(
            f"{prefix}-server-name",
            type=str,
            default="",
            help=f"name to verify in {peer}'s certificate instead of the target's host",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, prefix: str = "tls") -> ChannelTls | None:
        """None for plaintext. `prefix` is the flags' prefix as an attribute (`upstream_tls`)."""
        values = {part: getattr(args, f"{prefix}_{part}") for part in ("ca", "cert", "key", "server_name")}
        flag = "--" + prefix.replace("_", "-")
        if not values["ca"]:
            if values["cert"] or values["key"] or values["server_name"]:
                raise SystemExit(f"{flag}-cert, {flag}-key and {flag}-server-name need {flag}-ca")
            return None
        if bool(values["cert"]) != bool(values["key"]):
            raise SystemExit(f"{flag}-cert and {flag}-key go together")
        return cls(
            Path(values["ca"]),
            _optional_path(values["cert"]),
            _optional_path(values["key"]),
            values["server_name"],
        )

    @classmethod
    def from_environment(cls, service: str) -> ChannelTls | None:
        """The settings the VOICEPIPE_<SERVICE>_TLS_* variables give (for programs without flags
        of their own, such as the benchmark's load generators)."""
        flags = FlagParser(service, "")
        cls.add_flags(flags)
        return cls.from_args(flags.parse([]))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS client key") if self.key else None,
            certificate_chain=_read(self.certificate, "TLS client certificate") if self.certificate else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


ChannelOptions = Sequence[tuple[str, str | int]]


def open_channel(
    target: str,
    tls: ChannelTls | None,
    options: ChannelOptions = (),
    *,
    call_credentials: grpc.CallCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A plaintext channel when `tls` is None, else a TLS one (with `call_credentials` sent on
    every call; gRPC sends call credentials over TLS only)."""
    if tls is None:
        if call_credentials is not None:
            raise ValueError("call credentials need TLS")
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    credentials = tls.credentials()
    if call_credentials is not None:
        credentials = grpc.composite_channel_credentials(credentials, call_credentials)
    return grpc.aio.secure_channel(
        target, credentials, options=[*options, *tls.options()], interceptors=interceptors
    )
