"""What the words of a pause say about the turn: an English utterance that stops on a word no
sentence ends on ("my account number is", "can you tell me about the", "the problem is that") is
unfinished, however its voice falls. The pause's decode gives those words while the pause lasts
(stt_whisper.call), before the endpointing silence has held.

The words are closed-class ones: articles and possessive determiners, conjunctions, the infinitive
"to", "of", "that" after a form of "to be", and such a form itself unless Whisper ended the
sentence there with a full stop. A question may end on some of them ("Do
you know where it is?"); Whisper writes its question mark, and a question is never judged
unfinished here. A finished statement that does end on one ("That's what it is.") waits the
unfinished silence: a later answer, not a caller cut off. Whisper's own ellipsis at the end, its
mark for speech that trails off, reads unfinished too."""

from __future__ import annotations

import re

# The last word of an utterance that leaves it unfinished.
_NEVER_LAST = frozenset(
    {
        # articles and possessive determiners
        *("a", "an", "the", "my", "your", "our", "their", "its"),
        # conjunctions and complementisers
        *("and", "or", "but", "nor", "because", "if", "whether", "although", "than"),
        # the infinitive's "to" and "of"
        *("to", "of"),
    }
)
# "to be" ends a sentence now and then ("than he was."): unfinished only where Whisper wrote no
# full stop after it ("My account number is").
_BE = frozenset({"is", "are", "was", "were", "am"})
# The last two words of an utterance that leave it unfinished ("that" alone ends "I like that").
_NEVER_LAST_PAIRS = frozenset({("is", "that"), ("was", "that"), ("are", "that")})
_WORD = re.compile(r"[a-z0-9']+")


def reads_unfinished(text: str) -> bool:
    """Whether English `text`, a transcript up to a pause, stops where no sentence ends, or
    trails off: Whisper writes an ellipsis where speech stops mid-phrase ("My phone is...")."""
    text = text.strip()
    if text.endswith(("...", "\u2026")):
        return True
    if text.endswith("?"):
        return False
    words = _WORD.findall(text.lower())
    if not words:
        return False
    last = words[-1]
    return (
        last in _NEVER_LAST
        or tuple(words[-2:]) in _NEVER_LAST_PAIRS
        or (last in _BE and not text.endswith((".", "!")))
    )
