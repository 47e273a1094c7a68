"""The rule that bounds a conversation's history: whole turns are cut, oldest first, and the
system messages stay. A pure function, so that every bound on the history (the resumption
ticket's size, a language model's context) cuts it the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from voice.v1 import language_model_pb2

SYSTEM = language_model_pb2.ROLE_SYSTEM
USER = language_model_pb2.ROLE_USER

Messages = Sequence[language_model_pb2.ChatMessage]


def trim_oldest_turns(
    messages: Messages, fits: Callable[[Messages], bool]
) -> list[language_model_pb2.ChatMessage]:
    """`messages` less their oldest turns until `fits` says they fit. A turn is a user message
    and what follows it up to the next user message (the agent's reply); system messages are
    never cut, so the result may still not fit when they alone do not."""
    kept = list(messages)
    while not fits(kept):
        first = next((i for i, message in enumerate(kept) if message.role != SYSTEM), None)
        if first is None:
            break
        end = first + 1
        while end < len(kept) and kept[end].role not in (USER, SYSTEM):
            end += 1
        del kept[first:end]
    return kept
