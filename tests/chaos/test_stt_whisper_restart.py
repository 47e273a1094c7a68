"""Failover to a Whisper process that remembers nothing: the Whisper stage is killed (SIGKILL)
while a caller speaks five recorded sentences in real time, and started again on the same port.
The orchestrator's replay must not resend audio that a final it already received covered: every
sentence is transcribed once, none twice, none lost."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from bench import recordings
from bench.recordings import normalise
from tests.chaos.test_stt_whisper_resets import FMT, speech_end
from tests.helpers import open_channel
from voicepipe.healthcheck import wait_until_serving
from voicepipe.processes import ServiceProcess, free_port, stage_args
from voicepipe_client import Conversation, Microphone, SessionSettings, Turn, Utterance

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(not recordings.available(), reason="needs Debian's pocketsphinx-testdata"),
]

TURN_TIMEOUT_S = 60.0
# When the stage is killed, one run each: this long after the final transcript of the given
# sentence arrived (as the next sentence starts, in the middle of it, near its end).
KILLS = [(1, 0.8), (2, 1.2), (3, 2.0)]


@pytest.mark.parametrize(("killed_after", "delay_s"), KILLS)
async def test_whisper_killed_and_restarted_duplicates_no_turn(killed_after: int, delay_s: float) -> None:
    # The recordings tiny.en hears exactly (it mishears a word in the others), in five sentences.
    exact = [recordings.goforward(), *recordings.librivox()[::4]]  # goforward, 0870, 0930
    sentences = [*exact, *exact[:2]]
    stt_port = free_port()
    started: list[ServiceProcess] = []
    try:
        started.append(await asyncio.to_thread(ServiceProcess, "stt_whisper", stage_args(stt_port, 0)))
        for module in ("llm_stub", "tts_stub"):
            started.append(await asyncio.to_thread(ServiceProcess, module, stage_args(0, 0)))
        stt, llm, tts = started
        targets = [f"--stt={stt.target}", f"--llm={llm.target}", f"--tts={tts.target}"]
        orchestrator = await asyncio.to_thread(ServiceProcess, "orchestrator", stage_args(0, 0, *targets))
        started.append(orchestrator)
        await wait_until_serving(orchestrator.target, 30)
        async with open_channel(orchestrator.target) as channel:
            conversation = Conversation(
                channel, SessionSettings(FMT, FMT), microphone=Microphone(realtime=True), timeout_s=180
            )
            async with conversation:
                turns: list[Turn] = []
                for sentence in sentences:
                    # The sentence, then 1.5 s of silence (which ends its utterance).
                    audio = np.concatenate([sentence.audio, np.zeros(24_000, np.int16)])
                    turns.append(
                        conversation.say(Utterance.from_samples(audio, FMT, speech_end(sentence.audio)))
                    )
                await asyncio.wait_for(turns[killed_after - 1].started.wait(), TURN_TIMEOUT_S)
                await asyncio.sleep(delay_s)  # where the kill falls in the audio, not a wait for anything
                # The caller speaks on while the stage is dead and while it starts again.
                await asyncio.to_thread(stt.kill)
                started[0] = await asyncio.to_thread(ServiceProcess, "stt_whisper", stage_args(stt_port, 0))
                for turn in turns:
                    await asyncio.wait_for(turn.started.wait(), TURN_TIMEOUT_S)
                assert await conversation.finish() == grpc.StatusCode.OK
                transcripts = [normalise(text) for text in conversation.transcripts if text]
    finally:
        for process in reversed(started):
            await asyncio.to_thread(process.stop)
    assert transcripts == [s.reference for s in sentences]
