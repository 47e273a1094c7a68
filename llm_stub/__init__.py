"""The LLM stage stub: LanguageModelService.Generate with deterministic, documented replies
(see `stubs.replies`) streamed token by token at the pace of a latency profile."""
