"""Chaos tests: faults injected between the orchestrator and its stages."""
