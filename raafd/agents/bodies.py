"""The body of a normal stream: the agent run, with its session's conversation kept.

:class:`AgentBodies` is the :class:`~raafd.streams.body.BodyFactory` the composition root gives
the stream manager. A body loads the session's history before the run and appends the run's
messages (the new input, then the assistant and tool messages) *before* ``complete`` is
emitted: a client told "complete" finds the session saved. A run that fails saves nothing and
ends the stream with ``error`` carrying the failure's code. The agent's output filters (which
the stream manager wraps around the body) rewrite the saved assistant messages as they did the
stream's text, so a session shows what the stream showed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raafd.agents.base import AgentRunner, SessionStore
from raafd.errors import RaafdError
from raafd.logging import get_logger

if TYPE_CHECKING:
    from raafd.streams.body import Body, StreamWriter
    from raafd.streams.filters import FilterChain

__all__ = ["AgentBodies", "emit_failure"]

log = get_logger("raafd.streams")


class AgentBodies:
    """Bodies that run agents with ``runner``; with ``sessions`` (which may be set later, once
    the store is open) they keep conversations across streams."""

    def __init__(self, runner: AgentRunner, sessions: SessionStore | None = None) -> None:
        self.runner = runner
        self.sessions = sessions
        #: Each agent's output filters (the daemon sets them at start and on reload).
        self.filters: Mapping[str, FilterChain] = {}

    @property
    def keeps_sessions(self) -> bool:
        return self.sessions is not None

    def __call__(self, agent: str, messages: list[dict[str, Any]], session: str | None) -> Body:
        runner = self.runner
        store = self.sessions if session is not None else None

        async def body(out: StreamWriter) -> None:
            try:
                history = (
                    await store.load(session) if store is not None and session is not None else []
                )
                result = await runner.run(out, agent, [*history, *messages])
                if store is not None and session is not None:
                    # Durable before `complete`: a client told "complete" finds it saved.
                    new = result.messages[len(history) :]
                    chain = self.filters.get(agent)
                    if chain is not None:
                        new = [_rewritten(m, chain, agent) for m in new]
                    await store.append(session, new)
            except RaafdError as exc:
                log.info("stream failed", code=exc.code, reason=exc.message)
                await emit_failure(out, exc)
                return
            # Anything else propagates: the stream logs it with its traceback and ends with
            # `error` {internal}, revealing nothing.
            usage = result.usage
            await out.emit(
                "complete",
                final_response=result.text,
                usage={
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                },
                finish_reason=result.finish_reason,
            )

        return body


def _rewritten(message: dict[str, Any], chain: FilterChain, agent: str) -> dict[str, Any]:
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str) or not content:
        return message
    return {**message, "content": chain.rewrite(content, agent)}


async def emit_failure(out: StreamWriter, exc: RaafdError) -> None:
    """End a stream with ``error`` for a failure the client may see (its code, its message,
    and ``retry_after`` when the failure has one)."""
    extra: dict[str, Any] = {}
    if exc.retry_after is not None:
        extra["retry_after"] = exc.retry_after
    await out.emit("error", error={"code": exc.code, "message": exc.message}, **extra)
