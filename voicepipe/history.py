"""How a conversation's history is cut to a budget: the system messages stay, whole turns (a user
message and the replies after it) go, oldest first, and the turn in progress stays unless the
caller lets it go too. Every bound on a history uses it: the orchestrator's memory (characters),
the LLM stage's context (tokens) and the resumption ticket (bytes).

Turns go in blocks (`drop_step`) rather than one at a time, so that between two cuts the history
sent to a model keeps the same beginning, and a server that caches prompts (llama.cpp's slots)
reuses what it evaluated for the turns before instead of evaluating the whole history anew after
every turn. The rule is stateless: the same history and budget always give the same cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class ChatMessage(Protocol):
    @property
    def role(self) -> object: ...


M = TypeVar("M", bound=ChatMessage)

# Turns dropped at a time once the history is over its budget.
DROP_STEP = 8


class TurnTooLong(ValueError):
    """The system messages and the newest turn alone exceed the budget."""

    def __init__(self, cost: int, budget: int) -> None:
        super().__init__(f"the newest turn needs {cost} of a budget of {budget}")
        self.cost = cost
        self.budget = budget


def split_turns(
    messages: Sequence[M], is_system: Callable[[M], bool], is_user: Callable[[M], bool]
) -> tuple[list[M], list[list[M]]]:
    """The system messages, and the rest as turns: each turn starts at a user message (anything
    before the first user message is a turn of its own)."""
    system = [m for m in messages if is_system(m)]
    turns: list[list[M]] = []
    for message in messages:
        if is_system(message):
            continue
        if is_user(message) or not turns:
            turns.append([])
        turns[-1].append(message)
    return system, turns


def trim(
    messages: Sequence[M],
    budget: int,
    cost: Callable[[M], int],
    *,
    is_system: Callable[[M], bool],
    is_user: Callable[[M], bool],
    drop_step: int = DROP_STEP,
    keep_newest: bool = True,
) -> list[M]:
    """`messages` in order, cut to what fits `budget` (the sum of `cost` over the messages kept):
    the system messages always, then as many of the newest turns as fit, dropped in blocks of
    `drop_step` turns. With `keep_newest` the newest turn always stays, and TurnTooLong is raised
    when it and the system messages do not fit; without it every turn may go (the result is
    over budget only when the system messages alone are)."""
    system, turns = split_turns(messages, is_system, is_user)
    fixed = sum(cost(m) for m in system)
    costs = [sum(cost(m) for m in turn) for turn in turns]
    total = fixed + sum(costs)
    if total <= budget:
        return list(messages)
    newest = costs[-1] if costs else 0
    if keep_newest and fixed + newest > budget:
        raise TurnTooLong(fixed + newest, budget)
    # The fewest oldest turns whose removal fits, rounded up to a whole block.
    dropped, excess = 0, total - budget
    while excess > 0 and dropped < len(costs):
        excess -= costs[dropped]
        dropped += 1
    dropped = min(math.ceil(dropped / drop_step) * drop_step, len(turns) - (1 if keep_newest else 0))
    kept = {id(m) for turn in turns[dropped:] for m in turn}
    return [m for m in messages if is_system(m) or id(m) in kept]
