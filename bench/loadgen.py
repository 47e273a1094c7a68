"""The load generator: one process running many simulated callers against one target.

    python -m bench.loadgen '<LoadConfig as JSON>'

It runs in its own process so that its CPU time is never counted as the orchestrator's. The
coordinator (bench.runner) talks to it in JSON lines: this process prints {"event": "ready"}
once it can start; the coordinator answers "go <t>" where t is a time.monotonic() value
(CLOCK_MONOTONIC is one clock for the whole machine) at which the measured window starts; the
process may print {"event": "checkpoint"} and wait for a "continue" line; last it prints
{"event": "result", ...} and exits.

Modes: `voice` (real-time callers on VoiceAgentService.Converse), `relay` (the same callers
against the transport-floor relay), `http` (callers of the request/response baseline), `idle`
(sessions opened with a config and nothing else) and `churn` (many short sessions in batches).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from bench import http_baseline
from bench.workload import (
    ADDED_PARTS,
    BYTES_PER_SECOND,
    FORMAT,
    REACTION_S,
    SILENCE_FRAME,
    Phrase,
    TurnOutcome,
    check_turn,
    script,
    short_phrases,
)
from stubs import audio_code
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.tls import ChannelTls
from voicepipe_client import (
    Conversation,
    Microphone,
    Pause,
    SessionSettings,
    Speech,
    Turn,
    TurnAssembler,
    connect,
)
from voicepipe_client.audio import FRAME_S

# Every loop below ends by these bounds, whatever the target does.
CLOSE_TIMEOUT_S = 30.0
OPEN_TIMEOUT_S = 20.0
LAG_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass(frozen=True)
class LoadConfig:
    mode: str  # voice | relay | http | idle | churn
    target: str  # host:port
    sessions: int  # callers in this process (idle: sessions held open; churn: per batch)
    first_index: int = 0  # global index of the first caller (phrase rotation, phases)
    workload: str = "mixed"
    window_s: float = 10.0  # callers speak in [go, go + window_s], then end their input
    # (sessions open one after another between the "go" line and go itself)
    phase_spread_s: float = 2.0  # each caller first speaks at a random moment this soon after go
    turn_timeout_s: float = 20.0
    check_audio: bool = True  # decode every reply's audio (after the window) and compare
    seed: int = 1
    churn_total: int = 0  # churn: sessions in all
    checkpoints: tuple[int, ...] = ()  # churn: pause after this many sessions for a reading


class SendLag:
    """How late the callers' frames left compared with real time: the load generator's own
    health (a saturated generator would under-load the target and distort its figures)."""

    def __init__(self) -> None:
        self.frames = 0
        self.max_s = 0.0
        self.buckets = [0] * (len(LAG_BUCKETS_MS) + 1)

    def record(self, lag_s: float) -> None:
        self.frames += 1
        if lag_s > self.max_s:
            self.max_s = lag_s
        ms = lag_s * 1000
        for i, bound in enumerate(LAG_BUCKETS_MS):
            if ms <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def summary(self) -> dict[str, Any]:
        return {"frames": self.frames, "max_ms": self.max_s * 1000, "buckets": self.buckets}


class Script:
    """When a caller may start its next phrase, and which: never a turn that could not finish
    inside the window, so that every caller stays connected for the whole window."""

    def __init__(self, phrases: list[Phrase], first_at: float, end_at: float) -> None:
        self.phrases = phrases
        self.index = 0
        self.next_at = first_at
        self.end_at = end_at

    def next_phrase(self, now: float) -> Phrase | None:
        if now < self.next_at:
            return None
        phrase = self.phrases[self.index % len(self.phrases)]
        if now + phrase.cycle_s > self.end_at:
            self.next_at = float("inf")
            return None
        self.index += 1
        return phrase


def _seconds(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e9


# TLS as the VOICEPIPE_CLIENT_TLS_* variables say (bench.variants sets them for its TLS stack).
CLIENT_TLS = ChannelTls.from_environment("client")


def _channel(target: str) -> grpc.aio.Channel:
    # Each caller is its own client with its own connection, as phones and browsers are.
    return connect(target, own_connection=True, tls=CLIENT_TLS)


SESSION = SessionSettings(FORMAT, FORMAT)


class StreamingCaller:
    """One caller on a Converse stream: a real-time microphone that sends a 20 ms frame every
    20 ms (silence between phrases) and asks this caller's script what to say whenever it is
    silent; the client library's reader times and records every event."""

    def __init__(self, config: LoadConfig, index: int, go: float, lag: SendLag, rng: random.Random) -> None:
        self.config = config
        self.relay = config.mode == "relay"
        self.lag = lag
        self.end_at = go + config.window_s
        self.script = Script(
            script(config.workload, index), go + rng.uniform(0, config.phase_spread_s), self.end_at
        )
        self.status = "not started"
        self._call_problems: list[str] = []
        self.assembler = TurnAssembler(
            FORMAT, keep_audio=config.check_audio, transcripts_start_turns=self.relay
        )
        self._spoken: list[tuple[Phrase, Turn]] = []
        self._speaking: tuple[Phrase, Turn] | None = None
        self._outstanding: tuple[Phrase, Turn] | None = None
        self._timed_out: set[Turn] = set()

    async def run(self, channel: grpc.aio.Channel | None) -> None:
        assert channel is not None
        deadline = self.end_at - time.monotonic() + self.config.turn_timeout_s + CLOSE_TIMEOUT_S
        microphone = Microphone(realtime=True, cue=self.cue, lag=self.lag)
        conversation = Conversation(
            channel, SESSION, microphone=microphone, timeout_s=deadline, assembler=self.assembler
        )
        try:
            await conversation.open()
            await conversation.end_input()  # once the script has nothing more to say
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                code = await conversation.ended()
            self.status = code.name
            if code != grpc.StatusCode.OK:
                self._call_problems.append(f"call failed: {code.name}: {conversation.details}")
        except grpc.aio.AioRpcError as error:
            self.status = error.code().name
            self._call_problems.append(f"call failed: {error.code().name}: {error.details()}")
        except TimeoutError as error:
            self.status = "CLIENT_TIMEOUT"
            self._call_problems.append(f"call did not end: {error!r}")
        finally:
            await conversation.close()

    def cue(self, now: float) -> Speech | Pause:
        """Asked by the microphone at each frame while it is silent: the next phrase, if the
        last one's turn is settled and the script says it is time."""
        if self._speaking is not None:  # the microphone has sent all of it
            self._outstanding, self._speaking = self._speaking, None
        self._settle(now)
        if self._outstanding is None:
            phrase = self.script.next_phrase(now)
            if phrase is not None:
                turn = Turn()
                self._speaking = (phrase, turn)
                self._spoken.append(self._speaking)
                return Speech(phrase.utterance, turn)
            if now >= self.end_at:
                return Pause.END
        return Pause.SILENCE

    def _heard_from(self, turn: Turn) -> float | None:
        # The relay's answer is the transcript.
        return turn.started_at if self.relay else turn.first_audio_at

    def _settle(self, now: float) -> None:
        """Decides whether the last phrase's turn is over for the caller (answered, failed,
        timed out, or heard long enough to speak over it) and when to speak next."""
        if self._outstanding is None:
            return
        phrase, turn = self._outstanding
        heard_from = self._heard_from(turn)
        if turn.ended:
            done_at = turn.ended_at or now
            # The relay sends no reply: the caller listens as long as it would to ours.
            playback_end = turn.playback_end(BYTES_PER_SECOND) or done_at
            ready = done_at + phrase.reply_s if self.relay else max(done_at, playback_end)
            self.script.next_at = max(self.script.next_at, ready + REACTION_S)
            self._outstanding = None
        elif (
            phrase.barge_in_after_s is not None
            and heard_from is not None
            and now >= heard_from + phrase.barge_in_after_s
        ):
            self.script.next_at = now
            self._outstanding = None
        elif turn.speech_ended_at is not None and now > turn.speech_ended_at + self.config.turn_timeout_s:
            self._timed_out.add(turn)
            self._outstanding = None
            self.assembler.give_up(turn)

    # What the caller saw, read once the call is over (or was cut short).

    @property
    def turns(self) -> list[tuple[Phrase, TurnOutcome]]:
        return [(phrase, self._outcome(phrase, turn)) for phrase, turn in self._spoken]

    @property
    def problems(self) -> list[str]:
        """The call's, and whatever the server sent that fits no phrase."""
        problems = list(self._call_problems)
        mine = {turn for _, turn in self._spoken}
        for turn in self.assembler.turns:
            if turn not in mine:
                problems.append(f"turn started without a phrase: {turn.user_text!r}")
        if self.assembler.stray_events:
            problems.append(f"{self.assembler.stray_events} events of turns that were never started")
        return problems + [_error_text(error) for error in self.assembler.session_errors]

    def _outcome(self, phrase: Phrase, turn: Turn) -> TurnOutcome:
        outcome = TurnOutcome(
            phrase.kind,
            outcome=turn.outcome if turn.ended else "timeout" if turn in self._timed_out else "open",
            user_text=turn.user_text,
            agent_text=turn.agent_text,
            heard_text=turn.heard_text or "",
            speech_end_at=turn.speech_ended_at,
            first_audio_at=self._heard_from(turn),
            audio=turn.audio,
            audio_bytes=turn.audio_bytes,
            chunks=turn.chunks,
            late_chunks=turn.late_chunks,
            max_late_s=turn.max_late_s,
        )
        if turn in self._timed_out:
            outcome.problems.append(f"no answer within {self.config.turn_timeout_s:g} s")
        outcome.problems += [_error_text(error) for error in turn.errors]
        if turn.completed is not None:
            latency = turn.completed.latency
            if self.relay:  # the relay reports only the STT's finalisation time
                outcome.stage_s = {"stt": _seconds(latency.stt_finalization)}
            else:
                outcome.final_agent_text = turn.completed.agent_text
                outcome.stage_s = {
                    "stt": _seconds(latency.stt_finalization),
                    "llm_first_token": _seconds(latency.llm_time_to_first_token),
                    "llm_first_sentence": _seconds(latency.llm_time_to_first_sentence),
                    "tts": _seconds(latency.tts_time_to_first_audio),
                    "server_ttfa": _seconds(latency.time_to_first_audio),
                    "orchestrator_added": _seconds(latency.orchestrator_added),
                    **{part: _seconds(getattr(latency, part)) for part in ADDED_PARTS},
                }
        return outcome


def _error_text(error: pb.SessionError) -> str:
    return f"{pb.Stage.Name(error.stage)} {error.code}: {error.message}"


class HttpCaller:
    """A caller of the request/response design: its own voice-activity detector waits for the
    same end-of-utterance silence, then the whole utterance is POSTed and the whole reply
    (text and audio) comes back in the response."""

    def __init__(self, config: LoadConfig, index: int, go: float, lag: SendLag, rng: random.Random) -> None:
        self.config = config
        self.lag = lag
        self.end_at = go + config.window_s
        self.script = Script(
            script(config.workload, index), go + rng.uniform(0, config.phase_spread_s), self.end_at
        )
        self.turns: list[tuple[Phrase, TurnOutcome]] = []
        self.problems: list[str] = []
        self.status = "OK"
        self.session_id = f"http-{index}"

    async def run(self, _channel: object) -> None:
        host, port = self.config.target.rsplit(":", 1)
        pool = http_baseline.ConnectionPool(host, int(port), size=1)
        history: list[dict[str, str]] = []
        try:
            while True:
                now = time.monotonic()
                if now >= self.end_at:
                    return
                if self.script.next_at == float("inf"):
                    # Stay, like the streaming callers, until the window ends.
                    await asyncio.sleep(self.end_at - now)
                    continue
                if now < self.script.next_at:
                    await asyncio.sleep(min(self.script.next_at, self.end_at) - now)
                    continue
                phrase = self.script.next_phrase(now)
                if phrase is None:
                    continue
                turn = TurnOutcome(phrase.kind)
                self.turns.append((phrase, turn))
                try:
                    await self._turn(pool, phrase, turn, history)
                except (OSError, TimeoutError, http_baseline.HttpError) as error:
                    turn.outcome = "failed"
                    turn.problems.append(f"request failed: {error!r}")
                    self.script.next_at = time.monotonic() + REACTION_S
        finally:
            await pool.close()

    async def _turn(
        self,
        pool: http_baseline.ConnectionPool,
        phrase: Phrase,
        turn: TurnOutcome,
        history: list[dict[str, str]],
    ) -> None:
        decoder = audio_code.SpeechDecoder(FORMAT.sample_rate)
        start = time.monotonic()
        captured: list[bytes] = []
        frames = [*phrase.utterance.frames, *([SILENCE_FRAME] * 25)]
        for k, frame in enumerate(frames):
            due = start + k * FRAME_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lag.record(max(0.0, time.monotonic() - due))
            captured.append(frame)
            events = decoder.feed(FORMAT.decode(frame))
            if k == phrase.utterance.speech_end_frame:
                turn.speech_end_at = time.monotonic()
            if any(isinstance(e, audio_code.UtteranceEnded) for e in events):
                break
        upload_at = time.monotonic()
        body = await pool.post(
            "/v1/turn",
            {
                "session_id": self.session_id,
                "sample_rate_hertz": FORMAT.sample_rate,
                "audio": http_baseline.b64(b"".join(captured)),
                "history": history[-8:],
            },
            timeout_s=self.config.turn_timeout_s,
        )
        turn.first_audio_at = time.monotonic()
        audio = http_baseline.unb64(body["audio"])
        turn.audio_bytes = len(audio)
        if self.config.check_audio:
            turn.audio += audio
        turn.user_text = body["transcript"]
        turn.agent_text = turn.final_agent_text = body["reply"]
        stages = body["stage_ms"]
        vad_wait = upload_at - (turn.speech_end_at or upload_at)
        turn.stage_s = {
            # Endpointing happens on the caller here; it is the STT's 120 ms in our design.
            "stt": vad_wait + stages["stt"] / 1000,
            "llm_first_sentence": stages["llm"] / 1000,
            "llm_first_token": stages["llm_first_token"] / 1000,
            "tts": stages["tts"] / 1000,
            "server_ttfa": body["handling_ms"] / 1000,
            "orchestrator_added": (body["handling_ms"] - sum(stages[k] for k in ("stt", "llm", "tts")))
            / 1000,
        }
        turn.outcome = "completed"
        history += [
            {"role": "user", "content": turn.user_text},
            {"role": "assistant", "content": turn.agent_text},
        ]
        listen = phrase.barge_in_after_s if phrase.barge_in_after_s is not None else phrase.reply_s
        self.script.next_at = turn.first_audio_at + listen + REACTION_S


# --- timed runs ------------------------------------------------------------------------------


def _turn_record(phrase: Phrase, turn: TurnOutcome, config: LoadConfig) -> dict[str, Any]:
    streaming = config.mode != "http"
    if turn.outcome in ("completed", "interrupted"):
        check_turn(
            phrase,
            turn,
            replies_expected=config.mode != "relay",
            check_audio=config.check_audio and config.mode != "relay",
        )
    record: dict[str, Any] = {
        "kind": turn.kind,
        "outcome": turn.outcome,
        "ttfa_ms": None if turn.ttfa_s is None else turn.ttfa_s * 1000,
        "late_chunks": turn.late_chunks,
        "max_late_ms": turn.max_late_s * 1000,
        "chunks": turn.chunks,
        "problems": turn.problems,
    }
    for name, value in turn.stage_s.items():
        record[f"{name}_ms"] = value * 1000
    if turn.ttfa_s is not None and turn.stage_s:
        stage_sum = turn.stage_s["stt"]
        if config.mode != "relay":
            stage_sum += turn.stage_s["llm_first_sentence"] + turn.stage_s["tts"]
        # What the caller saw beyond the stages' own time: every hop and queue on the way.
        record["client_added_ms"] = (turn.ttfa_s - stage_sum) * 1000
    record["streaming"] = streaming
    return record


async def run_timed(config: LoadConfig, go: float) -> dict[str, Any]:
    lag = SendLag()
    rng = random.Random(config.seed * 1_000_003 + config.first_index)
    caller_type = HttpCaller if config.mode == "http" else StreamingCaller
    callers = [caller_type(config, config.first_index + i, go, lag, rng) for i in range(config.sessions)]
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    spacing = max(0.0, go - 0.2 - time.monotonic()) / max(1, config.sessions)
    try:
        for i, caller in enumerate(callers):
            channel = _channel(config.target) if config.mode != "http" else None
            if channel is not None:
                channels.append(channel)
            tasks.append(asyncio.create_task(caller.run(channel), name=f"caller-{config.first_index + i}"))
            await asyncio.sleep(spacing)
        limit = go + config.window_s + config.turn_timeout_s + 2 * CLOSE_TIMEOUT_S - time.monotonic()
        await asyncio.wait(tasks, timeout=max(1.0, limit))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    statuses: collections.Counter[str] = collections.Counter(c.status for c in callers)
    return {
        "turns": [_turn_record(p, t, config) for c in callers for p, t in c.turns],
        "problems": [p for c in callers for p in c.problems],
        "statuses": dict(statuses),
        "send_lag": lag.summary(),
    }


# --- memory runs -----------------------------------------------------------------------------


class _Control:
    """The coordinator's side of the protocol: JSON lines out, command lines in."""

    def __init__(self) -> None:
        self._stdin = sys.stdin

    @staticmethod
    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    async def read_line(self) -> str:
        line: str = await asyncio.to_thread(self._stdin.readline)
        return line.strip()

    async def checkpoint(self, **fields: Any) -> None:
        self.emit({"event": "checkpoint", **fields})
        await self.read_line()


async def _idle_session(channel: grpc.aio.Channel, opened: asyncio.Event, release: asyncio.Event) -> str:
    conversation = Conversation(
        channel, SESSION, microphone=Microphone(realtime=False), timeout_s=OPEN_TIMEOUT_S + 600
    )
    try:
        await conversation.open()
        await conversation.assembler.session_started.wait()
        if not conversation.assembler.session_id:
            return "NO_SESSION_STARTED"
        opened.set()
        await release.wait()
        await conversation.end_input()
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            return (await conversation.ended()).name
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    finally:
        await conversation.close()


async def run_idle(config: LoadConfig, control: _Control) -> dict[str, Any]:
    """Opens `sessions` sessions that send nothing after their config, reports when all are
    open, and closes them when told to."""
    release = asyncio.Event()
    channel = _channel(config.target)
    opened = [asyncio.Event() for _ in range(config.sessions)]
    tasks = [
        asyncio.create_task(_idle_session(channel, opened[i], release), name=f"idle-{i}")
        for i in range(config.sessions)
    ]
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S + config.sessions * 0.05):
            await asyncio.gather(*(event.wait() for event in opened))
        await control.checkpoint(sessions=config.sessions)
        release.set()
        async with asyncio.timeout(CLOSE_TIMEOUT_S * 2):
            statuses = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
    return {"statuses": dict(collections.Counter(statuses))}


async def _short_session(channel: grpc.aio.Channel, phrase: Phrase) -> tuple[str, list[str]]:
    """Speaks one phrase as fast as the server takes it, ends its input, reads the reply."""
    microphone = Microphone(realtime=False)
    conversation = Conversation(channel, SESSION, microphone=microphone, timeout_s=CLOSE_TIMEOUT_S)
    turn = conversation.say(phrase.utterance)
    try:
        await conversation.open()
        code = (await conversation.finish()).name
    except grpc.aio.AioRpcError as error:
        code = str(error.code().name)
    finally:
        await conversation.close()
    problems = [f"{error.code}: {error.message}" for error in conversation.errors]
    if turn.user_text != phrase.expected_user:
        problems.append(f"transcript {turn.user_text!r} != spoken {phrase.expected_user!r}")
    completed = turn.completed
    if completed is None or completed.agent_text != phrase.expected_reply:
        problems.append(f"reply {completed.agent_text if completed else None!r} != {phrase.expected_reply!r}")
    return code, problems


async def run_churn(config: LoadConfig, control: _Control) -> dict[str, Any]:
    """`churn_total` sessions in sequential batches of `sessions` concurrent ones; each speaks
    one short phrase, gets its answer and ends. Pauses at each checkpoint for a reading."""
    phrases = short_phrases()
    statuses: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    done = 0
    checkpoints = sorted(config.checkpoints)
    while done < config.churn_total:
        batch = min(config.sessions, config.churn_total - done)
        if checkpoints:
            batch = min(batch, checkpoints[0] - done)
        # New connections for every batch, so that connection set-up and tear-down churn too.
        channels = [_channel(config.target) for _ in range(max(1, batch // 25))]
        tasks = [
            asyncio.create_task(
                _short_session(channels[i % len(channels)], phrases[(done + i) % len(phrases)]),
                name=f"churn-{done + i}",
            )
            for i in range(batch)
        ]
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S * 2):
                for code, session_problems in await asyncio.gather(*tasks):
                    statuses[code] += 1
                    problems.extend(session_problems[:2])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        done += batch
        if checkpoints and done >= checkpoints[0]:
            checkpoints.pop(0)
            await control.checkpoint(sessions=done)
    return {"statuses": dict(statuses), "problems": problems[:50], "sessions": done}


async def main_async(config: LoadConfig) -> None:
    control = _Control()
    if config.mode in ("voice", "relay", "http"):
        script(config.workload, 0)  # renders the phrases before the window (and checks the name)
    control.emit({"event": "ready"})
    command = await control.read_line()
    if not command.startswith("go"):
        raise SystemExit(f"expected 'go <time>', got {command!r}")
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    if config.mode in ("voice", "relay", "http"):
        go = float(command.split()[1])
        result = await run_timed(config, go)
    elif config.mode == "idle":
        result = await run_idle(config, control)
    elif config.mode == "churn":
        result = await run_churn(config, control)
    else:
        raise SystemExit(f"unknown mode {config.mode!r}")
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    control.emit({"event": "result", "config": asdict(config), **result})


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raw = json.loads(sys.argv[1])
    raw["checkpoints"] = tuple(raw.get("checkpoints", ()))
    asyncio.run(main_async(LoadConfig(**raw)))


if __name__ == "__main__":
    main()
