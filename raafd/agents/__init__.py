"""Agents: the run loop, tools, handoffs.

- ``base``: the contracts: :class:`AgentRunner`, :class:`AgentResult`, :class:`Tool`,
  :class:`ToolError`, :class:`ToolSpec`, :class:`SessionStore`;
- ``runner``: :class:`AgentLoop`, the run loop (turns, concurrent tool calls, handoffs);
- ``bodies``: :class:`AgentBodies`, the bodies of normal streams (an agent run, its session
  kept), given to the stream manager by the daemon.
"""

from raafd.agents.base import (
    AgentResult,
    AgentRunner,
    SessionStore,
    Tool,
    ToolError,
    ToolSpec,
)
from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop, ToolSource

__all__ = [
    "AgentBodies",
    "AgentLoop",
    "AgentResult",
    "AgentRunner",
    "SessionStore",
    "Tool",
    "ToolError",
    "ToolSource",
    "ToolSpec",
]
