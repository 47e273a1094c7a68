"""Text to a Piper voice's phoneme ids, sentence by sentence, with where each word of the text
ends among the ids.

espeak-ng gives each clause's phonemes with words separated by spaces, but its words are not
the text's: it joins unstressed words to the next ("on the" is one) and expands numbers ("3.14"
is four). Each text word is therefore phonemised on its own too, and the two phoneme strings are
aligned (difflib): a text word ends at the end of the espeak word its last phoneme falls in, so
a word is never counted as spoken before all of its sounds are."""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from voicepipe.stage.alignment import Mark
from voicepipe.stage.libespeak import Clause

BOS: Final = "^"
EOS: Final = "$"
PAD: Final = "_"
SENTENCE_ENDS: Final = frozenset(".?!")
CLAUSE_ENDS: Final = frozenset(",:;")
_LANGUAGE_SWITCH: Final = re.compile(r"\([^)]+\)")  # espeak's "(fr)" markers: not phonemes
_WORD: Final = re.compile(r"\S+")

Phonemise = Callable[[str], list[Clause]]


@dataclass(frozen=True)
class Word:
    """A word of the text (`length` code points at `position`), spoken by `ids[:end_id]`."""

    position: int
    length: int
    end_id: int


@dataclass
class Sentence:
    """What the voice model speaks at once: its phoneme ids and the text's words in them."""

    ids: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    end: int = 0  # code points of the text spoken once the sentence has been

    def marks(self, samples_per_id: Sequence[int], offset: int) -> list[Mark]:
        """Word starts and the sentence end in samples of the segment's audio (the sentence's
        audio begins at `offset`): a word has been spoken when the next one starts."""
        ends = [offset, *(offset + int(x) for x in _cumulative(samples_per_id))]
        marks: list[Mark] = []
        previous_end = offset
        for word in self.words:
            marks.append(Mark(True, word.position, word.length, previous_end))
            previous_end = ends[word.end_id]
        marks.append(Mark(False, self.end, 0, previous_end))
        return marks


def _cumulative(values: Sequence[int]) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out


class Phonemizer:
    """Turns text into sentences of a voice's phoneme ids (`id_map` is the voice's
    phoneme_id_map). `phonemise` is espeak's, with the voice's language selected."""

    def __init__(self, id_map: Mapping[str, Sequence[int]], phonemise: Phonemise) -> None:
        self._map = id_map
        self._phonemise = phonemise

    def sentences(self, text: str) -> list[Sentence]:
        sentences: list[Sentence] = []
        current = self._open()
        start = 0
        for clause in self._phonemise(text):
            clause_text = text[start : clause.end]
            terminator = clause_text.rstrip()[-1:]
            phonemes = unicodedata.normalize("NFD", _LANGUAGE_SWITCH.sub("", clause.ipa))
            self._add_clause(current, clause_text, start, phonemes)
            if terminator in SENTENCE_ENDS | CLAUSE_ENDS:
                self._add(current, terminator + (" " if terminator in CLAUSE_ENDS else ""))
            start = clause.end
            if terminator in SENTENCE_ENDS:
                sentences.append(self._close(current, start))
                current = self._open()
        sentences.append(self._close(current, len(text)))
        return [sentence for sentence in sentences if sentence.words]

    def _open(self) -> Sentence:
        sentence = Sentence()
        sentence.ids.extend(self._map[BOS])
        sentence.ids.extend(self._map[PAD])
        return sentence

    def _close(self, sentence: Sentence, end: int) -> Sentence:
        sentence.ids.extend(self._map[EOS])
        sentence.end = end
        return sentence

    @staticmethod
    def _letters(ipa: str) -> str:
        return unicodedata.normalize("NFD", _LANGUAGE_SWITCH.sub("", ipa)).replace(" ", "")

    def _add(self, sentence: Sentence, phonemes: str) -> list[int]:
        """Appends the phonemes the voice knows (each followed by a pad, as the voice was
        trained); returns the id count after each of them."""
        after: list[int] = []
        for phoneme in phonemes:
            if phoneme in self._map:
                sentence.ids.extend(self._map[phoneme])
                sentence.ids.extend(self._map[PAD])
            after.append(len(sentence.ids))
        return after

    def _add_clause(self, sentence: Sentence, clause_text: str, start: int, phonemes: str) -> None:
        groups = [group for group in phonemes.split(" ") if group]
        if not groups:
            return
        after = self._add(sentence, " ".join(groups))
        # The id count after each espeak word (and the letters of all of them, spaces left out).
        group_end_ids: list[int] = []
        group_end_letters: list[int] = []
        position = letters = 0
        for espeak_word in groups:
            position += len(espeak_word)
            letters += len(espeak_word)
            group_end_ids.append(after[position - 1])
            group_end_letters.append(letters)
            position += 1  # the space
        words = [match for match in _WORD.finditer(clause_text) if any(c.isalnum() for c in match[0])]
        if not words:
            return
        own = [self._letters("".join(clause.ipa for clause in self._phonemise(word[0]))) for word in words]
        to_clause = _letter_map("".join(own), phonemes.replace(" ", ""))
        word_end = 0
        group = 0
        for index, (match, letters_of_word) in enumerate(zip(words, own, strict=True)):
            word_end += len(letters_of_word)
            if index == len(words) - 1:
                group = len(groups) - 1
            else:
                reached = to_clause(word_end)
                while group < len(groups) - 1 and group_end_letters[group] < reached:
                    group += 1
            sentence.words.append(Word(start + match.start(), len(match[0]), group_end_ids[group]))


def _letter_map(own: str, clause: str) -> Callable[[int], int]:
    """Maps a count of letters of `own` to the count of letters of `clause` spoken by then."""
    blocks = difflib.SequenceMatcher(None, own, clause, autojunk=False).get_matching_blocks()

    def mapped(count: int) -> int:
        for block in blocks:
            if block.a < count <= block.a + block.size:
                return block.b + count - block.a
            if count <= block.a:  # in a gap: up to the next letter both have
                return block.b
        return len(clause)

    return mapped
