"""The LLM stage stub: LanguageModelService.Generate with deterministic, documented replies
(see `llm_stub.replies`) streamed token by token at the pace of a latency profile."""
