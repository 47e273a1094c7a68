"""Resumption with a real ear: the orchestrator's link to the Whisper stage is reset again and
again while a caller speaks recorded sentences in real time; the orchestrator replays the audio no
final covered, and every transcript is the one the recording gets without resets."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from bench import recordings
from bench.recordings import normalise
from tests.chaos.whisper_stack import whisper_behind_resets
from tests.helpers import open_channel, read_metric
from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe.pcm import Samples
from voicepipe_client import Conversation, Microphone, SessionSettings, Utterance

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(not recordings.available(), reason="needs Debian's pocketsphinx-testdata"),
]

FMT = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)
FRAME = 320  # 20 ms


def speech_end(audio: Samples) -> int:
    """The end of the last 20 ms frame of a recording louder than a twentieth of its loudest:
    where its speaker stopped (recordings trail off in a few hundred ms of room noise, in which
    the final transcript may already arrive)."""
    level = np.abs(audio[: len(audio) // FRAME * FRAME].astype(np.int32)).reshape(-1, FRAME).mean(axis=1)
    return (int(np.nonzero(level > level.max() / 20)[0][-1]) + 1) * FRAME


async def test_stt_link_resets_leave_real_transcripts_unchanged() -> None:
    sentences = [recordings.goforward(), *recordings.librivox()[::4]]  # goforward, 0870, 0930
    async with whisper_behind_resets(seed=11) as stack:
        proxy, orchestrator = stack.proxy, stack.orchestrator
        async with open_channel(orchestrator.target) as channel:
            microphone = Microphone(realtime=True)
            conversation = Conversation(
                channel, SessionSettings(FMT, FMT), microphone=microphone, timeout_s=120
            )
            async with conversation:
                turns = []
                for sentence in sentences:
                    # The sentence, then 1.5 s of silence (which ends its utterance).
                    audio = np.concatenate([sentence.audio, np.zeros(24_000, np.int16)])
                    turns.append(
                        await conversation.speak(
                            Utterance.from_samples(audio, FMT, speech_end(sentence.audio))
                        )
                    )
                # Each sentence starts its turn (its final transcript arrived) while resets go on.
                for turn in turns:
                    try:
                        await asyncio.wait_for(turn.started.wait(), 30)
                    except TimeoutError:
                        heard = conversation.transcripts
                        raise AssertionError(f"a turn never started; heard {heard}") from None
                await proxy.stop_resets()
                assert await conversation.finish() == grpc.StatusCode.OK
                transcripts = list(conversation.transcripts)
        resets = proxy.stats.connections_reset
        resumed = await read_metric(
            orchestrator.metrics_port, "voicepipe_stage_resumptions_total", stage="stt"
        )
    heard = [normalise(text) for text in transcripts if text]
    assert heard == [s.reference for s in sentences]
    assert resets > 0 and resumed > 0, (resets, resumed)
    print(
        f"\nwhisper under resets: {len(heard)} transcripts exact; {resets} resets, {resumed:.0f} resumptions"
    )
