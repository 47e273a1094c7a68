"""A client library for VoiceAgentService.Converse, used by the command-line client
(`python -m voicepipe_tools.client`), the tests and the benchmark's load generator.

    async with connect(target) as channel:
        microphone = Microphone(realtime=True)
        async with Conversation(channel, SessionSettings(), microphone=microphone) as conversation:
            turn = conversation.say(Utterance.from_samples(samples, PCM_16K))
            await turn.done.wait()
            await conversation.finish()
"""

from voicepipe_client.audio import FRAME_MS, Speaker, SpeechSamples, Utterance
from voicepipe_client.channel import channel_options, connect
from voicepipe_client.conversation import (
    END_OF_INPUT,
    PCM_16K,
    Conversation,
    ConversationEnded,
    Resumed,
    SessionSettings,
)
from voicepipe_client.microphone import Cue, FrameLag, Microphone, Pause, Speech
from voicepipe_client.turns import EventListener, Turn, TurnAssembler

__all__ = [
    "END_OF_INPUT",
    "FRAME_MS",
    "PCM_16K",
    "Conversation",
    "ConversationEnded",
    "Cue",
    "EventListener",
    "FrameLag",
    "Microphone",
    "Pause",
    "Resumed",
    "SessionSettings",
    "Speaker",
    "Speech",
    "SpeechSamples",
    "Turn",
    "TurnAssembler",
    "Utterance",
    "channel_options",
    "connect",
]
