"""The agent run loop: model turns, tool calls and handoffs, streamed as they happen.

One run of :class:`AgentLoop` is a loop of *turns*. A turn sends the conversation to the
agent's provider (falling back to its ``fallback`` providers before the first delta, see
``raafd.providers.fallback``) and forwards the answer: text as ``content`` events the moment it
arrives, retries as ``retry``. A turn that ends with tool calls emits ``tool_call`` for each,
runs them *concurrently* in the loop's nursery (each under the agent's ``tool_timeout``),
emits ``tool_result`` for each as it finishes, appends the assistant turn and the tool answers
to the conversation (OpenAI shape) and goes on with the next turn. A turn with no tool call is
the final answer.

A call to ``transfer_to_NAME`` (offered once per ``handoffs`` entry) is a handoff: it is
answered with a short tool result, a ``handoff`` event is emitted, and the next turn runs the
target agent (its instructions, model, tools, provider, fallbacks and ``max_turns``) on the same
conversation, in the same stream.

What the loop keeps true:

- backpressure: the provider runs in the stream's task and sends into a sink that appends to
  the stream; the append waits while the stream is paused or its subscriber is behind, so the
  provider stops reading the upstream (no channel, no second task per token);
- cancellation: tools run in a nursery inside the stream's body, so cancelling the stream
  cancels them with the upstream request;
- timers: tool-call fragments and tool results count as progress for the stream's first-token
  and idle timers (``out.progress()``); a tool running longer than ``streams.idle_timeout``
  still ends the stream with ``timeout``, so keep ``tool_timeout`` below it;
- bounds: at most ``max_turns`` model turns per run (the limit of the agent running now; a
  turn that still asks for tools at the limit raises :class:`~raafd.errors.MaxTurns` before
  its tools run), at most :data:`MAX_TOOL_CALLS` tool calls per turn;
- usage: summed over the turns; a turn whose upstream reported none makes the sum's counts
  ``None`` (unknown), never a partial number;
- the loop never emits a terminal event; failures are raised as ``RaafdError`` (see
  :class:`~raafd.agents.base.AgentRunner`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import trio
from attrs import define, field

from raafd.agents.base import AgentResult, Tool, ToolError, ToolSpec
from raafd.config import AgentConfig, StreamsConfig
from raafd.errors import MaxTurns, NotFound, RaafdError, Unavailable
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.providers.base import (
    Delta,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Usage,
)
from raafd.providers.breaker import Breakers
from raafd.providers.fallback import default_model, stream_with_fallback

if TYPE_CHECKING:
    # Only for types: raafd.streams imports this module (the manager runs the loop).
    from raafd.streams.body import StreamWriter

__all__ = [
    "HANDOFF_PREFIX",
    "MAX_TOOL_CALLS",
    "AgentLoop",
    "Emit",
    "ToolCall",
    "ToolSource",
    "Turn",
    "handoff_spec",
    "read_turn",
]

log = get_logger("raafd.agents")

HANDOFF_PREFIX = "transfer_to_"
MAX_TOOL_CALLS = 64  # per model turn; more fails the turn (a runaway upstream, not a plan)


class ToolSource(Protocol):
    """Where the loop gets an agent's tools (``raafd.agents.tools.ToolRegistry``)."""

    def tools_for(self, names: Sequence[str]) -> list[Tool]: ...


# --- one turn ---------------------------------------------------------------------------------


@define
class ToolCall:
    """A tool call merged from its fragments."""

    index: int
    id: str = ""
    name: str = ""
    fragments: list[str] = field(factory=list)

    @property
    def raw_arguments(self) -> str:
        return "".join(self.fragments)

    def parsed_arguments(self) -> dict[str, Any] | None:
        """The arguments as a JSON object; ``None`` when they are not one."""
        text = self.raw_arguments
        if not text.strip():
            return {}
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    def event_arguments(self) -> dict[str, Any]:
        """``arguments`` of the ``tool_call`` event: the object, or {"_raw": text}."""
        parsed = self.parsed_arguments()
        return parsed if parsed is not None else {"_raw": self.raw_arguments}


@define
class Turn:
    """What one model turn said."""

    text: list[str] = field(factory=list)
    tool_calls: dict[int, ToolCall] = field(factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None

    @property
    def answer(self) -> str:
        return "".join(self.text)

    def calls(self) -> list[ToolCall]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]


class Emit(Protocol):
    """``out.emit``, or the loop's wrapper of it that tags events with the agent."""

    def __call__(self, kind: str, **fields: Any) -> Awaitable[None]: ...


async def read_turn(
    out: StreamWriter,
    chain: Sequence[tuple[Provider, ProviderRequest]],
    *,
    breakers: Breakers,
    metrics: Metrics,
    agent: str | None = None,
) -> Turn:
    """Run one model turn: stream ``chain`` (with fallback) into ``out`` as ``content`` and
    ``retry`` events (tagged with ``agent`` when given) and return what the model said. Tool
    calls are merged, not emitted. Raises :class:`ProviderError`.

    The provider runs in this task and its sink appends straight to the stream: no channel and
    no second task per token. ``emit`` returns only once the stream takes more (not paused,
    its single subscriber keeping up), so until then the provider does not read again."""
    sink = _TurnSink(out, agent)
    await out.wait_ready()  # paused before the first token: do not even ask yet
    try:
        await stream_with_fallback(chain, sink, breakers=breakers, metrics=metrics)
    except _TooManyCalls:
        raise ProviderError(
            f"the model asked for more than {MAX_TOOL_CALLS} tool calls in one turn",
            reason="protocol",
        ) from None
    return sink.turn


class _TooManyCalls(Exception):
    """Raised through the provider (which lets it pass and closes its request) past
    :data:`MAX_TOOL_CALLS`; not a :class:`ProviderError`, so no retry, no fallback and no
    breaker verdict."""


class _TurnSink:
    """The provider's sink for one turn: merges deltas into the turn and emits text and
    retries as they come, tagged with ``agent`` when given."""

    __slots__ = ("_out", "_tag", "turn")

    def __init__(self, out: StreamWriter, agent: str | None) -> None:
        self._out = out
        self._tag: dict[str, str] = {} if agent is None else {"agent": agent}
        self.turn = Turn()

    async def send(self, item: ProviderEvent, /) -> None:
        out = self._out
        if isinstance(item, RetryNotice):
            retry: dict[str, Any] = {
                "attempt": item.attempt,
                "reason": item.reason,
                "retry_after": item.retry_after,
            }
            await out.emit("retry", **retry, **self._tag)
            return
        if not _merge(out, self.turn, item):
            raise _TooManyCalls
        if item.text:
            await out.emit("content", delta=item.text, **self._tag)


def _merge(out: StreamWriter, turn: Turn, delta: Delta) -> bool:
    """Take a delta's fragments, usage and finish reason; False past MAX_TOOL_CALLS."""
    if delta.tool_calls:
        out.progress()
        for fragment in delta.tool_calls:
            call = turn.tool_calls.get(fragment.index)
            if call is None:
                if len(turn.tool_calls) >= MAX_TOOL_CALLS:
                    return False
                call = turn.tool_calls[fragment.index] = ToolCall(fragment.index)
            if fragment.id:
                call.id = fragment.id
            if fragment.name:
                call.name = fragment.name
            if fragment.arguments:
                call.fragments.append(fragment.arguments)
    if delta.usage is not None:
        turn.usage = delta.usage
    if delta.finish_reason is not None:
        turn.finish_reason = delta.finish_reason
    if delta.text:
        turn.text.append(delta.text)
    return True


def handoff_spec(target: str) -> ToolSpec:
    """The function offered to a model for a handoff to ``target``."""
    return ToolSpec(
        name=HANDOFF_PREFIX + target,
        description=f"Hand the conversation over to the {target!r} agent, which answers from"
        " then on.",
        parameters={"type": "object", "properties": {}},
    )


# --- the loop ---------------------------------------------------------------------------------


@define
class _Agent:
    """The agent running now, resolved: config, tools by name, offered specs."""

    name: str
    config: AgentConfig
    tools: dict[str, Tool]
    specs: list[dict[str, Any]]


@define
class _Result:
    tool_id: str
    content: str
    is_error: bool


class AgentLoop:
    """Runs agents into streams (implements :class:`~raafd.agents.base.AgentRunner`).

    ``agents``, ``providers`` and ``tools`` are read at the start of each run and at each
    handoff; :meth:`reload` replaces them for runs started afterwards. ``breakers`` is shared
    by every run (one circuit per provider). ``tools`` None offers no tools."""

    def __init__(
        self,
        agents: Mapping[str, AgentConfig],
        providers: Mapping[str, Provider],
        breakers: Breakers,
        tools: ToolSource | None,
        metrics: Metrics,
        streams: StreamsConfig,
    ) -> None:
        self._agents = agents
        self._providers = providers
        self._breakers = breakers
        self._tools = tools
        self._metrics = metrics
        self._streams = streams

    @property
    def breakers(self) -> Breakers:
        return self._breakers

    def reload(
        self,
        *,
        agents: Mapping[str, AgentConfig] | None = None,
        providers: Mapping[str, Provider] | None = None,
        tools: ToolSource | None = None,
        streams: StreamsConfig | None = None,
    ) -> None:
        """Apply a reloaded configuration to runs (and handoffs) from now on."""
        if agents is not None:
            self._agents = agents
        if providers is not None:
            self._providers = providers
        if tools is not None:
            self._tools = tools
        if streams is not None:
            self._streams = streams

    async def run(
        self,
        out: StreamWriter,
        agent: str,
        messages: list[dict[str, Any]],
        *,
        tag: bool = False,
    ) -> AgentResult:
        """Run ``agent`` on ``messages`` into ``out``; see the module docstring."""
        current = self._resolve(agent)
        conversation = list(messages)
        usage = Usage(0, 0)  # summed over the turns; a turn without usage makes it unknown
        turns = 0

        emit: Emit = out.emit
        if tag:

            async def emit(kind: str, **fields: Any) -> None:
                fields["agent"] = current.name
                await out.emit(kind, **fields)

        while True:
            turns += 1
            turn = await read_turn(
                out,
                self._chain(current, conversation),
                breakers=self._breakers,
                metrics=self._metrics,
                agent=current.name if tag else None,
            )
            usage += turn.usage if turn.usage is not None else Usage()
            calls = turn.calls()
            if not calls:
                conversation.append({"role": "assistant", "content": turn.answer})
                return AgentResult(
                    agent=current.name,
                    text=turn.answer,
                    messages=conversation,
                    usage=usage,
                    finish_reason=turn.finish_reason or "stop",
                )
            if turns >= current.config.max_turns:
                raise MaxTurns(
                    f"agent {current.name!r} used {turns} turns without a final answer"
                    f" (max_turns is {current.config.max_turns})"
                )
            target = await self._run_calls(out, emit, current, turn, calls, turns, conversation)
            if target is not None:
                await emit("handoff", from_agent=current.name, to_agent=target)
                log.info("handoff", from_agent=current.name, to_agent=target)
                current = self._resolve(target)

    # --- internals ----------------------------------------------------------------------------

    def _resolve(self, name: str) -> _Agent:
        config = self._agents.get(name)
        if config is None:
            raise NotFound(f"no agent named {name!r}", field="agent")
        found = self._tools.tools_for(config.tools) if self._tools is not None else []
        tools = {t.spec.name: t for t in found}
        specs = [t.spec.to_openai() for t in tools.values()]
        specs += [handoff_spec(target).to_openai() for target in config.handoffs]
        return _Agent(name, config, tools, specs)

    def _chain(
        self, agent: _Agent, conversation: list[dict[str, Any]]
    ) -> list[tuple[Provider, ProviderRequest]]:
        """The agent's provider then its fallbacks, each with its request. The agent's ``model``
        names a model of its own provider; a fallback uses its provider's default model."""
        cfg = agent.config
        chain: list[tuple[Provider, ProviderRequest]] = []
        snapshot = list(conversation)  # the loop appends to its own list
        for i, name in enumerate([cfg.provider, *cfg.fallback]):
            provider = self._providers.get(name)
            if provider is None:
                log.warning("provider not available; skipped", provider=name, agent=agent.name)
                continue
            request = ProviderRequest(
                model=cfg.model if i == 0 and cfg.model else default_model(provider),
                messages=snapshot,
                instructions=cfg.instructions,
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                tools=agent.specs,
            )
            chain.append((provider, request))
        if not chain:
            raise Unavailable(f"agent {agent.name!r} has no available provider", field="agent")
        return chain

    async def _run_calls(
        self,
        out: StreamWriter,
        emit: Emit,
        agent: _Agent,
        turn: Turn,
        calls: list[ToolCall],
        turn_number: int,
        conversation: list[dict[str, Any]],
    ) -> str | None:
        """Emit, run and answer one turn's tool calls; the handoff target, if any."""
        ids = [call.id or f"call_{turn_number}_{call.index}" for call in calls]
        for call, tool_id in zip(calls, ids, strict=True):
            await emit(
                "tool_call",
                tool_id=tool_id,
                tool_name=call.name,
                arguments=call.event_arguments(),
            )
        conversation.append(
            {
                "role": "assistant",
                "content": turn.answer or None,
                "tool_calls": [
                    {
                        "id": tool_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.raw_arguments or "{}"},
                    }
                    for call, tool_id in zip(calls, ids, strict=True)
                ],
            }
        )
        results: dict[str, _Result] = {}
        target: str | None = None

        async def answer(tool_id: str, content: str, is_error: bool) -> None:
            results[tool_id] = _Result(tool_id, content, is_error)
            out.progress()  # the run moved on: the stream's idle timer starts again
            await emit("tool_result", tool_id=tool_id, result=content, is_error=is_error)

        timeout = agent.config.tool_timeout

        async def run_tool(tool: Tool, arguments: dict[str, Any], tool_id: str) -> None:
            with trio.move_on_after(timeout) as scope:
                content, is_error = await _invoke(tool, arguments, agent.name)
            if scope.cancelled_caught:
                content, is_error = f"tool timed out after {timeout:g} s", True
                log.info("tool timed out", tool=tool.spec.name, agent=agent.name, timeout=timeout)
            await answer(tool_id, content, is_error)

        async with trio.open_nursery() as nursery:
            for call, tool_id in zip(calls, ids, strict=True):
                handoff = self._handoff_target(call.name, agent.config)
                if handoff is not None:
                    if target is None:
                        target = handoff
                        await answer(tool_id, f"transferred to {handoff}", False)
                    else:
                        await answer(
                            tool_id, f"not transferred: already transferring to {target}", True
                        )
                    continue
                arguments = call.parsed_arguments()
                tool = agent.tools.get(call.name)
                if tool is None:
                    await answer(tool_id, f"unknown tool {call.name!r}", True)
                elif arguments is None:
                    await answer(tool_id, "the arguments are not a JSON object", True)
                else:
                    nursery.start_soon(run_tool, tool, arguments, tool_id)
        for tool_id in ids:
            result = results[tool_id]
            content = f"Error: {result.content}" if result.is_error else result.content
            conversation.append({"role": "tool", "tool_call_id": tool_id, "content": content})
        return target

    def _handoff_target(self, name: str, config: AgentConfig) -> str | None:
        """The agent a ``transfer_to_NAME`` call hands off to; None for any other call (one
        naming an agent that is not a handoff of this one is an unknown tool)."""
        if not name.startswith(HANDOFF_PREFIX):
            return None
        target = name[len(HANDOFF_PREFIX) :]
        return target if target in config.handoffs and target in self._agents else None


async def _invoke(tool: Tool, arguments: dict[str, Any], agent: str) -> tuple[str, bool]:
    """Call a tool: (result, is_error). A failure becomes a sentence the model reads."""
    name = tool.spec.name
    try:
        return await tool.call(arguments), False
    except ToolError as exc:
        return str(exc) or f"tool {name!r} failed", True
    except RaafdError as exc:
        return exc.message, True
    except Exception:
        # A tool's bug: logged with its traceback; the model reads a plain sentence.
        log.exception("tool crashed", tool=name, agent=agent)
        return f"tool {name!r} failed (internal error)", True
