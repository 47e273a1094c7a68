"""Where the reply is cut into TTS segments: the first may end at a clause once it has a few
words (speaking starts sooner), the rest are whole sentences, and no text is lost or repeated."""

from __future__ import annotations

import pytest

from orchestrator.sentences import FirstSegment, SentenceChunker


def segments(deltas: list[str], first_segment: FirstSegment) -> list[str]:
    chunker = SentenceChunker(first_segment)
    out = [segment for delta in deltas for segment in chunker.push(delta)]
    if rest := chunker.flush():
        out.append(rest)
    assert "".join(out) == "".join(deltas)
    return out


def tokens(text: str) -> list[str]:
    """Deltas as an LLM streams them: a word (with its leading space) at a time."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


STORY = "Once upon a time, a small robot lived by the sea, alone. It polished the lamp, every night."


def test_the_first_segment_ends_at_its_first_clause_and_the_rest_are_sentences() -> None:
    assert segments(tokens(STORY), "clause") == [
        "Once upon a time, ",
        "a small robot lived by the sea, alone. ",
        "It polished the lamp, every night.",
    ]


def test_sentence_mode_waits_for_the_whole_first_sentence() -> None:
    assert segments(tokens(STORY), "sentence") == [
        "Once upon a time, a small robot lived by the sea, alone. ",
        "It polished the lamp, every night.",
    ]


@pytest.mark.parametrize(
    ("reply", "first"),
    [
        ("Sure, I can tell you a joke about cats.", "Sure, I can tell you a joke about cats."),
        ("Well, you know, it is Paris, I think.", "Well, you know, it is Paris, "),
        ("The capital of France; it is Paris.", "The capital of France; "),
        ("Here is the answer: it is four.", "Here is the answer: "),
        ("I think it is so \u2014 four.", "I think it is so \u2014 "),
        ("I think it is so - four.", "I think it is so - "),
        ("It is a well-known fact that it is four.", "It is a well-known fact that it is four."),
        ("It costs 1,000 dollars and more, they say.", "It costs 1,000 dollars and more, "),
        ("Hi there. Well, it is four, I think.", "Hi there. "),
    ],
)
def test_a_first_clause_needs_four_words_and_a_real_boundary(reply: str, first: str) -> None:
    assert segments(tokens(reply), "clause")[0] == first
