"""How the Whisper stage chooses the silence that ends an utterance at a pause: the words Whisper
heard up to the pause, then the turn model's score, then the fixed silence. The stage's calls
(test_stt_whisper) and bench.turn_pauses both apply this one rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from stt_whisper.turn_model import TurnEnd
from stt_whisper.unfinished_words import reads_unfinished

FIXED_MS = 400
WITH_MODEL = TurnEnd(Path("smart-turn.onnx"), complete_ms=200, incomplete_ms=1200, threshold=0.5, words=True)
NO_MODEL = TurnEnd(None, complete_ms=200, incomplete_ms=1200, threshold=0.5, words=True)


@pytest.mark.parametrize(
    ("heard", "unfinished"),
    [
        ("My account number is", True),
        ("Can you tell me about the", True),
        ("The problem is that.", True),
        ("And then I went to the...", True),
        ("I would like to", True),
        ("My account number is four five six.", False),
        ("My account number is.", False),  # Whisper ended the sentence there
        ("I like that.", False),
        ("Do you know where it is?", False),  # a question is never unfinished
        ("Can you tell me about the?", False),
        ("Yes.", False),
        ("", False),
    ],
)
def test_words_that_stop_where_no_sentence_ends_read_unfinished(heard: str, unfinished: bool) -> None:
    assert reads_unfinished(heard) is unfinished


@pytest.mark.parametrize(
    ("turn_end", "words_unfinished", "complete", "silence_ms"),
    [
        (NO_MODEL, False, None, FIXED_MS),  # finished words, no model: the fixed silence
        (NO_MODEL, True, None, 1200),  # words that leave the sentence open wait longer
        (WITH_MODEL, True, 0.95, 1200),  # ... whatever the turn model says
        (WITH_MODEL, False, 0.95, 200),  # the model judges it finished
        (WITH_MODEL, False, 0.2, 1200),  # ... or unfinished
        (WITH_MODEL, False, None, 1200),  # not judged yet: the unfinished silence
        (TurnEnd(None, 200, 1200, 0.5, words=False), True, None, FIXED_MS),  # words not read
    ],
)
def test_a_pause_ends_the_utterance_after_the_silence_its_words_and_score_choose(
    turn_end: TurnEnd, words_unfinished: bool, complete: float | None, silence_ms: int
) -> None:
    assert turn_end.pause_silence_ms(words_unfinished, complete, FIXED_MS) == silence_ms
