"""`python -m orchestrator`: the voice agent service in front of the STT, LLM and TTS stages."""

from __future__ import annotations

import argparse
import logging

from orchestrator import auth
from orchestrator.sentences import FIRST_CLAUSE_MIN_WORDS, FIRST_SEGMENTS
from orchestrator.service import VoiceAgentServicer
from orchestrator.session import SessionLimits
from orchestrator.tickets import Tickets, load_keys
from orchestrator.turn import REPLY_MAX_TOKENS
from orchestrator.upstreams import LB_POLICIES, Upstreams
from voice.v1 import voice_agent_pb2, voice_agent_pb2_grpc
from voicepipe.config import FlagParser, parse_bool
from voicepipe.engines import PORTS, ROLES
from voicepipe.server import GrpcService, Registration, run, wait_for_shutdown_signal
from voicepipe.settings import ServerSettings
from voicepipe.tls import ChannelTls

log = logging.getLogger("orchestrator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("orchestrator", "Chains STT, LLM and TTS into streaming voice conversations.")
    ports = PORTS["orchestrator"]
    ServerSettings.add_flags(flags, port=ports.port, metrics_port=ports.metrics_port)
    for role in ROLES:
        default = f"127.0.0.1:{PORTS[role].port}"
        flags.add(f"--{role}", type=str, default=default, help=f"gRPC target of the {role.upper()} stage")
    flags.add(
        "--lb-policy",
        type=str,
        default=LB_POLICIES[0],
        choices=LB_POLICIES,
        help="how each stage channel spreads calls over the addresses its target resolves to"
        " (round_robin: every replica, skipping those not SERVING; pick_first: one connection)",
    )
    flags.add(
        "--max-sessions", type=int, default=1000, help="concurrent conversations; more get RESOURCE_EXHAUSTED"
    )
    flags.add(
        "--turn-timeout", type=float, default=30.0, help="deadline in seconds of one turn's LLM and TTS calls"
    )
    flags.add(
        "--reply-max-tokens",
        type=int,
        default=REPLY_MAX_TOKENS,
        help="cap on the tokens of one spoken reply, asked of the LLM stage (0: the stage's default);"
        " a reply cut there is spoken as far as it got",
    )
    flags.add("--session-timeout", type=float, default=3600.0, help="longest conversation, in seconds")
    flags.add(
        "--max-output-events", type=int, default=2000, help="events buffered for a client that reads slowly"
    )
    flags.add(
        "--slow-client-timeout",
        type=float,
        default=10.0,
        help="seconds a full event buffer may wait for the client",
    )
    flags.add(
        "--reply-audio-lead-ms",
        type=float,
        default=250.0,
        help="how far reply audio may run ahead of real-time playback (bounds what barge-in discards)",
    )
    flags.add(
        "--tokens-file",
        type=str,
        default="",
        help="JSON file of tenants and their token hashes; Converse then needs a bearer token (empty: open)",
    )
    flags.add(
        "--tenant-max-sessions",
        type=int,
        default=100,
        help="concurrent conversations of one tenant unless its entry says otherwise (0: no own limit)",
    )
    flags.add(
        "--end-of-utterance-silence-ms",
        type=int,
        default=0,
        help="silence that ends the user's utterance, asked of the STT stage (0: the stage's default,"
        " which each engine declares to suit what it hears)",
    )
    flags.add(
        "--speculative-generation",
        type=parse_bool,
        default=True,
        help="start a turn's LLM and TTS on STT's speculative transcript, at the start of the pause"
        " (its reply is held until the final transcript confirms the words, and cancelled if it"
        " does not)",
    )
    flags.add(
        "--first-segment",
        type=str,
        default="clause",
        choices=FIRST_SEGMENTS,
        help="where a reply's first TTS segment may end: at a clause (comma, semicolon, colon, dash)"
        f" once it has {FIRST_CLAUSE_MIN_WORDS} words, or only at the end of its first sentence;"
        " later segments are whole sentences",
    )
    flags.add(
        "--resumption-keys-file",
        type=str,
        default="",
        help="file of hex keys (one a line; the first signs, all verify) shared by every replica:"
        " clients then get resumption tickets and may continue a conversation on any replica (empty: off)",
    )
    flags.add(
        "--resumption-ticket-ttl",
        type=float,
        default=600.0,
        help="seconds a resumption ticket is accepted after it was issued",
    )
    ChannelTls.add_flags(flags, "--upstream-tls", peer="each stage")
    return flags.parse(argv)


async def serve(args: argparse.Namespace) -> None:
    service: GrpcService | None = None

    async def follow_upstreams(all_serving: bool) -> None:
        if service is not None:
            await service.set_serving(all_serving)

    settings = ServerSettings.from_args(args)
    gate = auth.gate(args.tokens_file, args.tenant_max_sessions)
    if args.tokens_file and settings.tls is None:
        log.warning("tokens are accepted over plaintext: anyone on the path can read them; serve TLS")
    upstreams = Upstreams(
        args.stt,
        args.llm,
        args.tts,
        follow_upstreams,
        tls=ChannelTls.from_args(args, "upstream_tls"),
        lb_policy=args.lb_policy,
    )
    limits = SessionLimits(
        turn_budget_s=args.turn_timeout,
        session_budget_s=args.session_timeout,
        max_output_events=args.max_output_events,
        slow_client_timeout_s=args.slow_client_timeout,
        reply_audio_lead_s=args.reply_audio_lead_ms / 1000,
        end_of_utterance_silence_ms=args.end_of_utterance_silence_ms,
        first_segment=args.first_segment,
        reply_max_tokens=args.reply_max_tokens,
        speculative_generation=args.speculative_generation,
    )
    tickets = (
        Tickets(load_keys(args.resumption_keys_file), args.resumption_ticket_ttl)
        if args.resumption_keys_file
        else None
    )
    servicer = VoiceAgentServicer(upstreams, limits, args.max_sessions, gate, tickets)
    service = GrpcService(
        "orchestrator",
        settings,
        [
            Registration(
                voice_agent_pb2.DESCRIPTOR.services_by_name["VoiceAgentService"].full_name,
                voice_agent_pb2_grpc.add_VoiceAgentServiceServicer_to_server,
                servicer,
            )
        ],
    )
    # NOT_SERVING until every stage reports SERVING.
    await service.start(serving=False)
    upstreams.start()
    try:
        await wait_for_shutdown_signal()
    finally:
        await service.drain()  # NOT_SERVING; new calls are still served for --drain-delay
        if tickets is not None:
            # Then conversations end after the turn they are playing, their tickets sent: their
            # clients continue on another replica. Without tickets they get --shutdown-grace.
            servicer.conversations.drain()
        await service.stop()
        await upstreams.close()


def main() -> None:
    args = parse_args()
    run(serve(args), "orchestrator", ServerSettings.from_args(args))


if __name__ == "__main__":
    main()
