"""LocalAgreement-2 (ufal/whisper_streaming): of the growing utterance's successive decodes, the
words two in a row agree on are committed as stable; committed words are never taken back."""

from __future__ import annotations


class LocalAgreement:
    def __init__(self) -> None:
        self.committed: list[str] = []
        self._previous: list[str] = []

    @property
    def stable_text(self) -> str:
        return " ".join(self.committed)

    def update(self, words: list[str]) -> str:
        """Takes the words of the latest decode (which was asked to start with the committed
        words) and returns the interim text: the committed words, then the latest decode's rest."""
        held = len(self.committed)
        starts_with_committed = [_normal(w) for w in words[:held]] == [_normal(w) for w in self.committed]
        fresh = words[held:] if starts_with_committed else words
        agreed = 0
        for new, old in zip(fresh, self._previous[held:], strict=False):
            if _normal(new) != _normal(old):
                break
            agreed += 1
        self._previous = [*self.committed, *fresh]
        self.committed.extend(fresh[:agreed])
        return " ".join(self._previous)


def _normal(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())
