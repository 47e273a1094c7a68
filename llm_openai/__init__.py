"""The LLM stage for any OpenAI-compatible chat completions endpoint (llama.cpp's server, vLLM,
Ollama, TGI, hosted APIs), with llama.cpp serving a small local model as the default backend."""
