"""A ctypes binding of the part of libespeak-ng (1.52, as the espeakng-loader wheel ships it with
its voice data) that voice engines use (tts_espeak speaks with it, tts_piper takes its phonemes;
an engine that imports it needs espeakng-loader in its extra): synchronous synthesis into a
callback that receives the audio as it is produced together with word and clause events.

The library keeps global state and is not thread-safe: one `Espeak` per process, and every method
called from the same thread."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Final

import espeakng_loader
import numpy as np

from voicepipe.pcm import Samples
from voicepipe.stage.alignment import Mark

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_INITIALIZE_DONT_EXIT: Final = 0x8000  # report missing data as an error rather than exit()
_CHARS_UTF8: Final = 1
_POS_CHARACTER: Final = 1
_EE_OK: Final = 0
_EVENT_LIST_TERMINATED: Final = 0
_EVENT_WORD: Final = 1
_EVENT_END: Final = 5
_PHONEMES_IPA: Final = 0x02
# Audio handed to the callback in buffers of this length: shorter buffers reach the client sooner.
BUFFER_MS: Final = 20


class Parameter(IntEnum):
    """espeak_PARAMETER values the stage sets."""

    RATE = 1  # words per minute, 80 to 450
    PITCH = 3  # base pitch, 0 to 100 (50 normal)


class _EventId(ctypes.Union):
    _fields_ = (("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8))


class _Event(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    )


class _Voice(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_char_p),
        ("languages", ctypes.POINTER(ctypes.c_char)),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    )


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class VoiceFile:
    """One voice the data directory holds: `identifier` is its file under voices/ (such as
    "gmw/en-US"); `languages` its language tags, most preferred first."""

    identifier: str
    name: str
    languages: tuple[str, ...]
    gender: str


@dataclass(frozen=True)
class Clause:
    """One clause of a text in phonemes: it ends at code point `end` of the text (its
    punctuation and the spaces after it included)."""

    end: int
    ipa: str


# Called with each buffer of audio and the marks that fall in it; returns True to abort synthesis.
AudioSink = Callable[[Samples, list[Mark]], bool]

_GENDERS: Final = {1: "male", 2: "female"}


def _languages(raw: ctypes._Pointer[ctypes.c_char]) -> tuple[str, ...]:
    """Decodes espeak's language list: (priority byte, zero-terminated tag)* then a zero byte."""
    found: list[tuple[int, str]] = []
    offset = 0
    while (priority := raw[offset][0]) != 0:
        tag = ctypes.string_at(ctypes.addressof(raw.contents) + offset + 1)
        found.append((priority, tag.decode()))
        offset += len(tag) + 2
    return tuple(tag for _, tag in sorted(found, key=lambda entry: entry[0]))


class Espeak:
    """libespeak-ng, initialised for synchronous synthesis into a callback. The library is one
    global state, so a second instance while one is open is refused."""

    _open = False

    def __init__(self) -> None:
        if Espeak._open:
            raise RuntimeError("libespeak-ng is already in use in this process; share its Espeak")
        self.data_path = Path(espeakng_loader.get_data_path())
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self._lib
        lib.espeak_Initialize.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = (_SynthCallback,)
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_ListVoices.argtypes = (ctypes.c_void_p,)
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetVoiceByName.argtypes = (ctypes.c_char_p,)
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = (
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        )
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int)
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_Terminate.argtypes = ()
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"libespeak-ng could not initialise with its data at {self.data_path}")
        self.sample_rate: int = rate
        self._sink: AudioSink | None = None
        self._error: BaseException | None = None
        self._callback = _SynthCallback(self._on_audio)  # held: the library keeps only the pointer
        lib.espeak_SetSynthCallback(self._callback)
        Espeak._open = True

    def voices(self) -> list[VoiceFile]:
        entries = self._lib.espeak_ListVoices(None)
        found: list[VoiceFile] = []
        index = 0
        while entries[index]:
            voice = entries[index].contents
            found.append(
                VoiceFile(
                    identifier=(voice.identifier or b"").decode(),
                    name=(voice.name or b"").decode(),
                    languages=_languages(voice.languages),
                    gender=_GENDERS.get(voice.gender, ""),
                )
            )
            index += 1
        return found

    def variants(self) -> list[str]:
        """The voice variants (the part after '+' in a voice name): files in voices/!v."""
        return sorted(path.name for path in (self.data_path / "voices" / "!v").iterdir() if path.is_file())

    def set_voice(self, name: str) -> None:
        """Selects a voice by file name, optionally with a variant ("gmw/en-US+f3")."""
        if (status := self._lib.espeak_SetVoiceByName(name.encode())) != _EE_OK:
            raise ValueError(f"espeak-ng has no voice {name!r} (error {status})")

    def set_parameter(self, parameter: Parameter, value: int) -> None:
        if (status := self._lib.espeak_SetParameter(parameter, value, 0)) != _EE_OK:
            raise ValueError(f"espeak-ng refused {parameter.name.lower()} {value} (error {status})")

    def synth(self, text: str, sink: AudioSink) -> None:
        """Speaks `text`, handing `sink` each buffer as it is produced; returns when the text has
        been spoken or the sink asked to stop. An exception raised by the sink stops synthesis
        and is raised here."""
        data = text.encode()
        self._sink, self._error = sink, None
        try:
            status = self._lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        finally:
            self._sink = None
        if self._error is not None:
            raise self._error
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed (error {status})")

    def phonemes(self, text: str) -> list[Clause]:
        """`text` in IPA phonemes of the selected voice, clause by clause, words separated by
        spaces (espeak_TextToPhonemes); nothing is synthesised."""
        data = text.encode()
        buffer = ctypes.create_string_buffer(data)
        start = ctypes.addressof(buffer)
        pointer = ctypes.c_void_p(start)
        clauses: list[Clause] = []
        previous = 0
        while pointer.value is not None:
            ipa = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
            after = len(data) if pointer.value is None else pointer.value - start
            end = len(data[:after].decode(errors="ignore"))
            if pointer.value is not None:
                end -= 1  # espeak has read one character of the next clause
            clauses.append(Clause(end=max(end, previous), ipa=(ipa or b"").decode()))
            previous = clauses[-1].end
        return clauses

    def _on_audio(
        self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: ctypes._Pointer[_Event]
    ) -> int:
        # An exception cannot cross back into C: keep it for synth() and abort.
        try:
            marks: list[Mark] = []
            index = 0
            while (event := events[index]).type != _EVENT_LIST_TERMINATED:
                if event.type in (_EVENT_WORD, _EVENT_END):
                    marks.append(
                        Mark(event.type == _EVENT_WORD, event.text_position - 1, event.length, event.sample)
                    )
                index += 1
            samples = np.ctypeslib.as_array(wav, (count,)).copy() if wav and count else np.zeros(0, np.int16)
            assert self._sink is not None
            return int(self._sink(samples.astype(np.int16, copy=False), marks))
        except BaseException as exc:
            self._error = exc
            return 1

    def close(self) -> None:
        self._lib.espeak_Terminate()
        Espeak._open = False
