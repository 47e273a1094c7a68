"""A local certificate authority for development, tests and compose: one CA and one certificate
per service, valid for localhost, 127.0.0.1 and the compose service names.

    python -m voicepipe_tools.certs out/certs        (what `make certs` runs)

writes `ca.pem` (the CA certificate every side trusts), `ca-key.pem`, and `<name>.pem` /
`<name>-key.pem` for each of stt, llm, tts, orchestrator and client. Service certificates may
serve and also authenticate as clients (mTLS: the orchestrator presents its own to the stages,
a health check presents the service's own). Production takes its certificates from its own CA
(cert-manager, Vault, ...); the servers only read PEM files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("stt", "llm", "tts", "orchestrator")
# The client library, the CLI and grpcurl present this one to an mTLS orchestrator.
CLIENT = "client"
LOCAL_NAMES = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _subject_alternative_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    certificate: bytes
    key: bytes

    def write(self, directory: Path, name: str) -> None:
        """`<name>.pem` and `<name>-key.pem`, each replaced atomically (a server watching the
        files never reads half of one); the key readable by its owner only."""
        _write_atomically(directory / f"{name}.pem", self.certificate, 0o644)
        _write_atomically(directory / f"{name}-key.pem", self.key, 0o600)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class Authority:
    """A self-signed CA that issues leaf certificates."""

    def __init__(self, name: str = "voicepipe local CA", *, days: int = DEFAULT_DAYS) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self._name = subject
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def certificate(self) -> bytes:
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def own(self) -> Issued:
        return Issued(self.certificate, _pem_key(self._key))

    def issue(
        self,
        name: str,
        names: Sequence[str] = LOCAL_NAMES,
        *,
        days: int = DEFAULT_DAYS,
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        """A certificate for `name` valid for the given DNS names and IP addresses, for both
        server and client authentication; `not_after` in the past makes an expired one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        end = not_after or now + datetime.timedelta(days=days)
        start = min(now, end) - datetime.timedelta(days=1)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_subject_alternative_names(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def serial_number(certificate_pem: bytes) -> int:
    """The serial number of a PEM certificate (tells two certificates of one name apart)."""
    return x509.load_pem_x509_certificate(certificate_pem).serial_number


def write_local_pki(
    directory: Path, *, extra_names: Sequence[str] = (), days: int = DEFAULT_DAYS
) -> Authority:
    """The CA and one certificate per service and for the client, in `directory`; returns the CA
    (to issue more, e.g. a rotated certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority(days=days)
    authority.own().write(directory, "ca")
    for name in (*SERVICES, CLIENT):
        names = [*LOCAL_NAMES, *SERVICES, *extra_names] if name != CLIENT else [CLIENT, *LOCAL_NAMES]
        authority.issue(name, names, days=days).write(directory, name)
    return authority


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m voicepipe_tools.certs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", type=Path, help="where the PEM files are written")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="one more DNS name or IP address every service certificate is valid for (repeatable)",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of every certificate")
    args = parser.parse_args(argv)
    write_local_pki(args.directory, extra_names=args.name, days=args.days)
    print(f"wrote a CA and certificates for {', '.join((*SERVICES, CLIENT))} to {args.directory}")


if __name__ == "__main__":
    main()
