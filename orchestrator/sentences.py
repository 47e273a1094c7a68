"""Groups streamed LLM text into the segments TTS speaks: sentences, except that the first
segment may end at a clause (`--first-segment clause`), so that speaking starts after the
reply's first few words instead of after its whole first sentence. Later segments stay whole
sentences: they are synthesised while earlier ones play, so cutting them gains nothing and
would chop the prosody."""

from __future__ import annotations

import re
from typing import Literal

FirstSegment = Literal["clause", "sentence"]
FIRST_SEGMENTS: tuple[FirstSegment, ...] = ("clause", "sentence")
# A first clause needs this many words: a shorter one ("Sure," "Well,") would be spoken as a
# fragment of its own, with a pause after it, for little gain.
FIRST_CLAUSE_MIN_WORDS = 4

# End of a sentence: . ! or ? (possibly followed by closing quotes or brackets), then whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
# End of a clause: , ; : or a dash (an em or en dash, or a hyphen standing between spaces), then
# whitespace; a hyphen inside a word ("well-known") is not one.
_CLAUSE_END = re.compile(r"(?:[,;:\u2013\u2014]|\s-)\s+")


class SentenceChunker:
    """Feed text deltas with push(); complete segments come out in order; flush() returns the rest.
    Segments concatenated are exactly the text pushed (whitespace included)."""

    def __init__(self, first_segment: FirstSegment) -> None:
        self._clause_allowed = first_segment == "clause"
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        self._buffer += text
        segments: list[str] = []
        while True:
            end = self._next_boundary()
            if end is None:
                return segments
            segments.append(self._buffer[:end])
            self._buffer = self._buffer[end:]
            self._clause_allowed = False

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    def _next_boundary(self) -> int | None:
        sentence = _SENTENCE_END.search(self._buffer)
        sentence_end = sentence.end() if sentence else None
        if self._clause_allowed:
            before = sentence.start() if sentence else len(self._buffer)
            for clause in _CLAUSE_END.finditer(self._buffer, 0, before):
                if len(self._buffer[: clause.start()].split()) >= FIRST_CLAUSE_MIN_WORDS:
                    return clause.end()
        return sentence_end
