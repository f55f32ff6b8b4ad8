"""Multi-agent workflows: several agents, one stream.

A workflow is a stream whose body runs several agents through the
:class:`~raafd.agents.base.AgentRunner` (``tag=True``: every event carries ``agent``, the agent
that produced it) and then writes the one terminal event itself: ``complete`` with the last
answer as ``final_response`` and the usage summed over every agent, or ``error`` with the code
of the first agent that failed (the others are cancelled).

- ``sequential``: a pipeline. The first agent gets ``[user: input]``; each next one gets
  ``[user: <the previous agent's answer>]`` and nothing else. Each agent is a stage with its
  own instructions (draft → critique → rewrite); handing it the whole earlier conversation
  would show it the other agents' answers as ``assistant`` turns, as if it had said them
  itself. The last answer is the final response.
- ``parallel``: the agents run *concurrently* (one nursery, one ``run`` each, all writing to
  the same stream), each on ``[user: input]``; their events interleave as they happen. Then
  the ``synthesizer`` runs on one user message holding the input and every answer
  (:func:`synthesis_prompt`); its answer is the final response.
- a ``synthesizer`` given to a sequential workflow runs the same way over every stage's answer.

The stream's ``start`` event names the first agent (sequential) or the synthesizer (parallel).
Bounds: at most :data:`~raafd.protocol.commands.MAX_WORKFLOW_AGENTS` agents (checked when the
command is parsed); every agent run is bounded by its own ``max_turns``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio
from attrs import frozen

from raafd.agents.base import AgentResult, AgentRunner
from raafd.agents.bodies import AgentBodies, emit_failure
from raafd.errors import NotFound, RaafdError
from raafd.logging import get_logger
from raafd.protocol.commands import WorkflowStart
from raafd.providers.base import Usage

if TYPE_CHECKING:
    from raafd.streams.body import Body, StreamWriter
    from raafd.streams.manager import StreamManager
    from raafd.streams.stream import Stream

__all__ = [
    "Workflow",
    "check_agents",
    "run_workflow",
    "start_workflow",
    "synthesis_prompt",
    "workflow_body",
]

log = get_logger("raafd.workflows")


@frozen
class Workflow:
    """A validated workflow: every agent exists."""

    mode: str  # sequential | parallel
    agents: tuple[str, ...]
    input: str
    synthesizer: str | None = None

    @property
    def label(self) -> str:
        """The agent the stream's ``start`` event names."""
        if self.mode == "parallel" and self.synthesizer is not None:
            return self.synthesizer
        return self.agents[0]


def check_agents(cmd: WorkflowStart, agents: Mapping[str, Any]) -> Workflow:
    """The command as a :class:`Workflow`; ``NotFound`` naming ``agents.N`` or
    ``synthesizer`` when an agent is not configured."""
    for i, name in enumerate(cmd.agents):
        if name not in agents:
            raise NotFound(f"no agent named {name!r}", field=f"agents.{i}")
    if cmd.synthesizer is not None and cmd.synthesizer not in agents:
        raise NotFound(f"no agent named {cmd.synthesizer!r}", field="synthesizer")
    return Workflow(cmd.mode, tuple(cmd.agents), cmd.input, cmd.synthesizer)


def synthesis_prompt(request: str, answers: list[tuple[str, str]]) -> str:
    """The synthesizer's one user message: the request, then each agent's answer."""
    parts = [
        "Several agents answered the request below. Combine their answers into one answer.",
        f"Request:\n{request}",
    ]
    parts += [f"Answer from {agent}:\n{text}" for agent, text in answers]
    return "\n\n".join(parts)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def run_workflow(out: StreamWriter, runner: AgentRunner, workflow: Workflow) -> None:
    """A stream body: run ``workflow`` into ``out`` and end the stream (see the module
    docstring). ``Cancelled`` propagates; a failure that is not a ``RaafdError`` propagates too
    (the stream logs it and ends with ``error`` {internal})."""
    results: list[AgentResult] = []
    failure: RaafdError | None = None
    try:
        if workflow.mode == "parallel":
            await _parallel(out, runner, workflow, results)
        else:
            await _sequential(out, runner, workflow, results)
        if workflow.synthesizer is not None:
            prompt = synthesis_prompt(workflow.input, [(r.agent, r.text) for r in results])
            results.append(await runner.run(out, workflow.synthesizer, _user(prompt), tag=True))
    except* RaafdError as group:
        failure = _first(group)
    if failure is not None:
        log.info("workflow failed", code=failure.code, reason=failure.message)
        await emit_failure(out, failure)
        return
    last = results[-1]
    await out.emit(
        "complete",
        final_response=last.text,
        usage={  # a count an agent's upstream did not give is unknown (None) in the sum too
            "prompt_tokens": sum((r.usage for r in results), Usage(0, 0)).prompt_tokens,
            "completion_tokens": sum((r.usage for r in results), Usage(0, 0)).completion_tokens,
        },
        finish_reason=last.finish_reason,
    )


async def _sequential(
    out: StreamWriter, runner: AgentRunner, workflow: Workflow, results: list[AgentResult]
) -> None:
    text = workflow.input
    for agent in workflow.agents:
        result = await runner.run(out, agent, _user(text), tag=True)
        results.append(result)
        text = result.text


async def _parallel(
    out: StreamWriter, runner: AgentRunner, workflow: Workflow, results: list[AgentResult]
) -> None:
    answers: list[AgentResult | None] = [None] * len(workflow.agents)

    async def one(i: int, agent: str) -> None:
        answers[i] = await runner.run(out, agent, _user(workflow.input), tag=True)

    # One failure cancels the others (the nursery's rule); the caller reports the first.
    async with trio.open_nursery() as nursery:
        for i, agent in enumerate(workflow.agents):
            nursery.start_soon(one, i, agent)
    results.extend(a for a in answers if a is not None)  # in the order the agents were listed


def _first(group: BaseExceptionGroup[RaafdError]) -> RaafdError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, RaafdError)
    return exc


def workflow_body(runner: AgentRunner, workflow: Workflow) -> Body:
    """:func:`run_workflow` as a stream body."""

    async def body(out: StreamWriter) -> None:
        await run_workflow(out, runner, workflow)

    return body


def start_workflow(
    manager: StreamManager,
    cmd: WorkflowStart,
    agents: Mapping[str, Any],
    *,
    owner: str,
    principal: str = "",
    detach_grace: float | None = None,
) -> Stream:
    """Check ``cmd`` against the configured ``agents`` and start its stream (what
    ``POST /v1/workflows`` and ``workflow.start`` both do; a background job passes its own
    ``detach_grace``). Raises what :meth:`StreamManager.start` raises, and ``NotFound`` for an
    unknown agent."""
    workflow = check_agents(cmd, agents)
    bodies = manager.bodies
    if not isinstance(bodies, AgentBodies):  # wired wrong: the daemon gives AgentBodies
        raise TypeError(f"workflows need a stream manager built with AgentBodies, not {bodies!r}")
    return manager.start(
        agent=workflow.label,
        messages=_user(workflow.input),
        stream_id=cmd.stream,
        owner=owner,
        principal=principal,
        detach_grace=detach_grace,
        body=workflow_body(bodies.runner, workflow),
    )
