"""The rule that bounds a conversation's history: whole turns are cut, oldest first, and the
system messages stay. A pure function of the messages, a cost per message and a budget, so that
every bound on the history (the resumption ticket's bytes, a language model's context tokens)
cuts it the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from voice.v1 import language_model_pb2

SYSTEM = language_model_pb2.ROLE_SYSTEM
USER = language_model_pb2.ROLE_USER

Message = language_model_pb2.ChatMessage


def trim_oldest_turns(
    messages: Sequence[Message], cost: Callable[[Message], int], budget: int
) -> list[Message]:
    """`messages` less their oldest turns until their costs add up to at most `budget`. A turn
    is a user message and what follows it up to the next user message (the agent's reply);
    system messages are never cut, so the result is over budget when they alone are. One pass:
    each message's cost is asked once."""
    costs = [cost(message) for message in messages]
    total = sum(costs)
    cut_before = 0  # every message before this index that is not a system message is cut
    while total > budget:
        while cut_before < len(messages) and messages[cut_before].role == SYSTEM:
            cut_before += 1
        if cut_before == len(messages):
            break
        end = cut_before + 1
        while end < len(messages) and messages[end].role not in (USER, SYSTEM):
            end += 1
        total -= sum(costs[cut_before:end])
        cut_before = end
    return [m for i, m in enumerate(messages) if i >= cut_before or m.role == SYSTEM]
