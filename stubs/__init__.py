"""What the three stage stubs share, and what clients, tests and benchmarks use to talk to them:
the stub audio code, the latency profiles, the stub replies and the fault knobs."""
