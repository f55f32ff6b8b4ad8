"""The WebSocket gateway at /v1/ws."""
