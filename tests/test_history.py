"""The history rule (voicepipe.history): what a conversation cut to a budget keeps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.turns import HISTORY_LIMIT_CHARS, bounded
from voice.v1.language_model_pb2 import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER, ChatMessage
from voicepipe import history


@dataclass(frozen=True)
class Said:
    role: str
    content: str


def conversation(turns: int) -> list[Said]:
    said = [Said("system", "Be brief.")]
    for number in range(turns):
        said += [Said("user", f"question {number}"), Said("assistant", f"answer {number}")]
    return said


def cut(messages: list[Said], budget: int, drop_step: int = 1) -> list[Said]:
    return history.trim(
        messages,
        budget,
        lambda m: 1,
        is_system=lambda m: m.role == "system",
        is_user=lambda m: m.role == "user",
        drop_step=drop_step,
    )


def test_a_history_within_its_budget_is_sent_whole() -> None:
    said = conversation(3)
    assert cut(said, 7) == said


def test_the_oldest_turns_go_first_and_the_system_prompt_stays() -> None:
    kept = cut(conversation(10), 7)
    assert kept == [Said("system", "Be brief."), *conversation(10)[15:]]
    assert kept[1] == Said("user", "question 7")  # whole turns: it starts with a question


def test_turns_go_in_blocks_so_the_kept_beginning_stays_the_same_for_several_turns() -> None:
    said = conversation(20)
    firsts = {cut(said[: 1 + 2 * turns], 11, drop_step=4)[1] for turns in range(6, 10)}
    assert len(firsts) == 1  # four turns in a row sent with the same oldest question


def test_a_newest_turn_larger_than_the_budget_is_an_error_with_its_cost() -> None:
    said = [Said("system", "s"), Said("user", "u")]
    with pytest.raises(history.TurnTooLong) as raised:
        history.trim(
            said, 5, lambda m: 4, is_system=lambda m: m.role == "system", is_user=lambda m: m.role == "user"
        )
    assert raised.value.cost == 8 and raised.value.budget == 5


def test_the_orchestrator_forgets_the_oldest_turns_of_a_long_conversation() -> None:
    system = ChatMessage(role=ROLE_SYSTEM, content="Be brief.")
    said = [system]
    for number in range(300):  # some 100 k characters said
        said = bounded(
            [
                *said,
                ChatMessage(role=ROLE_USER, content=f"question {number} " * 12),
                ChatMessage(role=ROLE_ASSISTANT, content=f"answer {number} " * 12),
            ]
        )
    assert sum(len(m.content) for m in said) <= HISTORY_LIMIT_CHARS
    assert said[0] == system and said[-1].content.startswith("answer 299")
