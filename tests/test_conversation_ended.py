"""The client library once the server has ended the conversation's call (its orchestrator killed,
the call refused for bad input, or finished): every way of sending more input answers at once,
typed turns with a clear error, instead of leaving the caller waiting on a turn that never
starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from tests.helpers import open_channel
from tests.stack_fixtures import instant_stack, own_orchestrator, processes
from voicepipe_client import (
    PCM_16K,
    Conversation,
    ConversationEnded,
    Microphone,
    SessionSettings,
    Utterance,
)
from voicepipe_tools.stack import LocalStack

# Answered at once: this bounds a wait that would otherwise be forever.
PROMPTLY_S = 2.0
TURN_TIMEOUT_S = 10.0
SILENCE = Utterance.from_samples(np.zeros(PCM_16K.sample_rate * 2, np.int16), PCM_16K)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[LocalStack]:
    async with instant_stack() as local:
        yield local


# how the server ends the call -> the statuses the conversation may end with
ENDINGS = {
    "orchestrator killed": {grpc.StatusCode.UNAVAILABLE},
    # Or grpc.aio's crossed write (INTERNAL "Internal error from Core", grpc/grpc#36066): the
    # microphone writes the queued speech as the server ends the call.
    "input refused": {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL},
    "input finished": {grpc.StatusCode.OK},
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_input_after_the_server_ended_the_call_is_answered_at_once(
    stack: LocalStack, ending: str
) -> None:
    async with processes() as group:
        # Without resumption keys: a lost call is not continued elsewhere.
        orchestrator = await own_orchestrator(group, stack)
        async with (
            open_channel(orchestrator.target) as channel,
            Conversation(channel, SessionSettings(), microphone=Microphone(realtime=False)) as conversation,
        ):
            turn = await conversation.type("What is 2 plus 3?")
            async with asyncio.timeout(TURN_TIMEOUT_S):
                await turn.done.wait()
            assert turn.agent_text == "2 plus 3 is 5."
            # Speech queued as the call ends: its turn is over with the conversation, whether
            # its end of speech left or not.
            pending = conversation.say(SILENCE)
            if ending == "orchestrator killed":
                await asyncio.to_thread(orchestrator.kill)
            elif ending == "input refused":
                await conversation.send_audio(b"\0\0\0")  # an odd byte count
            else:
                await conversation.end_input()
            async with asyncio.timeout(TURN_TIMEOUT_S):
                code = await conversation.ended()
            assert code in ENDINGS[ending], (code, conversation.details)

            async with asyncio.timeout(PROMPTLY_S):
                await pending.done.wait()
                with pytest.raises(ConversationEnded) as error:
                    await conversation.type("What is 7 divided by 2?")
                with pytest.raises(ConversationEnded):
                    conversation.say(SILENCE)
                assert await conversation.send_audio(b"\0\0" * 320) is False
                assert await conversation.interrupt() is False
    assert error.value.code == code
    assert str(error.value).startswith(f"the conversation has ended ({code.name}")
    assert pending.outcome == "open" and pending.turn_id == ""  # never started by the server
    # Nothing was sent for the typed turn: the conversation holds the first turn only.
    assert [t.agent_text for t in conversation.turns] == ["2 plus 3 is 5."]


# Orchestrators killed in a row while the microphone writes: grpc.aio hides the status from about
# one such call in ten (a write crosses the call's end: INTERNAL "Internal error from Core").
KILLS = 12
# Audio queued faster than the server takes it, so that the microphone is writing at the kill.
TALKING = Utterance.from_samples(np.zeros(PCM_16K.sample_rate * 30, np.int16), PCM_16K)


async def test_a_conversation_whose_orchestrator_dies_while_the_microphone_writes_ends_unavailable(
    stack: LocalStack,
) -> None:
    codes = []
    for _ in range(KILLS):
        async with processes() as group:
            orchestrator = await own_orchestrator(group, stack)
            async with (
                open_channel(orchestrator.target) as channel,
                Conversation(
                    channel, SessionSettings(), microphone=Microphone(realtime=False), resume=False
                ) as conversation,
            ):
                conversation.say(TALKING)
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    await conversation.assembler.session_started.wait()
                await asyncio.to_thread(orchestrator.kill)
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    codes.append((await conversation.ended(), conversation.details))
    assert [code for code, _ in codes] == [grpc.StatusCode.UNAVAILABLE] * KILLS, codes
