"""Text normalisation before synthesis: what a language model writes reads aloud sensibly, and
every position still maps back to the text the client sent."""

from __future__ import annotations

import pytest

from voicepipe.stage.normalize import normalize


def words(text: str) -> list[str]:
    return normalize(text).text.split()


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("**Hello** _there_ ~~old~~ `code`", "Hello there old code"),
        ("# Title\n> quoted\n- item one\n* item two\n---", "Title quoted item one item two"),
        ("See [the docs](https://example.com/a) and ![a chart](c.png).", "See the docs and a chart."),
        ("Visit https://www.example.com/path?q=1.", "Visit example dot com ."),
        ("Mail jo.doe@mail.example.org now", "Mail jo dot doe at mail dot example dot org now"),
        ("Great job! 👍🏽 ❤️ 🇬🇧 done", "Great job! done"),
        ("Salt & pepper, 50% off, 2 + 2 = 4", "Salt and pepper, 50 percent off, 2 plus 2 equals 4"),
        ("It costs $5 or €1.5 million", "It costs 5 dollars or 1.5 million euros"),
        ("Pick #1 -> win — really", "Pick number 1 to win , really"),
        ("use snake_case and/or kebab", "use snake case and or kebab"),
    ],
)
def test_markup_emoji_urls_and_symbols_read_sensibly(text: str, spoken: str) -> None:
    assert words(text) == spoken.split()


def test_plain_text_is_left_as_it_is() -> None:
    text = "Hello, world. It's 3.14 o'clock; is it?"
    assert normalize(text).text == text


def test_only_emoji_or_markup_has_nothing_to_say() -> None:
    assert not normalize("🎉🎉 **").speakable
    assert normalize("ok 🎉").speakable


@pytest.mark.parametrize(
    ("text", "word", "heard"),
    [
        # The spoken word, then the punctuation and space after it.
        ("Hello, world.", "Hello", "Hello, "),
        # Markup around the word counts with it; the link's target is never spoken.
        ("**Hello** world", "Hello", "**Hello** "),
        ("See [the docs](https://x.io/a) now.", "docs", "See [the docs](https://x.io/a) "),
        # A word spoken from part of an original word ("50" of "50%") does not yet count: the
        # original word is heard once all of it has been said.
        ("It is 50% off", "50", "It is "),
        ("It is 50% off", "percent", "It is 50% "),
    ],
)
def test_spoken_positions_map_to_word_boundaries_of_the_original(text: str, word: str, heard: str) -> None:
    normalized = normalize(text)
    end = normalized.text.index(word) + len(word)
    assert text[: normalized.spoken_through(end)] == heard


def test_the_last_word_covers_the_whole_original() -> None:
    text = "Bye now! 👋"
    normalized = normalize(text)
    assert normalized.spoken_through(normalized.text.index("now") + 3) == len(text)
