"""Who may open a conversation: bearer tokens per tenant and each tenant's concurrent-session quota.

The tenants file (`--tokens-file`) holds, per tenant, the SHA-256 of its token, never the token:

    {"tenants": {"acme": {"token_sha256": "9f86d0...", "max_sessions": 20}}}

`max_sessions` may be left out (then `--tenant-max-sessions` applies). The file is re-read when
it changes, so tokens are issued and revoked without a restart:

    python -m orchestrator.auth issue acme --file tenants.json [--max-sessions 20]
    python -m orchestrator.auth revoke acme --file tenants.json

A token is looked up by its hash with a constant-time comparison against every tenant. Tokens
are never logged and never put in metrics; tenant names are, in both.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

# The file is looked at (one stat) at most this often, at a conversation's admission.
RELOAD_CHECK_INTERVAL_S = 1.0
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

TENANT_ACTIVE_SESSIONS = Gauge(
    "voicepipe_tenant_active_sessions", "Conversations in progress, by tenant.", ("tenant",)
)
TENANT_SESSIONS_REJECTED = Counter(
    "voicepipe_tenant_sessions_rejected_total",
    "Conversations of a known tenant refused because the tenant was at its quota.",
    ("tenant",),
)
AUTHENTICATION_FAILURES = Counter(
    "voicepipe_authentication_failures_total",
    "Conversations refused with UNAUTHENTICATED: no token, not a bearer token, or an unknown one.",
    ("reason",),
)


def token_hash(token: str) -> str:
    """What the tenants file stores for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    token_sha256: bytes
    max_sessions: int  # 0: only the orchestrator's own --max-sessions


def parse_tenants(text: str, default_max_sessions: int) -> tuple[Tenant, ...]:
    """The tenants of a file's text; ValueError saying what is wrong (never quoting a hash)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} at line {error.lineno}") from None
    entries = document.get("tenants") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ValueError('expected {"tenants": {"<name>": {"token_sha256": "<hex>"}}}')
    tenants: list[Tenant] = []
    for name, entry in entries.items():
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r}: letters, digits, '.', '_' or '-', at most 63")
        digest = entry.get("token_sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not SHA256_HEX.match(digest):
            raise ValueError(f"tenant {name}: token_sha256 must be 64 lower-case hex digits")
        limit = entry.get("max_sessions", default_max_sessions)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"tenant {name}: max_sessions must be a whole number >= 0")
        tenants.append(Tenant(name, bytes.fromhex(digest), limit))
    return tuple(tenants)


class TenantFile:
    """The tenants file, re-read when its modification time, size or inode change. A file that
    no longer parses keeps the tenants last loaded (and says so in the log)."""

    def __init__(self, path: Path, default_max_sessions: int) -> None:
        self.path = path
        self._default = default_max_sessions
        self._stamp = self._current_stamp()
        try:
            self._tenants = parse_tenants(path.read_text(), default_max_sessions)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        self._checked_at = time.monotonic()
        log.info("tenants loaded", extra={"tenants": len(self._tenants), "file": str(path)})

    def _current_stamp(self) -> tuple[int, int, int]:
        try:
            stat = os.stat(self.path)
        except OSError as error:
            raise ValueError(f"cannot read the tokens file {self.path}: {error.strerror}") from None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def tenants(self) -> tuple[Tenant, ...]:
        now = time.monotonic()
        if now - self._checked_at >= RELOAD_CHECK_INTERVAL_S:
            self._checked_at = now
            self._reload_if_changed()
        return self._tenants

    def _reload_if_changed(self) -> None:
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._tenants = parse_tenants(self.path.read_text(), self._default)
        except (OSError, ValueError) as error:
            log.error(
                "tenants file not reloaded; keeping the tenants loaded before", extra={"error": str(error)}
            )
            return
        log.info("tenants reloaded", extra={"tenants": len(self._tenants), "file": str(self.path)})


class Refused(Exception):
    """A conversation not admitted: the status and the message the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # for voicepipe_sessions_rejected_total


@dataclass(frozen=True)
class Admission:
    """An admitted conversation's tenant ("" without authentication) and the function that frees
    its quota slot (idempotent)."""

    tenant: str
    release: Callable[[], None]


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        AUTHENTICATION_FAILURES.labels("missing").inc()
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "no token: send metadata authorization: Bearer <token>",
            "unauthenticated",
        )
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        AUTHENTICATION_FAILURES.labels("malformed").inc()
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "the authorization metadata is not 'Bearer <token>'",
            "unauthenticated",
        )
    return token.strip()


class TenantGate:
    """Admission at Converse: the token names the tenant, the tenant's quota must have room."""

    def __init__(self, tenants: TenantFile) -> None:
        self._file = tenants
        self._active: dict[str, int] = {}

    def admit(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Admission:
        """The tenant's admission, or Refused (UNAUTHENTICATED, RESOURCE_EXHAUSTED)."""
        tenant = self._identify(_bearer_token(metadata))
        active = self._active.get(tenant.name, 0)
        if tenant.max_sessions and active >= tenant.max_sessions:
            TENANT_SESSIONS_REJECTED.labels(tenant.name).inc()
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant {tenant.name} is at its limit of {tenant.max_sessions} concurrent"
                " conversations; retry later",
                "tenant_limit",
            )
        self._active[tenant.name] = active + 1
        TENANT_ACTIVE_SESSIONS.labels(tenant.name).inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._active[tenant.name] -= 1
                TENANT_ACTIVE_SESSIONS.labels(tenant.name).dec()

        return Admission(tenant.name, release)

    def _identify(self, token: str) -> Tenant:
        digest = hashlib.sha256(token.encode()).digest()
        found: Tenant | None = None
        # Every tenant is compared, in constant time each, so timing tells nothing of which.
        for tenant in self._file.tenants():
            if hmac.compare_digest(digest, tenant.token_sha256):
                found = tenant
        if found is None:
            AUTHENTICATION_FAILURES.labels("unknown").inc()
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token", "unauthenticated")
        return found


class OpenGate:
    """Admission without authentication (no tokens file): everyone, no tenant."""

    def admit(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Admission:
        return Admission("", lambda: None)


Gate = TenantGate | OpenGate


def gate(tokens_file: str, default_max_sessions: int) -> Gate:
    """The gate the orchestrator's flags ask for; SystemExit with the reason if the file is bad."""
    if not tokens_file:
        return OpenGate()
    try:
        return TenantGate(TenantFile(Path(tokens_file), default_max_sessions))
    except ValueError as error:
        raise SystemExit(str(error)) from None


# --- issuing tokens -----------------------------------------------------------------------------


def _read_document(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"tenants": {}}
    document = json.loads(path.read_text())
    parse_tenants(json.dumps(document), 0)  # refuse to edit a file the orchestrator would refuse
    assert isinstance(document, dict)
    return document


def _write_document(path: Path, document: dict[str, Any]) -> None:
    """Replaced atomically: the orchestrator never reads half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(document, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(temporary, path)


def issue(path: Path, tenant: str, max_sessions: int | None) -> str:
    """A new random token for `tenant` (replacing its old one); only its hash is written."""
    if not TENANT_NAME.match(tenant):
        raise ValueError(f"tenant name {tenant!r}: letters, digits, '.', '_' or '-', at most 63")
    document = _read_document(path)
    token = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"token_sha256": token_hash(token)}
    previous = document["tenants"].get(tenant, {})
    limit = max_sessions if max_sessions is not None else previous.get("max_sessions")
    if limit is not None:
        entry["max_sessions"] = limit
    document["tenants"][tenant] = entry
    _write_document(path, document)
    return token


def revoke(path: Path, tenant: str) -> bool:
    document = _read_document(path)
    removed = document["tenants"].pop(tenant, None) is not None
    _write_document(path, document)
    return removed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.auth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    issuing = commands.add_parser("issue", help="print a new token for a tenant; store its hash")
    issuing.add_argument("tenant")
    issuing.add_argument("--file", type=Path, required=True, help="the tenants file (created if missing)")
    issuing.add_argument(
        "--max-sessions", type=int, default=None, help="the tenant's concurrent conversations"
    )
    revoking = commands.add_parser("revoke", help="remove a tenant and its token")
    revoking.add_argument("tenant")
    revoking.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "issue":
            print(issue(args.file, args.tenant, args.max_sessions))
        elif not revoke(args.file, args.tenant):
            raise SystemExit(f"no tenant {args.tenant} in {args.file}")
    except ValueError as error:
        raise SystemExit(f"{args.file}: {error}") from None


if __name__ == "__main__":
    main()
