"""Text normalisation before synthesis: what a language model writes (markdown, emoji, links,
URLs, symbols) becomes text that reads aloud sensibly, never spelled out character by character.

The result keeps, for every character it holds, the position in the original text it came from,
so that what an engine reports as spoken maps back to the segment text the client sent: the
character ranges of the audio always index the original."""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

# Read aloud in place of the symbol (padded with spaces so that it never joins a word).
SYMBOLS: Final = {
    "&": "and",
    "%": "percent",
    "+": "plus",
    "=": "equals",
    "@": "at",
    "°": "degrees",
    "\u00d7": "times",  # multiplication sign
    "÷": "divided by",
    "€": "euros",
    "£": "pounds",
    "$": "dollars",
    "¥": "yen",
    "<": "less than",
    ">": "greater than",
    "~": "about",
    "→": "to",
    "©": "copyright",
}
# Dropped: markup, separators and brackets that a voice would otherwise name.
SILENT: Final = frozenset("*_`|/\\^{}[]#®™•")
DASHES: Final = frozenset("\u2014\u2013")  # em and en dash: read as a pause
CURRENCIES: Final = {"$": "dollars", "€": "euros", "£": "pounds", "¥": "yen"}
SCALES: Final = {"k": "thousand", "m": "million", "bn": "billion", "b": "billion"}
_EMOJI_PARTS: Final = frozenset("\u200d\u20e3") | frozenset(chr(c) for c in range(0xFE00, 0xFE10))

_PATTERN: Final = re.compile(
    r"(?P<fence>```[^\n]*)"
    r"|!?\[(?P<label>[^\]\n]*)\]\([^)\s]*\)"
    r"|(?P<url>\b(?:https?://|www\.)[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'\"])"
    r"|(?P<email>\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b)"
    r"|(?P<rule>^[ \t]*(?:[-*_][ \t]*){3,}$)"
    r"|(?P<block>^[ \t]*(?:#{1,6}|>|[-*+])[ \t]+)"
    r"|(?P<money>(?P<currency>[$€£¥])[ \t]?(?P<amount>\d[\d,]*(?:\.\d+)?)"
    r"(?:[ \t]?(?P<scale>thousand|million|billion|trillion|[kKmMbB]n?)\b)?)"
    r"|(?P<arrow>->|=>)"
    r"|(?P<strike>~~)"
    r"|(?P<number_sign>#(?=\d))",
    re.MULTILINE,
)


class _Builder:
    """The normalised text being built, with the original position of each character."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.origins: list[int] = []

    def copy(self, text: str, start: int, end: int) -> None:
        self.parts.append(text[start:end])
        self.origins.extend(range(start, end))

    def say(self, words: str, origin: int) -> None:
        """Text that replaces the original from `origin` on (every character maps there)."""
        padded = f" {words} "
        self.parts.append(padded)
        self.origins.extend([origin] * len(padded))


def _read_host(url: str) -> str:
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", url).split("/")[0].split("?")[0].split("#")[0]
    return host.replace(".", " dot ")


def _is_emoji(char: str) -> bool:
    return (
        char in _EMOJI_PARTS
        or 0x1F3FB <= ord(char) <= 0x1F3FF  # skin tones
        or unicodedata.category(char) in ("So", "Cs", "Co", "Cn")
    )


def _copy_plain(out: _Builder, text: str, start: int, end: int) -> None:
    """Text between markup: symbols read or dropped, emoji dropped, everything else kept."""
    run = start
    for index in range(start, end):
        char = text[index]
        if char in SYMBOLS:
            replacement = SYMBOLS[char]
        elif char in DASHES:
            replacement = ","
        elif char in SILENT or _is_emoji(char):
            replacement = ""
        else:
            continue
        out.copy(text, run, index)
        out.say(replacement, index)
        run = index + 1
    out.copy(text, run, end)


def _normalize_into(out: _Builder, text: str, start: int, end: int) -> None:
    position = start
    for match in _PATTERN.finditer(text, start, end):
        _copy_plain(out, text, position, match.start())
        origin = match.start()
        if match["label"] is not None:
            _normalize_into(out, text, match.start("label"), match.end("label"))
        elif match["url"] is not None:
            out.say(_read_host(match["url"]), origin)
        elif match["email"] is not None:
            user, host = match["email"].split("@", 1)
            out.say(f"{user.replace('.', ' dot ')} at {host.replace('.', ' dot ')}", origin)
        elif match["money"] is not None:
            scale = match["scale"] or ""
            scale = SCALES.get(scale.lower(), scale)
            out.say(f"{match['amount']} {scale} {CURRENCIES[match['currency']]}", origin)
        elif match["arrow"] is not None:
            out.say("to", origin)
        elif match["number_sign"] is not None:
            out.say("number", origin)
        else:  # fence, rule, block markup, strike-through: dropped
            out.say("", origin)
        position = match.end()
    _copy_plain(out, text, position, end)


@dataclass(frozen=True)
class NormalizedText:
    """`text` is what the engine speaks; `origins[i]` is the index in `original` that `text[i]` came
    from (non-decreasing); `word_starts` are the original's word boundaries (0, and every index
    where a word begins after whitespace)."""

    original: str
    text: str
    origins: tuple[int, ...]
    word_starts: tuple[int, ...]

    @property
    def speakable(self) -> bool:
        return any(char.isalnum() for char in self.text)

    def spoken_through(self, end: int) -> int:
        """Once `text[:end]` has been spoken (`end` is the end of a word the engine reported), how much
        of the original has: a prefix that ends on a word boundary of the original (before a
        word, after the whitespace that precedes it), never more than was spoken. The
        punctuation and spaces after the spoken word count as spoken with it."""
        while end < len(self.text) and (self.text[end].isspace() or _is_punctuation(self.text[end])):
            end += 1
        if end >= len(self.text):
            return len(self.original)
        return self.word_starts[bisect.bisect_right(self.word_starts, self.origins[end]) - 1]


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def normalize(text: str) -> NormalizedText:
    out = _Builder()
    _normalize_into(out, text, 0, len(text))
    starts = [0] + [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    return NormalizedText(
        original=text, text="".join(out.parts), origins=tuple(out.origins), word_starts=tuple(starts)
    )
