"""The LLM stub's deterministic replies: a contract that tests of other services rely on.

The reply answers the LAST message, which is from the user; earlier user messages are the
history it may recall. System messages and assistant messages (complete or truncated because
the user interrupted them) never change a reply. Matching ignores case, surrounding
whitespace and trailing punctuation. Rules, first match wins:

1. Long answer: the message contains "tell me a story" or "long answer" -> `STORY`, seven
   sentences (about 90 words) for barge-in tests.
2. Recall a name: "what is my name" / "what's my name" -> "Your name is <name>." with the name
   from the most recent earlier user message containing "my name is <name>" (the name runs to
   the next , . ! ? or ;); with none -> "I do not know your name yet."
3. Recall a note: "what did I ask you to remember" -> "You asked me to remember <note>." with
   the note from the most recent earlier user message "remember <note>" (also "please remember
   <note>"); with none -> "You have not asked me to remember anything."
4. Arithmetic: the whole message is `A op B`, optionally after "what is" / "what's" /
   "calculate" and before "=" or "?": A and B are numbers (up to 15 digits, optional sign and
   decimals), op is plus/+, minus/-, times/x/*/multiplied by, divided by or /. Reply
   "<A> <op word> <B> is <result>." with op word plus, minus, times or divided by, e.g.
   "2+3" -> "2 plus 3 is 5.", "7 divided by 2" -> "7 divided by 2 is 3.5.". Results are exact,
   rounded to at most 4 decimals; division by zero -> "<A> divided by 0 is undefined.".
5. A name statement: the message contains "my name is <name>" -> "Nice to meet you, <name>."
6. A note: the message starts with "remember <note>" or "please remember <note>" ->
   "OK, I will remember <note>."
7. Greeting: the message's first word is hello, hi or hey -> "Hello! How can I help you today?"
8. Otherwise an echo: "You said: <text>." with the message's text, its whitespace collapsed to
   single spaces and trailing . ! ? removed; an empty message -> "Sorry, I did not catch that."

Sampling: with a temperature above 0 the stub stands in for a sampling model, whose reply to
the same request differs from call to call. The first call for a turn (the same correlation ids
and messages) gets the reply above; the n-th call of that request, as a regeneration after a
broken stream is, gets `sampled(reply, n)`: "Take <n>: <reply>", deterministic so that tests
can assert it.

Every reply is printable ASCII (the TTS stub renders exactly that): text taken from the user
is folded to ASCII (accents dropped, other characters removed).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from voicepipe.stage.llm import Message

GREETING = "Hello! How can I help you today?"
STORY = (
    "Once upon a time, a small robot lived in a quiet lighthouse by the sea. "
    "Every night it polished the great lamp until it shone like a star. "
    "One stormy evening, a fishing boat lost its way among the rocks. "
    "The robot turned the lamp toward the boat and swept the beam across the waves. "
    "Guided by the light, the sailors steered safely into the harbor. "
    "From that night on, the village left a gift of fresh oil at the lighthouse door. "
    "And the little robot kept its light burning, year after year."
)
UNKNOWN_NAME = "I do not know your name yet."
NOTHING_TO_REMEMBER = "You have not asked me to remember anything."
EMPTY = "Sorry, I did not catch that."

_TRAILING_PUNCTUATION = ".!?"
_LONG_ANSWER = re.compile(r"\b(?:tell me a story|long answer)\b", re.IGNORECASE)
_ASK_NAME = re.compile(r"^what(?: is|'s) my name$", re.IGNORECASE)
_ASK_NOTE = re.compile(r"^what did i ask you to remember$", re.IGNORECASE)
_NAME = re.compile(r"\bmy name is\s+([^,.!?;]+)", re.IGNORECASE)
_NOTE = re.compile(r"^(?:please\s+)?remember\s+(.+)$", re.IGNORECASE)
_GREETING = re.compile(r"^(?:hello|hi|hey)\b", re.IGNORECASE)
_NUMBER = r"[-+]?\d{1,15}(?:\.\d{1,15})?"
_ARITHMETIC = re.compile(
    rf"^(?:(?:what is|what's|calculate)\s+)?({_NUMBER})\s*"
    r"(plus|\+|minus|-|times|multiplied by|x|\*|divided by|/)"
    rf"\s*({_NUMBER})\s*=?$",
    re.IGNORECASE,
)
_OPERATOR_WORDS = {
    "plus": "plus",
    "+": "plus",
    "minus": "minus",
    "-": "minus",
    "times": "times",
    "multiplied by": "times",
    "x": "times",
    "*": "times",
    "divided by": "divided by",
    "/": "divided by",
}


def to_ascii(text: str) -> str:
    """Printable ASCII with single spaces: accents dropped, other characters removed."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    printable = "".join(c if c.isprintable() else " " for c in folded)
    return " ".join(printable.split())


def _clean(text: str) -> str:
    """What the rules match against: ASCII, single-spaced, without trailing . ! ?"""
    return to_ascii(text).rstrip(_TRAILING_PUNCTUATION).strip()


def _format_operand(text: str) -> str:
    """A number as the user wrote it, without sign clutter or trailing zeros: "+2.50" -> "2.5"."""
    formatted = f"{Decimal(text):f}"
    if "." in formatted:
        formatted = formatted.rstrip("0").rstrip(".")
    return "0" if formatted == "-0" else formatted


def _format_result(value: Fraction) -> str:
    """An exact result, rounded to at most 4 decimals: 7/2 -> "3.5", 1/3 -> "0.3333"."""
    scaled = round(value * 10_000)
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), 10_000)
    decimals = f"{fraction:04d}".rstrip("0")
    return f"{sign}{whole}.{decimals}" if decimals else f"{sign}{whole}"


def arithmetic(text: str) -> str | None:
    """The answer to `A op B`, or None when the text is not such a question."""
    match = _ARITHMETIC.match(_clean(text))
    if match is None:
        return None
    left, right = Fraction(match[1]), Fraction(match[3])
    word = _OPERATOR_WORDS[match[2].lower()]
    question = f"{_format_operand(match[1])} {word} {_format_operand(match[3])}"
    if word == "divided by" and right == 0:
        return f"{question} is undefined."
    results = {
        "plus": lambda: left + right,
        "minus": lambda: left - right,
        "times": lambda: left * right,
        "divided by": lambda: left / right,
    }
    return f"{question} is {_format_result(results[word]())}."


def _recall(pattern: re.Pattern[str], history: Sequence[Message]) -> str | None:
    """The first group of `pattern` in the most recent user message of `history` that has it."""
    for message in reversed(history):
        if message.role == "user" and (match := pattern.search(_clean(message.content))):
            return match[1].strip()
    return None


def _note_of(text: str) -> str | None:
    match = _NOTE.match(_clean(text))
    return match[1].strip() if match else None


def _name_of(text: str) -> str | None:
    match = _NAME.search(_clean(text))
    return match[1].strip() if match else None


def reply(messages: Sequence[Message]) -> str:
    """The reply to the last message (from the user) given the conversation before it."""
    *history, last = messages
    text = _clean(last.content)
    if _LONG_ANSWER.search(text):
        return STORY
    if _ASK_NAME.match(text):
        name = _recall(_NAME, history)
        return f"Your name is {name}." if name else UNKNOWN_NAME
    if _ASK_NOTE.match(text):
        note = _recall(_NOTE, history)
        return f"You asked me to remember {note}." if note else NOTHING_TO_REMEMBER
    if (answer := arithmetic(text)) is not None:
        return answer
    if name := _name_of(text):
        return f"Nice to meet you, {name}."
    if note := _note_of(text):
        return f"OK, I will remember {note}."
    if _GREETING.match(text):
        return GREETING
    return f"You said: {text}." if text else EMPTY


def sampled(text: str, attempt: int) -> str:
    """The reply of a sampling model's `attempt`-th call of the same request (1: the first)."""
    return text if attempt == 1 else f"Take {attempt}: {text}"


_TOKEN = re.compile(r"\S+\s*")


def tokenize(text: str) -> list[str]:
    """Splits text into tokens, each a word with its punctuation and following space; the
    tokens joined give the text back (less any leading whitespace)."""
    return _TOKEN.findall(text)


def count_words(text: str) -> int:
    """Prompt tokens are counted as whitespace-separated words."""
    return len(text.split())
