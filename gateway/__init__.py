"""The WebSocket gateway (`python -m gateway`): a web page with a live microphone and a
WebSocket endpoint, each socket bridged to one Converse call of the orchestrator."""
