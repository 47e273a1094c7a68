"""`python -m tts_espeak`: the espeak-ng TTS stage on the TTS role's port 50054 (metrics on 9604)."""

from __future__ import annotations

from tts_espeak.engine import EspeakEngine
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    EspeakEngine,
    module="tts_espeak",
    role="tts",
    description="TTS stage: speaks text with espeak-ng, each chunk tagged with the words it has spoken.",
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
