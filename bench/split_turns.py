"""One answer to one sentence, end to end: bench.turn_pauses' SPLIT phrases, a pause after their
unfinished first part, spoken in real time into the whole local stack (Whisper tiny.en, the
bundled SmolLM2, espeak-ng; the same stages as bench.voice_to_voice), and what the caller got.

    python -m bench.split_turns [--pauses-ms 500,700,1000] [--voices en-gb-x-rp]
                                [--silence-ms 0,400]

bench.turn_pauses measures the Whisper stage alone: whether a pause ends the utterance. The caller
hears the pipeline, where a split may still heal: a spoken turn whose user goes on speaking before
they could have heard its reply (before its first audio left, or less than a reaction time after)
is withdrawn, and its words open the next turn (orchestrator.turns). A phrase is answered as one
turn when one turn only answered it with reply audio (the last, which holds both parts; a
withdrawn turn does not count, though the caller may have heard the first few hundred
milliseconds of its reply: counted apart); it is split when a reply to the first part was
answered too (the second part then barges in on it, or follows it).

A variant is the orchestrator's --end-of-utterance-silence-ms: 0 leaves the silence to the stage
(the fixed 400 ms, longer where the pause's words leave the sentence open: the stack's default),
400 sets the fixed silence alone. Every phrase is one conversation per variant, the variants
taking turns, on the same stages; a conversation ends once its last turn's first reply audio has
arrived (the outcome is known then)."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from bench.turn_pauses import ENDINGS, SPLIT, split_audio
from bench.voice_to_voice import (
    FMT,
    REAL,
    SESSION_TIMEOUT_S,
    TURN_TIMEOUT_S,
    Variant,
    stage_flags,
    start_orchestrators,
)
from tts_espeak.speaker import EspeakSpeaker
from voice.v1 import voice_agent_pb2 as pb
from voicepipe_client import Conversation, Microphone, SessionSettings, Utterance, connect
from voicepipe_client.turns import Turn, TurnAssembler
from voicepipe_tools.stack import start_stack


@dataclass(frozen=True)
class Phrase:
    name: str
    pause_ms: int
    utterance: Utterance


@dataclass
class Outcome:
    """What the caller got for one phrase."""

    answered: int  # turns not withdrawn whose reply audio reached the caller
    withdrawn: int  # turns withdrawn: their words opened the next turn
    clipped_ms: list[float]  # how much of each withdrawn reply's audio reached the caller (> 0)
    texts: list[str]  # the words of every turn, in order


@dataclass
class Tally:
    variant: Variant
    by_pause: dict[int, list[tuple[Phrase, Outcome]]] = field(default_factory=dict)

    def add(self, phrase: Phrase, outcome: Outcome) -> None:
        self.by_pause.setdefault(phrase.pause_ms, []).append((phrase, outcome))


def phrases(voices: list[str], pauses_ms: list[int], ending: str) -> list[Phrase]:
    made = []
    for voice in voices:
        speaker = EspeakSpeaker(voice)
        try:
            for first, second in SPLIT:
                for pause_ms in pauses_ms:
                    # The audio ends where the speech does: the microphone sends silence after it.
                    spoken = split_audio(speaker, first, second, ending, pause_ms)
                    utterance = Utterance.from_samples(spoken.audio[: spoken.speech_end], FMT)
                    made.append(Phrase(f"{voice}: {first} … {second}", pause_ms, utterance))
        finally:
            speaker.close()
    return made


class TurnStarts:
    """Wakes a waiter at each TurnStarted (an EventListener of the conversation's assembler)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def on_event(self, response: pb.ConverseResponse) -> None:
        if response.WhichOneof("event") == "turn_started":
            self.started.set()

    def on_end(self) -> None:
        self.started.set()


async def speak(target: str, phrase: Phrase) -> Outcome:
    """The phrase as one conversation; over once its last turn's first reply audio arrived."""
    async with connect(target) as channel:
        starts = TurnStarts()
        conversation = Conversation(
            channel,
            SessionSettings(FMT, FMT),
            microphone=Microphone(realtime=True),
            timeout_s=SESSION_TIMEOUT_S,
            assembler=TurnAssembler(FMT, listener=starts),
        )
        async with conversation:
            await conversation.speak(phrase.utterance)
            sent_at = time.monotonic()
            # The last turn starts after the end of the speech (its endpointing silence follows it).
            last: Turn | None = None
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while last is None:
                    last = next((t for t in conversation.turns if (t.started_at or 0) > sent_at), None)
                    if last is None:
                        if conversation.code is not None:
                            raise RuntimeError(f"the conversation ended: {conversation.code.name}")
                        starts.started.clear()
                        await starts.started.wait()
                await last.first_audio.wait()
            turns = list(conversation.turns)
    return Outcome(
        answered=sum(t.audio_bytes > 0 and not t.withdrawn for t in turns),
        withdrawn=sum(t.withdrawn for t in turns),
        clipped_ms=[1e3 * t.audio_bytes / FMT.bytes_for(1e3) for t in turns if t.withdrawn and t.audio_bytes],
        texts=[t.user_text for t in turns],
    )


async def run(variants: list[Variant], spoken: list[Phrase]) -> list[Tally]:
    stack = await start_stack(
        "realistic",
        ephemeral=True,
        engines=REAL,
        stage_flags=stage_flags(False),
        orchestrator_flags=variants[0].flags,
    )
    tallies = [Tally(v) for v in variants]
    orchestrators = []
    try:
        orchestrators = await start_orchestrators(
            stack, variants, {v.backend: stack.stages["llm"].target for v in variants}
        )
        for index, phrase in enumerate(spoken):
            for k in range(len(variants)):  # the order rotates from phrase to phrase
                which = (index + k) % len(variants)
                outcome = await speak(orchestrators[which].target, phrase)
                tallies[which].add(phrase, outcome)
            print(f"{index + 1}/{len(spoken)} {phrase.name} ({phrase.pause_ms} ms)", flush=True)
    finally:
        for process in orchestrators[1:]:
            process.stop()
        await asyncio.to_thread(stack.stop)
    return tallies


def report(tallies: list[Tally]) -> str:
    lines = [
        "| endpointing | pause | one answer | of which healed by a withdrawn turn"
        " | of which the start of the withdrawn reply was heard (its audio, longest) | split |",
        "|---|---|---|---|---|---|",
    ]
    splits = []
    for tally in tallies:
        for pause_ms, results in sorted(tally.by_pause.items()):
            one = [o for _, o in results if o.answered == 1]
            healed = sum(o.withdrawn > 0 for o in one)
            clipped = [ms for o in one for ms in o.clipped_ms]
            longest = f" ({max(clipped):.0f} ms)" if clipped else ""
            variant = tally.variant
            label = f"{variant.silence_ms} ms" if variant.silence_ms else variant.stage_endpointing
            lines.append(
                f"| {label} | {pause_ms} ms | {len(one)} of {len(results)} | {healed}"
                f" | {len(clipped)}{longest} | {len(results) - len(one)} |"
            )
            splits += [
                f"  {tally.variant.name}, {pause_ms} ms: {p.name}: {o.texts}"
                for p, o in results
                if o.answered != 1
            ]
    return "\n".join([*lines, "", "split:", *splits])


async def main(args: argparse.Namespace) -> None:
    pauses = [int(p) for p in args.pauses_ms.split(",")]
    spoken = phrases(args.voices.split(","), pauses, args.ending)
    variants = [
        Variant(int(silence), "clause", True, stage_endpointing="400 ms + words")
        for silence in args.silence_ms.split(",")
    ]
    print(report(await run(variants, spoken)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.split_turns", description=__doc__)
    parser.add_argument(
        "--pauses-ms", default="500,700,1000", help="the mid-sentence pauses, comma-separated"
    )
    parser.add_argument(
        "--voices", default="en-gb-x-rp", help="the caller's espeak-ng voices, comma-separated"
    )
    parser.add_argument(
        "--ending", default="sentence", choices=tuple(ENDINGS), help="how the first part is spoken"
    )
    parser.add_argument(
        "--silence-ms",
        default="0,400",
        help="the orchestrators' --end-of-utterance-silence-ms (0: the stage's default), comma-separated",
    )
    asyncio.run(main(parser.parse_args()))
