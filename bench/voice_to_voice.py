"""Voice-to-voice latency with all three real engines local (Whisper tiny.en, the bundled
SmolLM2 behind the OpenAI-compatible stage, espeak-ng): from the end of the user's speech to the
first reply audio the client receives, split into STT finalisation, LLM time to the first TTS
segment, TTS first audio and the orchestrator's part, with the stack's CPU per session.

    python -m bench.voice_to_voice [--turns 20] [--turns-per-conversation 5]
        [--silence-ms 0,400] [--first-segment clause,sentence] [--speculative off,on]
        [--turn-model on|off]
    python -m bench.voice_to_voice --sessions 1,2,3,4 [--turns 20]
    python -m bench.voice_to_voice --versus-backend http://127.0.0.1:8081/v1 [--turns 20]

A variant is one endpointing silence (the orchestrator's --end-of-utterance-silence-ms; 0 leaves
it to the Whisper stage, which judges each pause by its words and, with --turn-model on, by its
turn model: see stt_whisper.call), one first-segment policy
(its --first-segment) and speculative generation off or on (its --speculative-generation); every
combination given is measured side by side:
one orchestrator per variant, all on the same three stages. The phrases are spoken in rounds of
one conversation per variant, with the same phrases, the variants taking turns (the order
rotating from round to round), so that they meet the same machine, the same warm models and the
same stretches of load from others. (Conversations, not single turns, alternate: the local LLM
server caches one prompt, which turn-by-turn alternation would invalidate every turn.) The
stack's first turn warms up and is not measured. The caller speaks through espeak-ng in another
voice than the agent's, in real time. CPU is reported per answered turn, split by process (each
variant's orchestrator, each stage, the LLM backend), with each variant's speculative turns by
outcome (the cancelled ones are wasted work).

It also measures what preemptive generation on an interim transcript could gain at most: for
each final transcript, how long before it the last interim arrived and whether that interim
(or a stable one: two interims in a row with the same words, as LocalAgreement-2 commits them)
already said what the final says.

With --versus-backend, each variant is also measured against another LLM backend (an OpenAI API
root started beforehand, e.g. an older checkout's `python -m llm_openai.backend`): a second LLM
stage in front of it, and orchestrators wired to it, alternating with the stack's own backend.

With --sessions, it measures capacity instead: for each N, N conversations at once (each its
--turns phrases, their starts spread over one phrase's length so that they do not speak in step)
against one stack with the first variant's settings; the figure is the largest N whose
voice-to-voice p95 stays within 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import statistics
import time
from dataclasses import dataclass, field

from bench import procstat
from bench.recordings import normalise
from bench.runner import read_metrics
from orchestrator.sentences import SentenceChunker
from orchestrator.turn import REPLY_MAX_TOKENS
from stt_whisper import turn_model
from tts_espeak.speaker import EspeakSpeaker
from voice.v1 import common_pb2
from voice.v1 import voice_agent_pb2 as pb
from voicepipe.audio_format import PcmFormat
from voicepipe.durations import to_seconds
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, stage_args
from voicepipe_client import FRAME_MS, Conversation, Microphone, SessionSettings, Utterance, connect
from voicepipe_client.turns import Turn, TurnAssembler
from voicepipe_tools.stack import READY_TIMEOUT_S, LocalStack, start_stack

REAL = {"stt": "whisper", "llm": "openai", "tts": "espeak"}
FMT = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
CALLER_VOICE = "en-gb-x-rp"
# Short questions a voice agent gets; a pause after each lets the reply start before the next.
PHRASES = (
    "Hello, my name is Sam.",
    "What is the capital of France?",
    "How are you today?",
    "Can you tell me a joke?",
    "What time is it in London?",
    "What is two plus two?",
    "Tell me about the weather.",
    "Thank you very much.",
    "What is your name?",
    "Where do penguins live?",
)
TURN_TIMEOUT_S = 60.0
# The conversations outlive the servers' default connection age (300 s), which would end them
# (the orchestrator's) or make the STT link resume mid-run (the stages'): turned off here.
NO_CONNECTION_AGE = ["--max-connection-age", "0"]
SESSION_TIMEOUT_S = 1800.0  # 20 turns of long replies, played at speaking pace


def stage_flags(with_turn_model: bool) -> dict[str, list[str]]:
    """The stages' flags: Whisper with its turn model or without (a variant with silence 0 leaves
    the silence to the stage; one with a silence set uses neither the turn model nor the words)."""
    turn = [f"--turn-model={turn_model.DEFAULT_PATH}" if with_turn_model else "--turn-model="]
    return {role: [*NO_CONNECTION_AGE, *(turn if role == "stt" else [])] for role in REAL}


# The stack's first turn, not measured: the first decode and generation of a fresh stack pay for
# loading caches.
WARM_UP = "Good morning."
PARTS = ("stt_finalization", "llm_first_segment", "tts_first_audio", "orchestrator")


@dataclass
class Interims:
    """Per final transcript: what the interims before it already said, and when."""

    finals: int = 0
    last_interim_lead_s: list[float] = field(default_factory=list)  # last interim -> final
    last_interim_matched: int = 0  # ... that said the final's words
    stable_match_lead_s: list[float] = field(default_factory=list)  # first stable match -> final


class InterimListener:
    """Follows the user transcripts of one conversation (an EventListener of its assembler)."""

    def __init__(self, variant: Variant) -> None:
        self._variant = variant
        self._seen: list[tuple[float, str]] = []  # this utterance's interims: arrival, words

    def on_event(self, response: pb.ConverseResponse) -> None:
        if response.WhichOneof("event") != "user_transcript":
            return
        now, words = time.monotonic(), normalise(response.user_transcript.text)
        if not response.user_transcript.is_final:
            self._seen.append((now, words))
            return
        seen, self._seen = self._seen, []
        interims = self._variant.interims
        interims.finals += 1
        if not seen:
            return
        interims.last_interim_lead_s.append(now - seen[-1][0])
        interims.last_interim_matched += seen[-1][1] == words
        for (_, before), (at, text) in itertools.pairwise(seen):
            if before == text == words:
                interims.stable_match_lead_s.append(now - at)
                break

    def on_end(self) -> None:
        pass


def first_segment(reply: str, policy: str) -> str:
    """The first segment the orchestrator cut from `reply` (streamed a word at a time)."""
    chunker = SentenceChunker("clause" if policy == "clause" else "sentence")
    for word in re.split(r"(?<=\s)", reply):
        if segments := chunker.push(word):
            return segments[0]
    return reply


SPECULATIVE_OUTCOMES = ("confirmed", "withdrawn", "replaced", "dropped")


LOCAL = "local"


@dataclass
class Variant:
    silence_ms: int
    first_segment: str
    speculative: bool = False
    backend: str = LOCAL  # the stack's own LLM backend, or another's API root (--versus-backend)
    stage_endpointing: str = "turn model"  # what silence 0 leaves to the stage
    reply_max_tokens: int = REPLY_MAX_TOKENS
    speculation: dict[str, float] = field(default_factory=dict)  # speculative turns by outcome
    v2v: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    interims: Interims = field(default_factory=Interims)
    failed: int = 0
    clause_first: int = 0  # replies whose first segment was a clause under this policy

    @property
    def label(self) -> str:
        silence = f"{self.silence_ms} ms" if self.silence_ms else self.stage_endpointing
        where = "" if self.backend == LOCAL else f" ({self.backend})"
        return f"{silence} | {self.first_segment} | {'speculative' if self.speculative else '-'}{where}"

    @property
    def name(self) -> str:
        return self.label.replace(" | ", ", ")

    @property
    def flags(self) -> list[str]:
        return [
            "--end-of-utterance-silence-ms",
            str(self.silence_ms),
            "--first-segment",
            self.first_segment,
            f"--speculative-generation={str(self.speculative).lower()}",
            f"--reply-max-tokens={self.reply_max_tokens}",
            *NO_CONNECTION_AGE,
        ]

    def read_speculation(self, orchestrator: ServiceProcess) -> None:
        names = tuple(f'voicepipe_speculative_total{{outcome="{o}"}}' for o in SPECULATIVE_OUTCOMES)
        found = read_metrics(orchestrator.metrics_port, names)
        self.speculation = {
            o: found.get(name, 0.0) for o, name in zip(SPECULATIVE_OUTCOMES, names, strict=True)
        }

    def record(self, turn: Turn) -> None:
        if turn.completed is None or turn.ttfa_s is None:
            self.failed += 1
            return
        lat = turn.completed.latency
        self.clause_first += first_segment(turn.completed.agent_text, self.first_segment) != first_segment(
            turn.completed.agent_text, "sentence"
        )
        self.v2v.append(turn.ttfa_s)
        self.parts["stt_finalization"].append(to_seconds(lat.stt_finalization))
        self.parts["llm_first_segment"].append(to_seconds(lat.llm_time_to_first_sentence))
        self.parts["tts_first_audio"].append(to_seconds(lat.tts_time_to_first_audio))
        self.parts["orchestrator"].append(to_seconds(lat.orchestrator_added))


async def start_orchestrators(
    stack: LocalStack, variants: list[Variant], llm_stages: dict[str, str]
) -> list[ServiceProcess]:
    """One orchestrator per variant after the stack's own (the first variant's), on the same
    stages but for the LLM stage of the variant's backend (`llm_stages`: backend -> target)."""
    assert stack.orchestrator is not None
    started = [stack.orchestrator]
    try:
        for variant in variants[1:]:
            targets = [
                f"--{role}={llm_stages[variant.backend] if role == 'llm' else process.target}"
                for role, process in stack.stages.items()
            ]
            process = await asyncio.to_thread(
                ServiceProcess, "orchestrator", stage_args(0, 0, *targets, *variant.flags)
            )
            started.append(process)
            await wait_until_serving(process.target, 30)
    except BaseException:
        for process in started[1:]:
            process.stop()
        raise
    return started


async def say(conversation: Conversation, phrase: Utterance) -> Turn:
    if conversation.code is not None:
        raise RuntimeError(f"a conversation ended early: {conversation.code.name} {conversation.details}")
    turn = conversation.say(phrase)
    await asyncio.wait_for(turn.done.wait(), TURN_TIMEOUT_S)
    for error in turn.errors:
        print(f"turn failed: {pb.Stage.Name(error.stage)} {error.code} {error.message}", flush=True)
    return turn


async def converse(target: str, variant: Variant, phrases: list[Utterance]) -> None:
    """One conversation with the orchestrator at `target`: the phrases, each spoken once the reply
    to the one before has played."""
    async with connect(target) as channel:
        conversation = Conversation(
            channel,
            SessionSettings(FMT, FMT),
            microphone=Microphone(realtime=True),
            timeout_s=SESSION_TIMEOUT_S,
            assembler=TurnAssembler(FMT, listener=InterimListener(variant)),
        )
        async with conversation:
            for phrase in phrases:
                variant.record(await say(conversation, phrase))
            await conversation.finish()


async def run(
    variants: list[Variant],
    rounds: list[list[Utterance]],
    warm_up: Utterance,
    versus: str,
    stages: dict[str, list[str]],
) -> tuple[dict[str, float], float]:
    """Every round's phrases as one conversation with each variant in turn; returns each
    process's CPU seconds and the wall seconds of the measured conversations."""
    stack = await start_stack(
        "realistic",
        ephemeral=True,
        engines=REAL,
        stage_flags=stages,
        orchestrator_flags=variants[0].flags,
    )
    orchestrators: list[ServiceProcess] = []
    other_llm: ServiceProcess | None = None
    try:
        llm_stages = {LOCAL: stack.stages["llm"].target}
        if versus:
            other_llm = await asyncio.to_thread(
                ServiceProcess,
                "llm_openai",
                stage_args(0, 0, "--base-url", versus, *NO_CONNECTION_AGE),
                ready_timeout_s=READY_TIMEOUT_S,
            )
            llm_stages[versus] = other_llm.target
        orchestrators = await start_orchestrators(stack, variants, llm_stages)
        for orchestrator in orchestrators if versus else orchestrators[:1]:  # each backend warms up
            await converse(orchestrator.target, Variant(0, "warm-up"), [warm_up])
        named = {f"orchestrator ({v.name})": o for v, o in zip(variants, orchestrators, strict=True)}
        named |= {p.module: p for p in stack.processes if p.module != "orchestrator"}  # and the LLM backend
        cpu_before = {name: procstat.sample(p.process.pid).cpu_s for name, p in named.items()}
        started = time.monotonic()
        for index, phrases in enumerate(rounds):
            # The order rotates from round to round, so no variant always goes first.
            for k in range(len(variants)):
                which = (index + k) % len(variants)
                await converse(orchestrators[which].target, variants[which], phrases)
        wall = time.monotonic() - started
        for variant, orchestrator in zip(variants, orchestrators, strict=True):
            variant.read_speculation(orchestrator)
        cpu = {name: procstat.sample(p.process.pid).cpu_s - cpu_before[name] for name, p in named.items()}
        return cpu, wall
    finally:
        for process in orchestrators[1:]:
            process.stop()
        if other_llm is not None:
            other_llm.stop()
        await asyncio.to_thread(stack.stop)


CAPACITY_P95_S = 1.5


async def run_concurrent(
    variant: Variant,
    sessions: list[int],
    phrases: list[Utterance],
    warm_up: Utterance,
    stages: dict[str, list[str]],
) -> list[tuple[int, Variant, float]]:
    """For each N, N conversations at once on one stack; (N, its turns, stack cores) each."""
    stack = await start_stack(
        "realistic",
        ephemeral=True,
        engines=REAL,
        stage_flags=stages,
        orchestrator_flags=variant.flags,
    )
    results = []
    try:
        assert stack.orchestrator is not None
        orchestrator = stack.orchestrator
        await converse(orchestrator.target, Variant(0, "warm-up"), [warm_up])
        pids = [p.process.pid for p in stack.processes]
        spread_s = max(len(p.frames) for p in phrases) * FRAME_MS / 1000
        for n in sessions:
            step = Variant(variant.silence_ms, variant.first_segment, variant.speculative)

            async def one(k: int, step: Variant = step, n: int = n) -> None:
                await asyncio.sleep(k * spread_s / n)
                await converse(
                    orchestrator.target, step, phrases[k % len(phrases) :] + phrases[: k % len(phrases)]
                )

            cpu_before = sum(procstat.sample(pid).cpu_s for pid in pids)
            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                for k in range(n):
                    group.create_task(one(k), name=f"bench-conversation-{n}-{k}")
            cpu_s = sum(procstat.sample(pid).cpu_s for pid in pids) - cpu_before
            cores = cpu_s / (time.monotonic() - started)
            results.append((n, step, cores))
            print(f"{n} sessions: voice-to-voice {ms(step.v2v)} ms, {cores:.2f} cores", flush=True)
    finally:
        await asyncio.to_thread(stack.stop)
    return results


def capacity_report(results: list[tuple[int, Variant, float]]) -> str:
    lines = [
        "| sessions | turns | voice-to-voice p50 / p95 | STT final | LLM 1st segment | TTS 1st audio"
        " | orchestrator | stack CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, v, cores in results:
        failed = f" ({v.failed} failed)" if v.failed else ""
        lines.append(
            f"| {n} | {len(v.v2v)}{failed} | {ms(v.v2v)} ms | "
            + " | ".join(ms(v.parts[p]) for p in PARTS)
            + f" | {cores:.2f} cores |"
        )
    held = [n for n, v, _ in results if v.v2v and not v.failed and percentile(v.v2v, 0.95) <= CAPACITY_P95_S]
    lines += ["", f"Most sessions with voice-to-voice p95 <= {CAPACITY_P95_S:g} s: {max(held, default=0)}."]
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    """p50 / p95 in milliseconds."""
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} / {percentile(values, 0.95) * 1000:.0f}"


def _served_by(variants: list[Variant], process: str) -> Variant | None:
    """The variant whose orchestrator `process` names, if it names one."""
    return next((v for v in variants if process == f"orchestrator ({v.name})"), None)


def report(variants: list[Variant], cpu: dict[str, float], wall: float) -> str:
    lines = [
        "| endpointing | first segment | speculation | turns | voice-to-voice p50 / p95 | STT final"
        " | LLM 1st segment | TTS 1st audio | orchestrator | first segment a clause |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        failed = f" ({v.failed} failed)" if v.failed else ""
        lines.append(
            f"| {v.label} | {len(v.v2v)}{failed} | {ms(v.v2v)} ms | "
            + " | ".join(ms(v.parts[p]) for p in PARTS)
            + f" | {v.clause_first} |"
        )
    # Each orchestrator's CPU is per the turns it served (an upper bound: it idled while the
    # others ran); the shared stages' is per every answered turn.
    answered = sum(len(v.v2v) for v in variants)
    per_turn = {
        name: seconds / (len(served.v2v) if (served := _served_by(variants, name)) else answered)
        for name, seconds in cpu.items()
    }
    orchestrators = [t for name, t in per_turn.items() if _served_by(variants, name)]
    shared = sum(t for name, t in per_turn.items() if not _served_by(variants, name))
    lines += [
        "",
        f"Stack CPU (every process, one session at a time): {sum(cpu.values()) / wall:.2f} cores over"
        f" {wall:.0f} s; per answered turn: {shared + statistics.mean(orchestrators):.2f} CPU-s"
        " (one orchestrator), of which:",
        "",
        "| process | CPU-s per answered turn |",
        "|---|---|",
        *(f"| {name} | {seconds:.3f} |" for name, seconds in per_turn.items()),
        "",
        "| variant | speculative turns: " + " / ".join(SPECULATIVE_OUTCOMES) + " |",
        "|---|---|",
        *(
            f"| {v.name} | "
            + " / ".join(f"{v.speculation.get(o, 0):.0f}" for o in SPECULATIVE_OUTCOMES)
            + " |"
            for v in variants
        ),
        "",
        "| endpointing | first segment | speculation | finals | last interim -> final p50 / p95"
        " | last interim said the final | stable interim said the final | its lead p50 / p95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        i = v.interims
        lines.append(
            f"| {v.label} | {i.finals} | {ms(i.last_interim_lead_s)} ms | {i.last_interim_matched}"
            f" | {len(i.stable_match_lead_s)} | {ms(i.stable_match_lead_s)} ms |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    speaker = EspeakSpeaker(CALLER_VOICE)
    phrases = [Utterance.spoken(speaker, PHRASES[i % len(PHRASES)], FMT) for i in range(args.turns)]
    per = args.turns_per_conversation
    rounds = [phrases[start : start + per] for start in range(0, len(phrases), per)]
    warm_up = Utterance.spoken(speaker, WARM_UP, FMT)
    speaker.close()
    backends = [LOCAL, args.versus_backend] if args.versus_backend else [LOCAL]
    with_turn_model = args.turn_model == "on"
    stages = stage_flags(with_turn_model)
    # Silence 0: the stage judges each pause by its words, and by its turn model when it has one.
    stage = "turn model + words" if with_turn_model else "400 ms + words"
    variants = [
        Variant(int(silence), first, speculative == "on", backend, stage, args.reply_max_tokens)
        for silence in args.silence_ms.split(",")
        for first in args.first_segment.split(",")
        for speculative in args.speculative.split(",")
        for backend in backends
    ]
    if args.sessions:
        sessions = [int(n) for n in args.sessions.split(",")]
        what = f"{variants[0].label.replace(' | ', ' ')}, reply cap {args.reply_max_tokens} tokens"
        print(f"capacity of {what}: {sessions} sessions", flush=True)
        print(capacity_report(await run_concurrent(variants[0], sessions, phrases, warm_up, stages)))
        return
    print("variants: " + "; ".join(v.name for v in variants), flush=True)
    cpu, wall = await run(variants, rounds, warm_up, args.versus_backend, stages)
    print(report(variants, cpu, wall))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.voice_to_voice", description=__doc__)
    parser.add_argument("--turns", type=int, default=20, help="turns per variant")
    parser.add_argument(
        "--turns-per-conversation",
        type=int,
        default=5,
        help="turns of one conversation; the variants take turns conversation by conversation",
    )
    parser.add_argument(
        "--silence-ms", default="400", help="endpointing silences to compare, comma-separated"
    )
    parser.add_argument(
        "--first-segment",
        default="clause,sentence",
        help="first-segment policies to compare (the orchestrator's --first-segment), comma-separated",
    )
    parser.add_argument(
        "--versus-backend",
        default="",
        help="another LLM backend's OpenAI API root, measured side by side with the stack's own",
    )
    parser.add_argument(
        "--speculative",
        default="off",
        help="speculative generation off, on, or both (off,on) to compare",
    )
    parser.add_argument(
        "--reply-max-tokens",
        type=int,
        default=REPLY_MAX_TOKENS,
        help="the orchestrators' --reply-max-tokens (a spoken reply's token cap)",
    )
    parser.add_argument(
        "--turn-model",
        default="on",
        choices=("on", "off"),
        help="the Whisper stage's turn model (a variant with silence 0 leaves the silence to the"
        " stage, which also judges each pause by its words)",
    )
    parser.add_argument(
        "--sessions",
        default="",
        help="capacity instead: N conversations at once for each N given (comma-separated), each"
        " of --turns phrases, with the first variant's settings",
    )
    asyncio.run(main(parser.parse_args()))
