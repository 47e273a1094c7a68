"""No phantom turns under STT link resets: a caller answers, then the room is noisy (hiss,
rumble, clicks, breaths) while the orchestrator's link to the Whisper stage is reset again and
again, so stretches of noise are replayed to new calls; the agent answers the answer, once, and
nobody else."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from bench import recordings
from bench.recordings import normalise
from tests.chaos.whisper_stack import whisper_behind_resets
from tests.helpers import open_channel
from tests.noise import room_noises
from voice.v1 import common_pb2
from voicepipe.audio_format import PcmFormat
from voicepipe_client import Conversation, Microphone, SessionSettings, Utterance

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(not recordings.available(), reason="needs Debian's pocketsphinx-testdata"),
]

FMT = PcmFormat(common_pb2.AUDIO_ENCODING_LINEAR16, 16_000)


async def test_room_noise_replayed_after_resets_starts_no_turn() -> None:
    answer = recordings.goforward()
    pause = np.zeros(FMT.sample_rate // 2, np.int16)
    audio = np.concatenate(
        [answer.audio, pause, *(part for noise in room_noises() for part in (noise, pause))]
    )
    async with whisper_behind_resets(seed=23) as stack:
        async with open_channel(stack.orchestrator.target) as channel:
            conversation = Conversation(
                channel, SessionSettings(FMT, FMT), microphone=Microphone(realtime=True), timeout_s=120
            )
            async with conversation:
                await conversation.speak(Utterance.from_samples(audio, FMT))
                await stack.proxy.stop_resets()
                assert await conversation.finish() == grpc.StatusCode.OK
                turns = [turn.user_text for turn in conversation.turns]
        resets = stack.proxy.stats.connections_reset
    assert [normalise(text) for text in turns] == [answer.reference]
    assert resets > 0
