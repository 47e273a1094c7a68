"""`python -m stt_stub`: the STT stub server on port 50052 (metrics on 9602) by default."""

from __future__ import annotations

from stt_stub.engine import StubSpeechEngine
from stubs.faults import FAULT_KNOBS
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    StubSpeechEngine,
    module="stt_stub",
    role="stt",
    description="STT stub: transcribes audio spoken in the stub audio code.",
    extensions=(FAULT_KNOBS,),
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
