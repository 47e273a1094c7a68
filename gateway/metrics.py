"""The gateway's Prometheus metrics (served on --metrics-port like every service's)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Gauge("voicepipe_gateway_sockets", "WebSocket conversations open now.")
OPENED = Counter("voicepipe_gateway_sockets_opened_total", "WebSocket conversations opened.")
CLOSES = Counter(
    "voicepipe_gateway_socket_closes_total",
    "WebSocket conversations ended, by the close code the gateway sent (README: the WebSocket protocol).",
    ("code",),
)
AUDIO_IN = Counter("voicepipe_gateway_audio_frames_in_total", "Binary audio frames received from callers.")
AUDIO_OUT = Counter("voicepipe_gateway_audio_frames_out_total", "Binary reply audio frames sent to callers.")
