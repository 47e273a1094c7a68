"""The developer's tools: `make up` (stack), `make demo` (demo), `make certs` (certs) and the
command-line client (client), each run as `python -m voicepipe_tools.<tool>`. They start engines
and stubs and speak with them, so they live here: no library package (voicepipe, orchestrator,
voicepipe_client, gateway, the engines) imports an engine, a stub or a tool
(tests/test_imports.py)."""
