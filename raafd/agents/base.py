"""What the agent run loop needs from tools and from the conversation store.

A :class:`Tool` is called with validated JSON arguments and returns text the model can read;
it raises :class:`ToolError` for a failure the model should see (``is_error``). Timeouts are
the caller's cancel scope (``agents.NAME.tool_timeout``), never a parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from attrs import frozen

from raafd.providers.base import Usage

if TYPE_CHECKING:
    from raafd.streams.body import StreamWriter

__all__ = ["AgentResult", "AgentRunner", "SessionStore", "Tool", "ToolError", "ToolSpec"]


class ToolError(Exception):
    """A tool failed in a way the model should read (becomes ``tool_result`` with
    ``is_error: true``). The message must be short and must not contain secrets."""


@frozen
class ToolSpec:
    """How a tool is offered to a model (OpenAI ``function`` shape)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}},
            },
        }


class Tool(Protocol):
    @property
    def spec(self) -> ToolSpec: ...

    async def call(self, arguments: dict[str, Any]) -> str:
        """Run the tool. Raise :class:`ToolError` for a failure the model should read."""
        ...


class SessionStore(Protocol):
    """Durable conversations keyed by session id (SQLite by default). Writes are durable
    when the coroutine returns."""

    async def load(self, session: str) -> list[dict[str, Any]]:
        """The kept messages, oldest first (``[]`` for an unknown session)."""
        ...

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        """Add messages, then trim the oldest turns past the configured bounds."""
        ...

    async def delete(self, session: str) -> bool:
        """Forget a session; ``False`` if there was none."""
        ...


@frozen
class AgentResult:
    """The outcome of one agent run (all its turns, tools and handoffs)."""

    agent: str  # the agent that gave the final answer (after any handoffs)
    text: str  # the final answer
    messages: list[dict[str, Any]]  # the conversation including this run's messages
    usage: Usage  # summed over every model turn
    finish_reason: str


class AgentRunner(Protocol):
    """Runs an agent into a stream writer. Emits ``content``, ``tool_call``, ``tool_result``,
    ``handoff`` and ``retry`` events, but never a terminal event: the caller (a stream body, a
    workflow) decides how the stream ends. Failures raise a ``RaafdError`` whose ``code`` is the
    stream error code (``upstream_error``, ``max_turns``, ``timeout``, ...). With ``tag=True``
    every event carries ``agent`` (the agent that produced it), for multi-agent workflows."""

    async def run(
        self,
        out: StreamWriter,
        agent: str,
        messages: list[dict[str, Any]],
        *,
        tag: bool = False,
    ) -> AgentResult: ...
