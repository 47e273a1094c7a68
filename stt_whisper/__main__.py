"""`python -m stt_whisper`: the Whisper STT stage on the STT role's port 50052 (metrics on 9602);
its flags read VOICEPIPE_STT_<FLAG> variables, as every STT engine's do."""

from __future__ import annotations

from stt_whisper.engine import WhisperEngine
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    WhisperEngine,
    module="stt_whisper",
    role="stt",
    description="STT stage: transcribes real speech with faster-whisper (bundled tiny.en) and Silero VAD.",
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
