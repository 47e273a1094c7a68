"""`python -m llm_openai`: the LLM stage on the LLM role's ports (50053, metrics 9603), in front
of an OpenAI-compatible backend (by default the local one: `python -m llm_openai.backend`)."""

from __future__ import annotations

from llm_openai.engine import OpenAIEngine
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    OpenAIEngine,
    module="llm_openai",
    role="llm",
    description="LLM stage: streams replies from an OpenAI-compatible chat completions endpoint.",
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
