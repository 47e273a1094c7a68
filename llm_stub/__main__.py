"""`python -m llm_stub`: the LLM stub server on port 50053 (metrics on 9603) by default."""

from __future__ import annotations

from llm_stub.engine import StubLanguageEngine
from stubs.faults import FAULT_KNOBS
from voicepipe.stage.main import StageSpec

SPEC = StageSpec(
    StubLanguageEngine,
    module="llm_stub",
    role="llm",
    description="LLM stub: deterministic streamed replies for tests, demos and benchmarks.",
    extensions=(FAULT_KNOBS,),
)
parse_args = SPEC.parse_args

if __name__ == "__main__":
    SPEC.run()
