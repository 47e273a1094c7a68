"""Resumption tickets: a conversation's state handed to the client after every turn, so that
any orchestrator replica holding the same key can continue it (see voice_agent.proto).

A ticket is one version byte, the HMAC-SHA256 of the rest, then a ResumptionState message
(resumption.proto). It is signed, not encrypted: it holds what the caller sent or heard.

The keys file (`--resumption-keys-file`, a file or a mounted Secret) holds one key per line,
hex, at least 32 bytes each; blank lines and lines starting with # are skipped. The first key
signs; every key verifies. To rotate without failing a ticket in flight, in three rollouts:
add the new key as the second line, then move it first, then (after the ticket lifetime)
remove the old one. A new key:

    python -m orchestrator.tickets new-key
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from voice.v1 import language_model_pb2, resumption_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe import history

VERSION = b"\x01"
MAC_BYTES = hashlib.sha256().digest_size
# The contract's limit on a ticket (SessionConfig.resumption_ticket); histories are cut to fit.
MAX_TICKET_BYTES = 65536
MIN_KEY_BYTES = 32


class TicketRejected(Exception):
    """A ticket not accepted: the status and the message the client gets (never its contents)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_keys(text: str) -> tuple[bytes, ...]:
    """The keys of a keys file's text; ValueError saying what is wrong (never quoting a key)."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            raise ValueError(f"line {number}: a key is written in hex") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"line {number}: a key needs at least {MIN_KEY_BYTES} bytes")
        keys.append(key)
    if not keys:
        raise ValueError("no key")
    return tuple(keys)


def load_keys(path: str) -> tuple[bytes, ...]:
    """The keys of the file; SystemExit with the reason when it cannot be used."""
    try:
        return parse_keys(Path(path).read_text())
    except OSError as error:
        raise SystemExit(f"cannot read the resumption keys file {path}: {error.strerror}") from None
    except ValueError as error:
        raise SystemExit(f"{path}: {error}") from None


def _history_field_bytes(message: language_model_pb2.ChatMessage) -> int:
    """What `message` adds to a serialised ResumptionState: its tag, length and bytes."""
    size = message.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def ticket_history(
    messages: Sequence[language_model_pb2.ChatMessage], budget: int
) -> list[language_model_pb2.ChatMessage]:
    """The history a ticket carries: cut by the history rule (voicepipe.history) to `budget`
    bytes, a turn at a time, the newest turn too if need be (a ticket is never refused for it)."""
    return history.trim(
        messages,
        budget,
        _history_field_bytes,
        is_system=lambda m: m.role == language_model_pb2.ROLE_SYSTEM,
        is_user=lambda m: m.role == language_model_pb2.ROLE_USER,
        drop_step=1,
        keep_newest=False,
    )


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


@dataclass(frozen=True)
class Tickets:
    """Signs and checks the tickets of one orchestrator: `keys[0]` signs, every key verifies."""

    keys: tuple[bytes, ...]
    ttl_s: float

    def issue(self, template: resumption_pb2.ResumptionState) -> pb.ResumptionTicket | None:
        """The signed ticket of `template` with an expiry, its history cut (oldest turns first)
        to fit MAX_TICKET_BYTES; None when not even its system messages fit."""
        state = resumption_pb2.ResumptionState()
        state.CopyFrom(template)
        state.expires_at.FromNanoseconds(time.time_ns() + int(self.ttl_s * 1e9))
        del state.history[:]
        budget = MAX_TICKET_BYTES - len(VERSION) - MAC_BYTES - state.ByteSize()
        state.history.extend(ticket_history(template.history, budget))
        if len(VERSION) + MAC_BYTES + state.ByteSize() > MAX_TICKET_BYTES:
            return None
        payload = state.SerializeToString()
        return pb.ResumptionTicket(
            ticket=VERSION + _mac(self.keys[0], payload) + payload,
            audio_offset=state.audio_offset,
            turns=state.turns,
            expires_at=state.expires_at,
        )

    def open(self, ticket: bytes, tenant: str) -> resumption_pb2.ResumptionState:
        """The state a ticket carries, once it is known to be ours, unexpired and the tenant's."""
        if not 0 < len(ticket) <= MAX_TICKET_BYTES:
            raise TicketRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config.resumption_ticket must be 1 to {MAX_TICKET_BYTES} bytes, got {len(ticket)}",
            )
        if len(ticket) <= len(VERSION) + MAC_BYTES or ticket[:1] != VERSION:
            raise TicketRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                "config.resumption_ticket is not a resumption ticket of this service",
            )
        mac, payload = ticket[1 : 1 + MAC_BYTES], ticket[1 + MAC_BYTES :]
        # Every key is tried, in constant time each.
        if not any([hmac.compare_digest(mac, _mac(key, payload)) for key in self.keys]):
            raise TicketRejected(
                grpc.StatusCode.PERMISSION_DENIED,
                "the resumption ticket's signature does not verify: it was altered or not issued here",
            )
        state = resumption_pb2.ResumptionState()
        try:
            state.ParseFromString(payload)
        except DecodeError:
            raise TicketRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "the resumption ticket's contents do not parse"
            ) from None
        if state.expires_at.ToNanoseconds() <= time.time_ns():
            raise TicketRejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the resumption ticket expired at {state.expires_at.ToJsonString()}",
            )
        if state.tenant != tenant:
            raise TicketRejected(
                grpc.StatusCode.PERMISSION_DENIED, "the resumption ticket belongs to another tenant"
            )
        return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.tickets", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help="print a new random key for the resumption keys file")
    parser.parse_args(argv)
    print(secrets.token_hex(MIN_KEY_BYTES))


if __name__ == "__main__":
    main()
