"""Agents: the run loop, tools, handoffs.

- ``base``: the contracts: :class:`AgentRunner`, :class:`AgentResult`, :class:`Tool`,
  :class:`ToolError`, :class:`ToolSpec`, :class:`SessionStore`;
- ``runner``: :class:`AgentLoop`, the run loop (turns, concurrent tool calls, handoffs).
"""

from raafd.agents.base import (
    AgentResult,
    AgentRunner,
    SessionStore,
    Tool,
    ToolError,
    ToolSpec,
)
from raafd.agents.runner import AgentLoop, ToolSource

__all__ = [
    "AgentLoop",
    "AgentResult",
    "AgentRunner",
    "SessionStore",
    "Tool",
    "ToolError",
    "ToolSource",
    "ToolSpec",
]
