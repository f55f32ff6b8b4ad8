"""Fakes of the outside world for tests and benchmarks: real servers on real sockets."""

from .openai_upstream import FakeOpenAI, RecordedRequest, Script, ToolCallScript

__all__ = ["FakeOpenAI", "RecordedRequest", "Script", "ToolCallScript"]
