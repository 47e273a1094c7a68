"""A conversation client: speaks phrases in the stub audio code (or streams a WAV file, or types
text), prints transcripts, agent text and a latency table per turn, and writes reply audio.

    python -m orchestrator.client --say "Hello there" --say "What is 2 plus 3?" --out-dir out
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from stubs import audio_code
from voice.v1 import common_pb2, voice_agent_pb2_grpc
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat

FRAME_MS = 20
# Reply audio the client hears before it barges in with the next phrase.
BARGE_IN_AFTER_S = 1.0


@dataclass
class TurnRecord:
    """Everything the client saw of one agent turn."""

    turn_id: str
    user_text: str
    agent_text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    completed: pb.TurnCompleted | None = None
    heard_text: str | None = None  # set when the turn was interrupted
    errors: list[pb.SessionError] = field(default_factory=list)
    speech_ended_at: float | None = None  # client clock: end of the last voiced frame sent
    first_audio_at: float | None = None
    first_audio: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ttfa_s(self) -> float | None:
        if self.speech_ended_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.speech_ended_at

    @property
    def outcome(self) -> str:
        if self.completed is not None:
            return "completed"
        if self.heard_text is not None:
            return "interrupted"
        return "failed" if self.errors else "open"


class VoiceClient:
    """One Converse call. Audio is sent in 20 ms frames, in real time if `realtime` (silence
    between phrases, as a live microphone would), else as fast as the server takes it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        input_format: PcmFormat,
        output_format: PcmFormat,
        realtime: bool,
        session_id: str = "",
        system_prompt: str = "",
        timeout_s: float | None = None,
    ) -> None:
        self.input_format = input_format
        self.output_format = output_format
        self.realtime = realtime
        self.session_id = session_id
        self.transcripts: list[str] = []  # final user transcripts
        self.turns: list[TurnRecord] = []
        self.errors: list[pb.SessionError] = []
        self._by_id: dict[str, TurnRecord] = {}
        self._events: asyncio.Queue[TurnRecord | pb.SessionError] = asyncio.Queue()
        self._speech: asyncio.Queue[tuple[bytes, int, asyncio.Future[float]]] = asyncio.Queue()
        self._config = pb.ConverseRequest(
            config=pb.SessionConfig(
                input_audio_format=input_format.to_proto(),
                output_audio_format=output_format.to_proto(),
                session_id=session_id,
                system_prompt=system_prompt,
            )
        )
        stub = voice_agent_pb2_grpc.VoiceAgentServiceStub(channel)
        self.call: Any = stub.Converse(timeout=timeout_s, wait_for_ready=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        self._pending_speech_end: float | None = None

    async def __aenter__(self) -> VoiceClient:
        await self.call.write(self._config)
        self._tasks = [
            asyncio.create_task(self._read(), name="client-reader"),
            asyncio.create_task(self._send_audio(), name="client-microphone"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.call.cancel()

    async def finish(self) -> grpc.StatusCode:
        """END_OF_INPUT, then wait for the server to finish and close the stream."""
        await self._speech.join()
        async with self._write_lock:
            await self.call.write(
                pb.ConverseRequest(control=pb.ControlMessage(type=pb.CONTROL_TYPE_END_OF_INPUT))
            )
            await self.call.done_writing()
        await self._tasks[0]
        code: grpc.StatusCode = await self.call.code()
        return code

    # --- input -----------------------------------------------------------------------------

    async def speak_samples(self, samples: npt.NDArray[np.int16], speech_end_sample: int) -> float:
        """Queues audio; returns the client time when the frame holding `speech_end_sample` left."""
        sent: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self._speech.put((self.input_format.encode(samples), speech_end_sample, sent))
        return await sent

    async def say(self, text: str) -> TurnRecord:
        """Speaks `text` and returns the turn it starts, once that turn is over."""
        turn = await self.speak(text)
        await turn.done.wait()
        return turn

    async def speak(self, text: str) -> TurnRecord:
        """Speaks `text`; returns the turn it starts as soon as it starts."""
        rendered = audio_code.render(text, self.input_format.sample_rate)
        self._pending_speech_end = await self.speak_samples(rendered.samples, rendered.speech_end_samples)
        return await self._next_turn()

    async def type(self, text: str) -> TurnRecord:
        """Sends a text turn and returns the turn, once it is over."""
        turn = await self.start_text_turn(text)
        await turn.done.wait()
        return turn

    async def start_text_turn(self, text: str) -> TurnRecord:
        """Sends a text turn; returns the turn as soon as it starts."""
        async with self._write_lock:
            self._pending_speech_end = time.monotonic()
            await self.call.write(pb.ConverseRequest(text=pb.TextTurn(text=text)))
        return await self._next_turn()

    async def _next_turn(self) -> TurnRecord:
        while True:
            event = await self._events.get()
            if isinstance(event, TurnRecord):
                return event
            # STT being unavailable delays the turn (the audio is kept and transcribed when it is
            # back); any other error means the turn will not start.
            if event.stage != pb.STAGE_STT:
                raise RuntimeError(
                    f"turn did not start: {pb.Stage.Name(event.stage)} {event.code}: {event.message}"
                )

    async def _send_audio(self) -> None:
        frame_bytes = self.input_format.bytes_for(FRAME_MS)
        silence = self.input_format.encode(
            np.zeros(frame_bytes // self.input_format.bytes_per_sample, np.int16)
        )
        bps = self.input_format.bytes_per_sample
        start = time.monotonic()
        frames = 0
        while True:
            if self.realtime and self._speech.empty():
                data, end_sample, sent = silence, -1, None
            else:
                data, end_sample, sent = await self._speech.get()
            for offset in range(0, len(data), frame_bytes):
                if self.realtime:
                    await asyncio.sleep(max(0.0, start + frames * FRAME_MS / 1000 - time.monotonic()))
                frame = data[offset : offset + frame_bytes]
                async with self._write_lock:
                    await self.call.write(pb.ConverseRequest(audio=frame))
                frames += 1
                if sent is not None and not sent.done() and (offset + len(frame)) // bps >= end_sample:
                    sent.set_result(time.monotonic())
            if sent is not None:
                if not sent.done():
                    sent.set_result(time.monotonic())
                self._speech.task_done()

    # --- output ----------------------------------------------------------------------------

    async def _read(self) -> None:
        async for response in self.call:
            kind = response.WhichOneof("event")
            turn = self._by_id.get(response.correlation.turn_id)
            if kind == "user_transcript" and response.user_transcript.is_final:
                self.transcripts.append(response.user_transcript.text)
            elif kind == "turn_started":
                turn = TurnRecord(response.correlation.turn_id, response.turn_started.user_text)
                turn.speech_ended_at, self._pending_speech_end = self._pending_speech_end, None
                self._by_id[turn.turn_id] = turn
                self.turns.append(turn)
                self._events.put_nowait(turn)
            elif turn is not None and kind == "agent_text":
                turn.agent_text += response.agent_text.text
            elif turn is not None and kind == "reply_audio":
                if turn.first_audio_at is None:
                    turn.first_audio_at = time.monotonic()
                    turn.first_audio.set()
                turn.audio += response.reply_audio.audio
            elif turn is not None and kind == "turn_completed":
                turn.completed = response.turn_completed
                turn.done.set()
            elif turn is not None and kind == "turn_interrupted":
                turn.heard_text = response.turn_interrupted.heard_text
                turn.done.set()
            elif kind == "error":
                self.errors.append(response.error)
                if turn is not None:
                    turn.errors.append(response.error)
                    turn.done.set()
                else:
                    self._events.put_nowait(response.error)
        for turn in self.turns:
            turn.done.set()


# --- command line ----------------------------------------------------------------------------


def _ms(duration: Any, decimals: int = 1) -> str:
    return f"{duration.ToNanoseconds() / 1e6:8.{decimals}f}"


def latency_table(turns: Sequence[TurnRecord]) -> str:
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
        out.writeframes(audio_code.pcm16_to_bytes(samples))


def read_wav(path: Path) -> tuple[npt.NDArray[np.int16], int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16-bit mono PCM")
        return audio_code.bytes_to_pcm16(wav.readframes(wav.getnframes())), wav.getframerate()


class _Step(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        steps = getattr(namespace, "steps", None) or []
        steps.append((self.dest, values))
        namespace.steps = steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="orchestrator gRPC target")
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
    parser.add_argument("--sample-rate", type=int, default=16000, help="input and output sample rate, Hz")
    parser.add_argument("--out-dir", type=Path, default=Path("out"), help="where reply WAVs are written")
    parser.add_argument(
        "--fast", action="store_true", help="send audio as fast as possible, not in real time"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="deadline of the whole conversation, seconds"
    )
    parser.set_defaults(steps=[])
    return parser.parse_args(argv)


async def converse(args: argparse.Namespace) -> int:
    fmt = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, args.sample_rate)
    async with grpc.aio.insecure_channel(args.target) as channel:
        client = VoiceClient(
            channel, input_format=fmt, output_format=fmt, realtime=not args.fast, timeout_s=args.timeout
        )
        async with client:
            previous: TurnRecord | None = None
            for kind, value in args.steps:
                if previous is not None and kind != "barge_in":
                    await previous.done.wait()
                if kind == "say":
                    previous = await client.speak(value)
                elif kind == "barge_in":
                    if previous is not None:
                        await previous.first_audio.wait()
                        await asyncio.sleep(BARGE_IN_AFTER_S)  # let the caller hear part of the reply
                    previous = await client.speak(value)
                elif kind == "type":
                    previous = await client.type(value)
                elif kind == "wav":
                    samples, rate = read_wav(Path(value))
                    if rate != fmt.sample_rate:
                        raise SystemExit(f"{value}: {rate} Hz, but --sample-rate is {fmt.sample_rate}")
                    await client.speak_samples(samples, len(samples))
            code = await client.finish()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for turn in client.turns:
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
        print("\n" + latency_table(client.turns))
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
