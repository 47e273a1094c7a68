"""Keepalive and connection-age settings for both ends of every internal link (gRFC A8, A9).

Chosen together so that
- a dead connection (peer gone, cable cut, black hole) is found within
  CLIENT_PING_INTERVAL_MS + CLIENT_PING_TIMEOUT_MS = 8 s, with or without calls in flight;
- no client ping can trip the server's ping policy (GOAWAY "too_many_pings"): the server
  accepts pings SERVER_MIN_PING_INTERVAL_MS apart, less than the client's interval;
- servers send GOAWAY after `--max-connection-age` so clients reconnect and rebalance; calls on
  the old connection get `--max-connection-age-grace` to finish.
"""

from __future__ import annotations

CLIENT_PING_INTERVAL_MS = 5_000
CLIENT_PING_TIMEOUT_MS = 3_000
SERVER_MIN_PING_INTERVAL_MS = 4_000
SERVER_PING_INTERVAL_MS = 30_000
SERVER_PING_TIMEOUT_MS = 10_000
# Messages are audio chunks (at most 2 s of 48 kHz audio) or text; 4 MiB leaves room.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def server_options(max_connection_age_s: float, max_connection_age_grace_s: float) -> list[tuple[str, int]]:
    options = [
        # Accept client pings this often, also on connections without calls.
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Allow a few early pings (clock jitter) before a GOAWAY.
        ("grpc.http2.max_ping_strikes", 3),
        # The server pings too, so it frees the streams of clients that vanished.
        ("grpc.keepalive_time_ms", SERVER_PING_INTERVAL_MS),
        ("grpc.keepalive_timeout_ms", SERVER_PING_TIMEOUT_MS),
        # grpcio (1.85) times out every ping, keepalive pings too, by this arg (default 60 s), not
        # by keepalive_timeout_ms; without it a vanished client is found after 30 + 60 s.
        ("grpc.http2.ping_timeout_ms", SERVER_PING_TIMEOUT_MS),
        # Larger messages fail with RESOURCE_EXHAUSTED before reaching a handler.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Two servers must not silently share a port.
        ("grpc.so_reuseport", 0),
    ]
    if max_connection_age_s > 0:
        options += [
            # GOAWAY after this age so clients rebalance across replicas (gRFC A9).
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000)),
        ]
    return options


def client_options() -> list[tuple[str, int]]:
    return [
        # Ping every few seconds, also when idle, so a dead link is found before a turn needs it.
        ("grpc.keepalive_time_ms", CLIENT_PING_INTERVAL_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_PING_TIMEOUT_MS),
        # The timeout grpcio (1.85) really applies to an unanswered ping (default 60 s); without
        # it a black-holed link is found after ~60 s, not 8 (tests/chaos measure this).
        ("grpc.http2.ping_timeout_ms", CLIENT_PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0 = no limit on pings without data; the server's policy above allows them.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Reconnect within half a second after a stage restarts (the default backs off to 120 s);
        # a refused connection attempt on loopback or in-cluster costs next to nothing.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]
