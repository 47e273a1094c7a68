"""`python -m tts_piper`: the Piper neural TTS stage on the TTS role's port 50054 (metrics on 9604)."""

from __future__ import annotations

from tts_piper.engine import PiperEngine
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    PiperEngine,
    module="tts_piper",
    role="tts",
    description=(
        "TTS stage: speaks text with a Piper neural voice, each chunk tagged with the words it has spoken."
    ),
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
