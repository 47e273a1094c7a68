"""The orchestrator's turn decisions, in process (see turn_harness): what a barge-in keeps of the
reply (heard_text, the history), a spoken turn talked over before its user could have heard it
is withdrawn and its words open the next, speculative turns held, released or withdrawn, and
what a broken stream does: a new call while nothing has reached the user, a regeneration spliced
on only when it repeats what was delivered, segments spoken again with nothing heard twice. The
same turns end to end, through real processes, are in test_orchestrator_e2e, test_speculation
and the chaos scenarios."""

from __future__ import annotations

import time

from google.protobuf.duration_pb2 import Duration
from prometheus_client import generate_latest

from orchestrator.tickets import Tickets
from stubs import audio_code, replies
from stubs.audio_code import normalize_text
from stubs.faults import FaultSettings
from tests.helpers import metric_value
from tests.turn_harness import (
    ASSISTANT,
    EVENT_TIMEOUT_S,
    USER,
    Conversation,
    conversation,
    stages,
    timings,
    typed,
)
from voice.v1 import voice_agent_pb2 as pb
from voicepipe_client import PCM_16K


def heard(audio: bytes) -> str:
    """The reply audio decoded (a reply ends in a word gap only: the stream's end closes it)."""
    return " ".join(audio_code.decode_utterances(PCM_16K.decode(audio), PCM_16K.sample_rate))


def started_texts(talk: Conversation) -> list[tuple[str, str]]:
    return [
        (e.correlation.turn_id, e.turn_started.user_text) for e in talk.events if e.HasField("turn_started")
    ]


# --- barge-in -------------------------------------------------------------------------------------


async def test_barge_in_keeps_in_the_history_only_the_reply_the_user_heard() -> None:
    async with stages() as stack, conversation(stack, audio_lead_s=0.05) as talk:
        await talk.runner.submit_speech("tell me a story", timings(), Duration(seconds=2))
        # The reply is paced in real time: after 0.3 s of it most of the story is still to come.
        await talk.wait_for(lambda: len(talk.audio("1")) >= PCM_16K.bytes_for(300), "0.3 s of the story")
        talk.runner.interrupt()
        ending = await talk.ended("1")
        audio = talk.audio("1")
        after = talk.of_turn("1")[talk.of_turn("1").index(ending) + 1 :]

    assert ending.HasField("turn_interrupted"), ending
    heard_text = ending.turn_interrupted.heard_text
    assert heard_text and replies.STORY.startswith(heard_text) and len(heard_text) < len(replies.STORY) / 2
    # The audio that left says heard_text (it may end inside the next word's first tone burst).
    decoded, expected = heard(audio), normalize_text(heard_text)
    assert decoded.startswith(expected) and len(decoded[len(expected) :].strip()) <= 1, (decoded, heard_text)
    assert after == [], "nothing of the turn leaves after TurnInterrupted"
    assert talk.history() == [(USER, "tell me a story"), (ASSISTANT, heard_text)]
    # The whole story was generated (the stub is instant): the history is what was heard, not that.
    assert stack.llm.calls[0].finished


async def test_a_spoken_turn_talked_over_before_its_audio_is_withdrawn_and_opens_the_next() -> None:
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()  # the reply has not begun when the user goes on speaking
        await talk.runner.submit_speech("My name is", timings(), Duration(seconds=1))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        talk.runner.interrupt()
        withdrawn = await talk.ended("1")
        # The withdrawn turn's Generate is cancelled at the stage, before it produced anything.
        await stack.llm.wait_for(lambda: stack.llm.calls[0].cancelled, "the first call cancelled")
        stack.llm_gate.open()
        assert talk.history() == []  # forgotten at once: the next turn's request does not hold it
        await talk.runner.submit_speech("Ada.", timings(), Duration(seconds=2))
        answer = await talk.ended("2")

    assert withdrawn.turn_interrupted.withdrawn and withdrawn.turn_interrupted.heard_text == ""
    assert talk.audio("1") == b""
    assert started_texts(talk) == [("1", "My name is"), ("2", "My name is Ada.")]
    assert answer.HasField("turn_completed") and answer.turn_completed.agent_text == "Nice to meet you, Ada."
    assert stack.llm.calls[1].messages == [("user", "My name is Ada.")]
    assert heard(talk.audio("2")) == "Nice to meet you, Ada."
    assert talk.history() == [(USER, "My name is Ada."), (ASSISTANT, "Nice to meet you, Ada.")]


async def test_speech_begun_too_soon_after_the_reply_to_be_a_reaction_withdraws_the_turn() -> None:
    async with stages() as stack, conversation(stack, audio_lead_s=0.05) as talk:
        await talk.runner.submit_speech("My name is", timings(), Duration(seconds=1))
        await talk.wait_for(lambda: talk.audio("1"), "the reply's first audio")
        # The user's speech began 0.1 s before the first audio was seen here: within the reaction
        # time of the reply's start, whatever this test's delay in seeing it.
        talk.runner.interrupt(time.monotonic() - 0.1)
        withdrawn = await talk.ended("1")
        assert talk.history() == []
        await talk.runner.submit_speech("Ada.", timings(), Duration(seconds=2))
        answer = await talk.ended("2")

    assert withdrawn.turn_interrupted.withdrawn, withdrawn
    # The caller may have heard the reply's first words; the history keeps none of them.
    assert talk.audio("1") != b""
    assert "You said: My name is.".startswith(withdrawn.turn_interrupted.heard_text)
    assert started_texts(talk) == [("1", "My name is"), ("2", "My name is Ada.")]
    assert answer.turn_completed.agent_text == "Nice to meet you, Ada."
    assert stack.llm.calls[1].messages == [("user", "My name is Ada.")]
    assert talk.history() == [(USER, "My name is Ada."), (ASSISTANT, "Nice to meet you, Ada.")]


async def test_speech_begun_a_reaction_time_after_the_reply_started_is_a_barge_in() -> None:
    async with stages() as stack, conversation(stack, audio_lead_s=0.05) as talk:
        await talk.runner.submit_speech("tell me a story", timings(), Duration(seconds=1))
        # Paced in real time, 0.4 s of audio has left no sooner than 0.35 s after the first.
        await talk.wait_for(lambda: len(talk.audio("1")) >= PCM_16K.bytes_for(400), "0.4 s of the story")
        talk.runner.interrupt(time.monotonic())
        ending = await talk.ended("1")

    assert not ending.turn_interrupted.withdrawn, ending
    heard_text = ending.turn_interrupted.heard_text
    assert heard_text and replies.STORY.startswith(heard_text)
    assert talk.history() == [(USER, "tell me a story"), (ASSISTANT, heard_text)]
    assert started_texts(talk) == [("1", "tell me a story")]


async def test_a_typed_turn_interrupted_before_its_audio_keeps_the_question_and_no_reply() -> None:
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()
        talk.runner.submit(typed("tell me a story"))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        talk.runner.interrupt()
        ending = await talk.ended("1")
        stack.llm_gate.open()

    assert ending.HasField("turn_interrupted") and ending.turn_interrupted.heard_text == ""
    assert talk.history() == [(USER, "tell me a story")]


async def test_a_withdrawn_turn_that_no_words_follow_is_answered_when_input_ends() -> None:
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()
        await talk.runner.submit_speech("hello", timings(), Duration(seconds=1))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        talk.runner.interrupt()
        await talk.ended("1")
        stack.llm_gate.open()
    # The conversation's end (finish()) answers the words the withdrawn turn held.
    assert started_texts(talk) == [("1", "hello"), ("2", "hello")]
    answer = talk.ending("2")
    assert answer is not None and answer.turn_completed.agent_text == replies.GREETING


# --- speculation ----------------------------------------------------------------------------------


async def test_a_speculative_turn_is_held_until_the_final_confirms_it_and_asks_the_llm_once() -> None:
    async with stages() as stack, conversation(stack) as talk:
        await talk.runner.speculate("hello", timings())
        await stack.llm.wait_for(lambda: bool(stack.llm.calls) and stack.llm.calls[0].finished)
        assert talk.events == [], "a speculative turn's events are held"
        assert talk.history() == []
        await talk.runner.submit_speech("hello", timings(), Duration(seconds=1))
        answer = await talk.ended("1")

    assert answer.turn_completed.agent_text == replies.GREETING
    kinds = [e.WhichOneof("event") for e in talk.of_turn("1")]
    assert kinds[0] == "turn_started" and kinds[-1] == "turn_completed"  # released after TurnStarted
    assert heard(talk.audio("1")) == replies.GREETING
    assert len(stack.llm.calls) == 1
    assert talk.history() == [(USER, "hello"), (ASSISTANT, replies.GREETING)]


async def test_a_withdrawn_speculation_is_cancelled_and_leaves_no_trace() -> None:
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()
        await talk.runner.speculate("tell me", timings())
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        await talk.runner.withdraw_speculation()
        await stack.llm.wait_for(lambda: stack.llm.calls[0].cancelled)
        stack.llm_gate.open()
        await talk.runner.submit_speech("tell me a joke", timings(), Duration(seconds=2))
        answer = await talk.ended("1")

    # Turn 1 is the confirmed words: the speculation took no turn id, no history, no event.
    assert started_texts(talk) == [("1", "tell me a joke")]
    assert answer.turn_completed.agent_text == "You said: tell me a joke."
    assert [call.messages for call in stack.llm.calls] == [
        [("user", "tell me")],
        [("user", "tell me a joke")],
    ]
    assert talk.history() == [(USER, "tell me a joke"), (ASSISTANT, "You said: tell me a joke.")]


async def test_a_final_with_other_words_replaces_the_speculation() -> None:
    async with stages() as stack, conversation(stack) as talk:
        await talk.runner.speculate("what is 2 plus", timings())
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        await talk.runner.submit_speech("what is 2 plus 3", timings(), Duration(seconds=2))
        answer = await talk.ended("1")

    assert answer.turn_completed.agent_text == "2 plus 3 is 5."
    assert heard(talk.audio("1")) == "2 plus 3 is 5."
    assert [e for e in talk.events if e.correlation.turn_id != "1"] == []
    assert talk.history() == [(USER, "what is 2 plus 3"), (ASSISTANT, "2 plus 3 is 5.")]


async def test_no_speculation_while_a_turn_is_playing() -> None:
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()
        talk.runner.submit(typed("hello"))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1)
        await talk.runner.speculate("tell me a story", timings())
        stack.llm_gate.open()
        await talk.ended("1")
    assert len(stack.llm.calls) == 1


# --- broken streams -------------------------------------------------------------------------------


def counted(name: str, **labels: str) -> float:
    """A counter of this process (the orchestrator's and the in-process stages' metrics)."""
    return metric_value(generate_latest().decode(), name, **labels)


async def test_a_generate_broken_before_any_text_is_simply_made_again() -> None:
    # The stage sends its headers, then breaks: too late for the channel's own retry.
    async with stages(llm_faults=FaultSettings(break_after=0, calls=1)) as stack, conversation(stack) as talk:
        talk.runner.submit(typed("hello"))
        answer = await talk.ended("1")
    assert answer.turn_completed.agent_text == replies.GREETING
    assert heard(talk.audio("1")) == replies.GREETING
    assert len(stack.llm.calls) == 2


async def test_a_greedy_regeneration_after_text_reached_the_user_is_spliced_on() -> None:
    resumed = counted("voicepipe_stage_resumptions_total", stage="llm")
    async with stages(llm_faults=FaultSettings(break_after=4, calls=1)) as stack, conversation(stack) as talk:
        talk.runner.submit(typed("what is 12 times 12"))
        answer = await talk.ended("1")
    assert counted("voicepipe_stage_resumptions_total", stage="llm") == resumed + 1
    reply = "12 times 12 is 144."
    assert answer.turn_completed.agent_text == reply
    assert "".join(e.agent_text.text for e in talk.of_turn("1") if e.HasField("agent_text")) == reply
    assert heard(talk.audio("1")) == reply  # every word once
    assert len(stack.llm.calls) == 2
    assert talk.history()[-1] == (ASSISTANT, reply)


async def test_a_sampled_regeneration_that_differs_ends_the_reply_at_what_was_delivered() -> None:
    # The sampled stub's second attempt starts "Take 2: ...": it cannot continue the first.
    faults = FaultSettings(break_after=4, calls=1)
    cut_short = counted("voicepipe_turns_total", outcome="cut_short")
    async with stages(llm_temperature=0.7, llm_faults=faults) as stack, conversation(stack) as talk:
        talk.runner.submit(typed("what is 12 times 12"))
        ending = await talk.ended("1")
        talk.runner.submit(typed("hello"))
        after = await talk.ended("2")

    delivered = "12 times 12 is "  # the four deltas before the break
    assert ending.HasField("error"), ending
    assert (ending.error.stage, ending.error.code) == (pb.STAGE_LLM, "DATA_LOSS")
    assert f"cut short after {len(delivered)} characters" in ending.error.message
    # The user heard all that was delivered (the unfinished sentence too), and nothing else.
    assert heard(talk.audio("1")) == delivered.strip()
    assert talk.history()[:2] == [(USER, "what is 12 times 12"), (ASSISTANT, delivered)]
    assert after.HasField("turn_completed")  # the conversation goes on
    assert counted("voicepipe_turns_total", outcome="cut_short") == cut_short + 1
    # The regeneration was the same request; the next turn's holds exactly the delivered text.
    first, regenerated, second = (call.messages for call in stack.llm.calls)
    assert regenerated == first
    assert second == [("user", "what is 12 times 12"), ("assistant", delivered), ("user", "hello")]


async def test_a_refused_generate_is_not_tried_again() -> None:
    async with stages() as stack, conversation(stack) as talk:
        before = counted("grpc_server_handled_total", grpc_method="Generate", grpc_code="INVALID_ARGUMENT")
        talk.runner.submit(typed("x" * 16_385))  # over the contract's limit for one message
        ending = await talk.ended("1")
    assert (ending.error.stage, ending.error.code) == (pb.STAGE_LLM, "INVALID_ARGUMENT")
    assert "16384" in ending.error.message
    after = counted("grpc_server_handled_total", grpc_method="Generate", grpc_code="INVALID_ARGUMENT")
    assert after == before + 1
    assert talk.history() == [(USER, "x" * 16_385)]  # no reply was heard


async def test_an_llm_gone_mid_turn_fails_it_unavailable_at_once_not_at_its_deadline() -> None:
    # No health Watch runs here (see stages()): the breaker never opens, so what ends the turn is
    # its calls meeting a stage that refuses connections.
    async with stages() as stack, conversation(stack) as talk:
        stack.llm_gate.close()
        talk.runner.submit(typed("tell me a story"))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 1, "the Generate call")
        started = time.monotonic()
        await stack.llm_server.stop(None)  # the stage is gone: its port refuses connections
        ending = await talk.ended("1")
        failed_after_s = time.monotonic() - started
    assert (ending.error.stage, ending.error.code) == (pb.STAGE_LLM, "UNAVAILABLE"), ending
    # A call that waited for the stage to come back would have ended at the turn's deadline.
    assert failed_after_s < EVENT_TIMEOUT_S / 2, failed_after_s
    assert talk.history() == [(USER, "tell me a story")]


async def test_a_synthesis_broken_mid_reply_is_resumed_with_nothing_heard_twice() -> None:
    # Far past the first segment.
    faults = FaultSettings(break_after=150, calls=1)
    async with stages(tts_faults=faults) as stack, conversation(stack) as talk:
        talk.runner.submit(typed("tell me a story"))
        answer = await talk.ended("1")
    assert answer.HasField("turn_completed"), answer
    assert heard(talk.audio("1")) == replies.STORY


async def test_a_synthesis_that_keeps_failing_fails_the_turn_and_the_history_keeps_no_reply() -> None:
    async with stages(tts_faults=FaultSettings(fail_first=100)) as stack, conversation(stack) as talk:
        talk.runner.submit(typed("hello"))
        ending = await talk.ended("1")
    # The stage refuses each call while the caller writes its config and first segment: the
    # status may cross those writes and reach the caller as INTERNAL (grpc/grpc#36066).
    assert ending.error.stage == pb.STAGE_TTS and ending.error.code in ("UNAVAILABLE", "INTERNAL"), ending
    assert talk.audio("1") == b""
    assert talk.history() == [(USER, "hello")]


# --- resumption tickets ---------------------------------------------------------------------------


async def test_the_ticket_covers_a_turns_audio_only_once_the_history_holds_its_words() -> None:
    tickets = Tickets(keys=(b"k" * 32,), ttl_s=60)
    async with stages() as stack, conversation(stack, tickets=tickets) as talk:
        await talk.runner.submit_speech("hello", timings(), Duration(seconds=1))
        await talk.ended("1")
        first = await talk.wait_for(lambda: [e for e in talk.events if e.HasField("resumption")], "a ticket")
        stack.llm_gate.close()
        await talk.runner.submit_speech("My name is", timings(), Duration(seconds=3))
        await stack.llm.wait_for(lambda: len(stack.llm.calls) == 2)
        talk.runner.interrupt()  # withdrawn: its words wait for the next turn
        await talk.ended("2")
        second = await talk.wait_for(
            lambda: [e for e in talk.events if e.HasField("resumption")][1:], "a second ticket"
        )
        stack.llm_gate.open()

    assert first[0].resumption.audio_offset == Duration(seconds=1)
    assert first[0].resumption.turns == 1
    # After the withdrawn turn: still from the end of turn 1, so a resumed call sends its words again.
    assert second[0].resumption.audio_offset == Duration(seconds=1)
    state = tickets.open(second[0].resumption.ticket, "")
    assert [(m.role, m.content) for m in state.history] == [(USER, "hello"), (ASSISTANT, replies.GREETING)]
