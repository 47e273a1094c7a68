"""Resumption tickets without a server: the history is cut by whole turns, oldest first, with the
system prompt kept, so that a ticket stays within its limit; keys rotate with the old one still
accepted; a keys file that cannot be used says why."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from orchestrator.tickets import MAX_TICKET_BYTES, TicketRejected, Tickets, parse_keys
from voice.v1 import language_model_pb2, resumption_pb2
from voice.v1.language_model_pb2 import ChatMessage
from voicepipe import history

SYSTEM = language_model_pb2.ROLE_SYSTEM
USER = language_model_pb2.ROLE_USER
ASSISTANT = language_model_pb2.ROLE_ASSISTANT
OLD_KEY, NEW_KEY = bytes([1] * 32), bytes([2] * 32)


def trim_oldest_turns(
    messages: list[ChatMessage], cost: Callable[[ChatMessage], int], budget: int
) -> list[ChatMessage]:
    """The history rule as a ticket applies it (ticket_history), with a cost of the test's own."""
    return history.trim(
        messages,
        budget,
        cost,
        is_system=lambda m: m.role == SYSTEM,
        is_user=lambda m: m.role == USER,
        drop_step=1,
        keep_newest=False,
    )


def conversation(turns: int, words: int = 3) -> list[ChatMessage]:
    """A system prompt, then `turns` questions and answers of `words` words each."""
    messages = [ChatMessage(role=SYSTEM, content="Be brief.")]
    for number in range(1, turns + 1):
        messages.append(ChatMessage(role=USER, content=" ".join([f"question{number}"] * words)))
        messages.append(ChatMessage(role=ASSISTANT, content=" ".join([f"answer{number}"] * words)))
    return messages


def test_trimming_cuts_whole_turns_oldest_first_and_keeps_the_system_prompt() -> None:
    messages = conversation(5)
    kept = trim_oldest_turns(messages, lambda message: 1, 5)
    assert kept == [messages[0], *messages[7:]]  # turns 4 and 5, each question with its answer


def test_a_turn_whose_reply_was_never_heard_is_cut_as_one() -> None:
    messages = [ChatMessage(role=USER, content="first"), *conversation(2)[1:]]  # "first" got no reply
    kept = trim_oldest_turns(messages, lambda message: len(message.content), 60)
    assert [m.content for m in kept] == ["question2 question2 question2", "answer2 answer2 answer2"]


def test_trimming_leaves_a_history_that_fits_alone() -> None:
    messages = conversation(2)
    assert trim_oldest_turns(messages, lambda message: 1, 5) == messages


def test_system_messages_stay_even_over_the_budget() -> None:
    messages = conversation(2)
    assert trim_oldest_turns(messages, lambda message: 1, 0) == messages[:1]


def state(history: list[ChatMessage]) -> resumption_pb2.ResumptionState:
    return resumption_pb2.ResumptionState(
        session_id="s1", tenant="acme", turns=len(history) // 2, history=history
    )


def test_a_long_conversation_gets_a_ticket_within_the_limit_holding_its_latest_turns() -> None:
    messages = conversation(400, words=20)  # about 200 KB of history
    tickets = Tickets((NEW_KEY,), 600)
    ticket = tickets.issue(state(messages))
    assert ticket is not None and ticket.turns == 400
    assert MAX_TICKET_BYTES - 1000 < len(ticket.ticket) <= MAX_TICKET_BYTES
    history = list(tickets.open(ticket.ticket, "acme").history)
    assert history[0] == messages[0] and history[-1] == messages[-1]
    assert history[1].role == USER and history == [messages[0], *messages[len(messages) - len(history) + 1 :]]


def test_no_ticket_when_the_system_prompt_alone_is_over_the_limit() -> None:
    prompt = ChatMessage(role=SYSTEM, content="x" * MAX_TICKET_BYTES)
    assert Tickets((NEW_KEY,), 600).issue(state([prompt])) is None


def test_a_ticket_signed_with_the_old_key_is_accepted_while_it_is_listed() -> None:
    ticket = Tickets((OLD_KEY,), 600).issue(state(conversation(1)))
    assert ticket is not None
    assert Tickets((NEW_KEY, OLD_KEY), 600).open(ticket.ticket, "acme").session_id == "s1"
    with pytest.raises(TicketRejected) as refused:
        Tickets((NEW_KEY,), 600).open(ticket.ticket, "acme")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no key"),
        ("# only a comment\n", "no key"),
        ("not-hex\n", "line 1: a key is written in hex"),
        (f"{NEW_KEY.hex()}\n{bytes(16).hex()}\n", "line 2: a key needs at least 32 bytes"),
    ],
)
def test_a_keys_file_that_cannot_be_used_says_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_keys(text)


def test_keys_are_read_in_order_the_first_signing() -> None:
    assert parse_keys(f"# rotation\n{NEW_KEY.hex()}\n\n{OLD_KEY.hex()}\n") == (NEW_KEY, OLD_KEY)
