"""`python -m tts_stub`: the TTS stub server on port 50054 (metrics on 9604) by default."""

from __future__ import annotations

from stubs.faults import FAULT_KNOBS
from tts_stub.engine import StubVoiceEngine
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    StubVoiceEngine,
    module="tts_stub",
    role="tts",
    description="TTS stub: speaks text in the stub audio code.",
    extensions=(FAULT_KNOBS,),
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
