"""The command-line client: speaks phrases in the stub audio code (or streams a WAV file, or types
text), prints transcripts, agent text and a latency table per turn, and writes reply audio.

    python -m voicepipe_tools.client --say "Hello there" --say "What is 2 plus 3?" --out-dir out
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from stubs import audio_code
from voice.v1 import common_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe import pcm
from voicepipe.audio_format import PcmFormat
from voicepipe.config import FlagParser
from voicepipe.tls import ChannelTls
from voicepipe_client.audio import Speaker, Utterance
from voicepipe_client.channel import connect
from voicepipe_client.conversation import Conversation, ConversationEnded, SessionSettings
from voicepipe_client.microphone import Microphone
from voicepipe_client.turns import Turn

# Reply audio the client hears before it barges in with the next phrase.
BARGE_IN_AFTER_S = 1.0


def _ms(duration: Any, decimals: int = 1) -> str:
    return f"{duration.ToNanoseconds() / 1e6:8.{decimals}f}"


def latency_table(turns: Sequence[Turn]) -> str:
    """One row per turn; the last four columns split "orch added": each stage's round trip beyond
    its own time, and the orchestrator's own processing."""
    header = (
        f"{'turn':>4} {'outcome':<11} {'client TTFA':>11} {'server TTFA':>11} {'STT final':>9}"
        f" {'LLM 1st tok':>11} {'LLM 1st sent':>12} {'TTS 1st aud':>11} {'orch added':>10}"
        f" {'= STT rt':>8} {'+ LLM rt':>8} {'+ TTS rt':>8} {'+ own':>8}   (ms)"
    )
    rows = [header]
    for turn in turns:
        ttfa = f"{turn.ttfa_s * 1000:11.1f}" if turn.ttfa_s is not None else f"{'-':>11}"
        if turn.completed is not None:
            lat = turn.completed.latency
            rows.append(
                f"{turn.turn_id:>4} {turn.outcome:<11} {ttfa} {_ms(lat.time_to_first_audio):>11} "
                f"{_ms(lat.stt_finalization):>9} {_ms(lat.llm_time_to_first_token):>11} "
                f"{_ms(lat.llm_time_to_first_sentence):>12} {_ms(lat.tts_time_to_first_audio):>11} "
                f"{_ms(lat.orchestrator_added):>10} {_ms(lat.stt_round_trip, 2)} "
                f"{_ms(lat.llm_round_trip, 2)} {_ms(lat.tts_round_trip, 2)} "
                f"{_ms(lat.orchestrator_processing, 2)}"
            )
        else:
            rows.append(f"{turn.turn_id:>4} {turn.outcome:<11} {ttfa}")
    return "\n".join(rows)


def write_wav(path: Path, audio: bytes, fmt: PcmFormat) -> None:
    samples = fmt.decode(audio)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(fmt.sample_rate)
        out.writeframes(pcm.pcm16_to_bytes(samples))


def read_wav(path: Path) -> tuple[npt.NDArray[np.int16], int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16-bit mono PCM")
        return pcm.bytes_to_pcm16(wav.readframes(wav.getnframes())), wav.getframerate()


class _Step(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        steps = getattr(namespace, "steps", None) or []
        steps.append((self.dest, values))
        namespace.steps = steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    flags = FlagParser("client", __doc__.split("\n\n")[0], module="voicepipe_tools.client")
    parser = flags.parser
    parser.add_argument("--target", default="127.0.0.1:50051", help="orchestrator gRPC target")
    ChannelTls.add_flags(flags, peer="the orchestrator")
    flags.add(
        "--token",
        type=str,
        default="",
        help="bearer token of your tenant (prefer the variable: a flag shows in the process list)",
    )
    parser.add_argument(
        "--say", dest="say", action=_Step, help="speak TEXT in the stub audio code (repeatable)"
    )
    parser.add_argument(
        "--barge-in",
        dest="barge_in",
        action=_Step,
        help=f"speak TEXT over the previous reply after {BARGE_IN_AFTER_S:g} s",
    )
    parser.add_argument("--type", dest="type", action=_Step, help="send TEXT as a text turn (repeatable)")
    parser.add_argument("--wav", dest="wav", action=_Step, help="stream a 16-bit mono WAV file")
    parser.add_argument(
        "--speaker",
        default="stub",
        help="who speaks --say and --barge-in text: 'stub' (the stub audio code, for the stub STT) or"
        " 'espeak[:VOICE]' (real speech by espeak-ng, for a real STT; VOICE defaults to en-gb)",
    )
    parser.add_argument("--sample-rate", type=int, default=16000, help="input and output sample rate, Hz")
    parser.add_argument("--out-dir", type=Path, default=Path("out"), help="where reply WAVs are written")
    parser.add_argument(
        "--fast", action="store_true", help="send audio as fast as possible, not in real time"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="deadline of the whole conversation, seconds"
    )
    parser.set_defaults(steps=[])
    return flags.parse(argv)


def speaker(name: str) -> Speaker:
    """The --speaker: the stub audio code, or espeak-ng in a voice (imported only when asked for,
    so the client needs no engine unless it speaks with one)."""
    if name == "stub":
        return audio_code.render
    engine, _, voice = name.partition(":")
    if engine != "espeak":
        raise SystemExit(f"--speaker {name}: use stub or espeak[:VOICE]")
    from tts_espeak.speaker import EspeakSpeaker

    return EspeakSpeaker(voice or "en-gb")


def utterances(args: argparse.Namespace, fmt: PcmFormat) -> list[Utterance | None]:
    """Each step's audio, rendered before the conversation starts (None for a typed step)."""
    speak = speaker(args.speaker)
    rendered: list[Utterance | None] = []
    for kind, value in args.steps:
        if kind in ("say", "barge_in"):
            rendered.append(Utterance.spoken(speak, value, fmt))
        elif kind == "wav":
            samples, rate = read_wav(Path(value))
            if rate != fmt.sample_rate:
                raise SystemExit(f"{value}: {rate} Hz, but --sample-rate is {fmt.sample_rate}")
            rendered.append(Utterance.from_samples(samples, fmt))
        else:
            rendered.append(None)
    return rendered


async def converse(args: argparse.Namespace) -> int:
    fmt = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, args.sample_rate)
    audio = utterances(args, fmt)
    settings = SessionSettings(input_format=fmt, output_format=fmt)
    async with connect(args.target, tls=ChannelTls.from_args(args), token=args.token) as channel:
        microphone = Microphone(realtime=not args.fast)
        conversation = Conversation(channel, settings, microphone=microphone, timeout_s=args.timeout)
        async with conversation:
            # Nothing more is written before the server has opened the session (or refused it:
            # a write crossing the refusal would hide its status, grpc/grpc#36066).
            await conversation.assembler.session_started.wait()
            previous: Turn | None = None
            # A server that ended the call stops the steps; its status is reported below.
            with contextlib.suppress(ConversationEnded):
                for (kind, value), phrase in zip(args.steps, audio, strict=True):
                    if previous is not None and kind != "barge_in":
                        await previous.done.wait()
                    if kind == "say":
                        assert phrase is not None
                        previous = conversation.say(phrase)
                    elif kind == "barge_in":
                        assert phrase is not None
                        if previous is None:
                            previous = conversation.say(phrase)
                        else:
                            previous = await conversation.barge_in(previous, phrase, after_s=BARGE_IN_AFTER_S)
                    elif kind == "type":
                        previous = await conversation.type(value)
                    elif kind == "wav":
                        assert phrase is not None
                        await conversation.play(phrase).sent.wait()
            code = await conversation.finish()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for turn in conversation.turns:
            print(f"\n[turn {turn.turn_id}] user:  {turn.user_text}")
            print(f"[turn {turn.turn_id}] agent: {turn.agent_text}")
            if turn.heard_text is not None:
                print(f"[turn {turn.turn_id}] interrupted; the user heard: {turn.heard_text!r}")
            for error in turn.errors:
                print(
                    f"[turn {turn.turn_id}] error: {pb.Stage.Name(error.stage)} {error.code}: {error.message}"
                )
            if turn.audio:
                path = args.out_dir / f"turn-{turn.turn_id}.wav"
                write_wav(path, bytes(turn.audio), fmt)
                seconds = len(turn.audio) / fmt.bytes_per_sample / fmt.sample_rate
                print(f"[turn {turn.turn_id}] reply audio: {seconds:.2f} s -> {path}")
        print("\n" + latency_table(conversation.turns))
        if code != grpc.StatusCode.OK:
            print(f"conversation ended with {code.name}", file=sys.stderr)
            return 1
        return 0


def main() -> None:
    args = parse_args()
    if not args.steps:
        raise SystemExit("nothing to say: give --say, --type or --wav")
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(converse(args)))


if __name__ == "__main__":
    main()
