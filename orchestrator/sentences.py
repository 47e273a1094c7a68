"""Groups streamed LLM text into sentences or clauses, the unit sent to TTS: speaking can start
after the first clause instead of after the whole reply."""

from __future__ import annotations

import re

# End of a sentence: . ! or ? (possibly followed by closing quotes or brackets), then whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
# End of a clause: , ; or : then whitespace; used only once enough text has accumulated.
_CLAUSE_END = re.compile(r"[,;:]\s+")


class SentenceChunker:
    """Feed text deltas with push(); complete segments come out in order; flush() returns the rest.
    Segments concatenated are exactly the text pushed (whitespace included)."""

    def __init__(self, min_clause_chars: int = 24) -> None:
        self.min_clause_chars = min_clause_chars
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

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    def _next_boundary(self) -> int | None:
        sentence = _SENTENCE_END.search(self._buffer)
        if sentence:
            return sentence.end()
        for clause in _CLAUSE_END.finditer(self._buffer):
            if clause.start() >= self.min_clause_chars:
                return clause.end()
        return None
