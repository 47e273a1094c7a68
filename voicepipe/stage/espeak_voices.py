"""Voice names as clients give them ("en-us", "en-gb", "en-us+f3") resolved to espeak's voice files.

espeak-ng's own lookup by name matches file names only ("en-gb" is the file "gmw/en") and ignores
an unknown "+variant" silently, so the stage resolves names itself, against the voices the data
directory holds, and rejects what it cannot find (espeakng-loader, as for voicepipe.stage.libespeak)."""

from __future__ import annotations

from voicepipe.audio_format import InvalidInput
from voicepipe.stage.libespeak import VoiceFile
from voicepipe.stage.tts import VoiceInfo, VoiceList

LIST_VOICES_HINT = (
    "the ListVoices RPC lists them (grpcurl -plaintext HOST:PORT voice.v1.TextToSpeechService/ListVoices)"
)


class VoiceCatalogue:
    """Every voice by the names a client may use: its language tags ("en-gb"), its file name
    ("en", "gmw/en") and its description ("English (Great Britain)"), case-insensitive."""

    def __init__(self, files: list[VoiceFile], variants: list[str]) -> None:
        self._variants = {variant.lower(): variant for variant in variants}
        self._by_name: dict[str, VoiceFile] = {}
        # Weakest claims first, so that stronger ones overwrite them: a language tag goes to the
        # voice that lists it earliest (its most preferred), then descriptions, then file names.
        deepest = max((len(voice.languages) for voice in files), default=0)
        for rank in reversed(range(deepest)):
            for voice in reversed(files):
                if rank < len(voice.languages):
                    self._by_name[voice.languages[rank].lower()] = voice
        for voice in files:
            self._by_name[voice.name.lower()] = voice
        for voice in files:
            self._by_name[voice.identifier.rsplit("/", 1)[-1].lower()] = voice
            self._by_name[voice.identifier.lower()] = voice
        self._listed = tuple(
            VoiceInfo(
                name=self._listed_name(voice),
                description=voice.name,
                language_codes=voice.languages,
                gender=voice.gender,
            )
            for voice in files
        )

    def _listed_name(self, voice: VoiceFile) -> str:
        """The shortest name that selects the voice: its first language tag when that is its own."""
        for tag in voice.languages[:1]:
            if self._by_name.get(tag.lower()) is voice:
                return tag.lower()
        return voice.identifier.lower()

    def resolve(self, requested: str) -> str:
        """The espeak voice name ("gmw/en-US+f3") for a client's name; InvalidInput if unknown."""
        name, _, variant = requested.strip().lower().partition("+")
        voice = self._by_name.get(name)
        if voice is None:
            raise InvalidInput(f"config.voice {requested!r} is not a voice of this stage; {LIST_VOICES_HINT}")
        if not variant:
            return voice.identifier
        if variant not in self._variants:
            raise InvalidInput(
                f"config.voice {requested!r}: {variant!r} is not a voice variant of this stage;"
                f" {LIST_VOICES_HINT}"
            )
        return f"{voice.identifier}+{self._variants[variant]}"

    def listing(self) -> VoiceList:
        return VoiceList(voices=self._listed, variants=tuple(self._variants.values()))
