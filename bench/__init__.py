"""The benchmark harness: load generator, sweep over concurrent sessions, the request/response
and transport-floor baselines, the memory check, and the report (`python -m bench`)."""
