"""The agent run loop: tool calls, handoffs, fallback and circuit breakers, sessions.

Most tests run the loop inside a real :class:`StreamManager` (so cancellation, timers and the
terminal event are the real ones); a few call :meth:`AgentLoop.run` directly with a writer that
keeps the events, to look at the returned :class:`AgentResult`. Everything runs on trio's
autojump clock: tool sleeps, timeouts and cooldowns are exact and instant.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from raafd.agents import AgentBodies, AgentLoop, AgentResult, Tool, ToolError, ToolSpec
from raafd.config import AgentConfig, BreakerConfig, ProviderConfig, StreamsConfig
from raafd.errors import Conflict, MaxTurns, NotFound
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.providers.base import (
    Delta,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ToolCallDelta,
    Usage,
)
from raafd.providers.breaker import Breakers
from raafd.providers.demo import DemoProvider
from raafd.streams import Body, StreamManager, StreamWriter

LIMIT = 1000  # clock seconds: the absolute timeout around every wait


# --- tools ------------------------------------------------------------------------------------


def spec(name: str) -> ToolSpec:
    return ToolSpec(name, f"the {name} tool", {"type": "object", "properties": {}})


class EchoTool:
    def __init__(self, name: str = "lookup") -> None:
        self.spec = spec(name)
        self.calls: list[dict[str, Any]] = []

    async def call(self, arguments: dict[str, Any]) -> str:
        await trio.lowlevel.checkpoint()
        self.calls.append(arguments)
        return f"{self.spec.name}: {orjson.dumps(arguments).decode()}"


class SleepTool:
    """Sleeps ``seconds`` (clock time), then answers; records when it started and ended."""

    def __init__(self, name: str, seconds: float) -> None:
        self.spec = spec(name)
        self.seconds = seconds
        self.started: list[float] = []
        self.ended: list[float] = []

    async def call(self, arguments: dict[str, Any]) -> str:
        self.started.append(trio.current_time())
        await trio.sleep(self.seconds)
        self.ended.append(trio.current_time())
        return f"{self.spec.name} slept {self.seconds:g} s"


class FailingTool:
    def __init__(self, name: str, error: Exception) -> None:
        self.spec = spec(name)
        self.error = error

    async def call(self, arguments: dict[str, Any]) -> str:
        await trio.lowlevel.checkpoint()
        raise self.error


class CancelRecordingTool:
    """Blocks until cancelled, and records that it was."""

    def __init__(self, name: str = "wait") -> None:
        self.spec = spec(name)
        self.started = trio.Event()
        self.cancelled_at: float | None = None

    async def call(self, arguments: dict[str, Any]) -> str:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            raise
        raise AssertionError("unreachable")  # pragma: no cover


class Registry:
    """The ``tools_for`` of a tool registry, over a fixed list."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = {t.spec.name: t for t in tools}

    def tools_for(self, names: Sequence[str]) -> list[Tool]:
        return [self.tools[n] for n in names if n in self.tools]


# --- providers --------------------------------------------------------------------------------

Turn = list[ProviderEvent | Exception]


def text(t: str) -> Delta:
    return Delta(text=t)


def call(name: str, args: str = "{}", id: str = "", index: int = 0) -> Delta:
    return Delta(tool_calls=(ToolCallDelta(index, id or f"id_{name}_{index}", name, args),))


def done(reason: str = "stop", usage: Usage | None = None) -> Delta:
    return Delta(usage=usage or Usage(1, 1), finish_reason=reason)


class Scripted:
    """Answers each request with the next turn of its script (the last one repeats) and keeps
    every request. An exception in a turn is raised where it stands."""

    def __init__(
        self, name: str, *turns: Turn, model: str = "", delay: float = 0.0, retries: int = 0
    ) -> None:
        self.name = name
        self.config = ProviderConfig(model=model, max_retries=retries, retry_base=0.1)
        self.turns = list(turns)
        self.delay = delay
        self.requests: list[ProviderRequest] = []

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        self.requests.append(request)
        turn = self.turns.pop(0) if len(self.turns) > 1 else self.turns[0]
        await trio.sleep(self.delay)
        for item in turn:
            if isinstance(item, Exception):
                raise item
            await send.send(item)


def down(message: str = "primary is down") -> ProviderError:
    return ProviderError(message, retryable=True, status=503, reason="server_error")


class Switchable:
    """Fails (before the first token) while ``down``; answers "ok" otherwise. Takes
    ``delay`` clock seconds either way, and counts its calls."""

    def __init__(self, name: str, delay: float = 1.0) -> None:
        self.name = name
        self.config = ProviderConfig(max_retries=0)
        self.down = True
        self.delay = delay
        self.calls = 0

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        self.calls += 1
        await trio.sleep(self.delay)
        if self.down:
            raise down(f"{self.name} is down")
        await send.send(text("ok"))
        await send.send(done())


def demo(name: str = "demo", **config: Any) -> DemoProvider:
    return DemoProvider(name, ProviderConfig(**{"tokens_per_second": 10, **config}))


# --- harness ----------------------------------------------------------------------------------


class MemorySessions:
    """A SessionStore in memory. ``append`` takes ``delay`` clock seconds (a durable write) and
    records whether the stream had already ended when the write was done."""

    def __init__(self, delay: float = 0.0) -> None:
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.delay = delay
        self.loads: list[str] = []
        self.ended_at_append: list[bool] = []
        self.manager: StreamManager | None = None

    async def load(self, session: str) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        self.loads.append(session)
        return list(self.data.get(session, []))

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        await trio.sleep(self.delay)
        self.data.setdefault(session, []).extend(messages)
        if self.manager is not None:
            running = [
                s
                for s in self.manager.list_streams()
                if s["session"] == session and s["status"] == "running"
            ]
            self.ended_at_append.append(not running)

    async def delete(self, session: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self.data.pop(session, None) is not None


class Harness:
    def __init__(self, manager: StreamManager, loop: AgentLoop, metrics: Metrics) -> None:
        self.manager = manager
        self.loop = loop
        self.metrics = metrics

    def metric(self, key: str) -> float:
        value = self.metrics.snapshot().get(key, 0.0)
        assert isinstance(value, float)
        return value

    def start(self, text: str, agent: str = "assistant", **kwargs: Any) -> str:
        stream = self.manager.start(
            agent=agent,
            messages=[{"role": "user", "content": text}],
            detach_grace=math.inf,
            **kwargs,
        )
        return stream.id

    async def events(self, stream_id: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        with trio.fail_after(LIMIT):
            async with self.manager.subscribe(stream_id, 0) as sub:
                async for batch in sub:
                    events.extend(batch)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal
        return events

    async def timed(self, stream_id: str) -> list[tuple[StreamEvent, float]]:
        events: list[tuple[StreamEvent, float]] = []
        with trio.fail_after(LIMIT):
            async with self.manager.subscribe(stream_id, 0) as sub:
                async for batch in sub:
                    events.extend((e, trio.current_time()) for e in batch)
        return events


StartHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
def harness(nursery: trio.Nursery) -> StartHarness:
    """``await harness(agents={...}, providers={...}, tools=[...], breaker=..., sessions=...)``:
    a running manager whose normal streams run an :class:`AgentLoop`. Default: one agent
    ``assistant`` on the demo provider, offered every tool given."""

    async def start(
        *,
        agents: dict[str, AgentConfig] | None = None,
        providers: dict[str, Provider] | None = None,
        tools: Sequence[Tool] = (),
        breaker: BreakerConfig | None = None,
        sessions: MemorySessions | None = None,
        **streams: Any,
    ) -> Harness:
        providers = {"demo": demo(), **(providers or {})}
        agents = agents or {
            "assistant": AgentConfig(provider="demo", tools=[t.spec.name for t in tools])
        }
        metrics = Metrics()
        config = StreamsConfig(**streams)
        loop = AgentLoop(
            agents,
            providers,
            Breakers(breaker or BreakerConfig()),
            Registry(tools),
            metrics,
            config,
        )
        bodies = AgentBodies(loop, sessions)
        manager = StreamManager(config, agents, providers, metrics, "assistant", bodies=bodies)
        if sessions is not None:
            sessions.manager = manager
        await nursery.start(manager.run)
        return Harness(manager, loop, metrics)

    return start


class ListWriter:
    """A :class:`StreamWriter` that keeps (kind, fields), for calling the loop directly."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.progressed = 0

    async def emit(self, kind: str, **fields: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.events.append((kind, fields))

    async def wait_ready(self) -> None:
        await trio.lowlevel.checkpoint()

    def progress(self) -> None:
        self.progressed += 1


def make_loop(
    agents: dict[str, AgentConfig],
    providers: dict[str, Provider],
    tools: Sequence[Tool] = (),
) -> AgentLoop:
    return AgentLoop(
        agents, providers, Breakers(BreakerConfig()), Registry(tools), Metrics(), StreamsConfig()
    )


def kinds(events: list[StreamEvent]) -> list[str]:
    return [e.kind for e in events]


def of_kind(events: list[StreamEvent], kind: str) -> list[dict[str, Any]]:
    return [e.fields for e in events if e.kind == kind]


# --- tool calls -------------------------------------------------------------------------------


async def test_tool_call_round_trip_with_the_demo_cue(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    lookup = EchoTool("lookup")
    h = await harness(tools=[lookup])
    events = await h.events(h.start('weather? [tool:lookup {"city": "Oslo"}]'))
    assert kinds(events)[:3] == ["start", "tool_call", "tool_result"]
    assert of_kind(events, "tool_call") == [
        {"tool_id": "call_demo_0_0", "tool_name": "lookup", "arguments": {"city": "Oslo"}}
    ]
    assert of_kind(events, "tool_result") == [
        {"tool_id": "call_demo_0_0", "result": 'lookup: {"city":"Oslo"}', "is_error": False}
    ]
    assert lookup.calls == [{"city": "Oslo"}]
    end = events[-1]
    assert end.kind == "complete"
    assert end.fields["final_response"] == 'The tool said: lookup: {"city":"Oslo"}'
    assert "".join(f["delta"] for f in of_kind(events, "content")) == end.fields["final_response"]
    assert end.fields["finish_reason"] == "stop"
    # Usage is summed over both turns: the demo counts 2 completion tokens for a call.
    assert end.fields["usage"]["completion_tokens"] == 2 + 3


async def test_run_returns_the_conversation_in_openai_shape(
    autojump_clock: trio.testing.MockClock,
) -> None:
    loop = make_loop(
        {"assistant": AgentConfig(provider="demo", tools=["lookup"])},
        {"demo": demo()},
        [EchoTool("lookup")],
    )
    out = ListWriter()
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes"}]
    user = {"role": "user", "content": '[tool:lookup {"q": 1}]'}
    with trio.fail_after(LIMIT):
        result = await loop.run(out, "assistant", [*history, user])
    assert isinstance(result, AgentResult)
    assert result.agent == "assistant"
    assert result.text == 'The tool said: lookup: {"q":1}'
    assert result.finish_reason == "stop"
    assert result.messages == [
        *history,
        user,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_demo_0_0",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_demo_0_0", "content": 'lookup: {"q":1}'},
        {"role": "assistant", "content": 'The tool said: lookup: {"q":1}'},
    ]
    assert out.progressed == 3  # the call's two fragments and its result count as progress
    assert all(kind != "complete" for kind, _ in out.events)  # never a terminal event


async def test_concurrent_tool_calls_really_run_concurrently(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    a, b = SleepTool("slow_a", 5), SleepTool("slow_b", 5)
    h = await harness(tools=[a, b])
    events = await h.timed(h.start("[tool:slow_a] [tool:slow_b]"))
    assert a.started == b.started == [0.0]
    assert a.ended == b.ended == [5.0]  # 5 s of clock for both, not 10
    results = [(e.fields["tool_id"], t) for e, t in events if e.kind == "tool_result"]
    assert [t for _, t in results] == [5.0, 5.0]
    assert {tool_id for tool_id, _ in results} == {"call_demo_0_0", "call_demo_0_1"}
    end = events[-1][0]
    assert end.kind == "complete"
    assert end.fields["final_response"] == "The tools said: slow_a slept 5 s; slow_b slept 5 s"


async def test_each_result_is_emitted_as_it_finishes(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    h = await harness(tools=[SleepTool("slow", 7), SleepTool("quick", 2)])
    events = await h.timed(h.start("[tool:slow] [tool:quick]"))
    results = [(e.fields["result"], t) for e, t in events if e.kind == "tool_result"]
    assert results == [("quick slept 2 s", 2.0), ("slow slept 7 s", 7.0)]
    # The conversation keeps the calls' order whatever order they finished in.
    assert events[-1][0].fields["final_response"] == (
        "The tools said: slow slept 7 s; quick slept 2 s"
    )


async def test_a_tool_result_restarts_the_idle_timer(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    # Call at 5 s, result at 13 s, next turn's first token at 18 s: within idle_timeout of the
    # result, though not of the call.
    h = await harness(
        providers={"demo": demo(first_token_delay=5, reply_words=1)},
        tools=[SleepTool("slow", 8)],
        idle_timeout=10,
    )
    events = await h.timed(h.start("[tool:slow]"))
    assert [(e.kind, t) for e, t in events][1:3] == [("tool_call", 5.0), ("tool_result", 13.0)]
    assert events[-1][0].kind == "complete"


async def test_tool_timeout_is_an_error_result_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    slow = SleepTool("slow", 100)
    agents = {"assistant": AgentConfig(provider="demo", tools=["slow"], tool_timeout=3)}
    h = await harness(agents=agents, tools=[slow])
    events = await h.timed(h.start("[tool:slow]"))
    (result,) = [(e.fields, t) for e, t in events if e.kind == "tool_result"]
    assert result == (
        {"tool_id": "call_demo_0_0", "result": "tool timed out after 3 s", "is_error": True},
        3.0,
    )
    assert slow.ended == []  # it was cancelled
    end = events[-1][0]
    assert end.kind == "complete"
    assert end.fields["final_response"] == "The tool said: Error: tool timed out after 3 s"


async def test_tool_errors_are_results_the_model_reads(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    tools: list[Tool] = [
        FailingTool("weather", ToolError("no such city")),
        FailingTool("buggy", RuntimeError("key=sk-secret-123")),
    ]
    h = await harness(tools=tools)
    events = await h.events(h.start("[tool:weather] [tool:buggy]"))
    assert sorted(
        (f["tool_id"], f["result"], f["is_error"]) for f in of_kind(events, "tool_result")
    ) == [
        ("call_demo_0_0", "no such city", True),
        ("call_demo_0_1", "tool 'buggy' failed (internal error)", True),
    ]
    assert events[-1].fields["final_response"] == (
        "The tools said: Error: no such city; Error: tool 'buggy' failed (internal error)"
    )
    assert b"sk-secret" not in b"".join(e.json for e in events)


async def test_unknown_tool_and_invalid_arguments(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    lookup = EchoTool("lookup")
    script = Scripted(
        "script",
        [
            call("nope", id="c0", index=0),
            call("lookup", "{bad json", id="c1", index=1),
            call("lookup", "[1, 2]", id="c2", index=2),
            call("transfer_to_elsewhere", id="c3", index=3),  # not a handoff of this agent
            done("tool_calls"),
        ],
        [text("fine"), done()],
    )
    agents = {"assistant": AgentConfig(provider="script", tools=["lookup"])}
    h = await harness(agents=agents, providers={"script": script}, tools=[lookup])
    events = await h.events(h.start("go"))
    assert [(f["tool_id"], f["arguments"]) for f in of_kind(events, "tool_call")] == [
        ("c0", {}),
        ("c1", {"_raw": "{bad json"}),
        ("c2", {"_raw": "[1, 2]"}),
        ("c3", {}),
    ]
    assert [(f["tool_id"], f["result"], f["is_error"]) for f in of_kind(events, "tool_result")] == [
        ("c0", "unknown tool 'nope'", True),
        ("c1", "the arguments are not a JSON object", True),
        ("c2", "the arguments are not a JSON object", True),
        ("c3", "unknown tool 'transfer_to_elsewhere'", True),
    ]
    assert lookup.calls == []
    assert events[-1].fields["final_response"] == "fine"
    # The model's own text goes back to it as it was, and it reads the errors.
    second = script.requests[1].messages
    assert second[1]["tool_calls"][1]["function"]["arguments"] == "{bad json"
    assert second[2:] == [
        {"role": "tool", "tool_call_id": "c0", "content": "Error: unknown tool 'nope'"},
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": "Error: the arguments are not a JSON object",
        },
        {
            "role": "tool",
            "tool_call_id": "c2",
            "content": "Error: the arguments are not a JSON object",
        },
        {
            "role": "tool",
            "tool_call_id": "c3",
            "content": "Error: unknown tool 'transfer_to_elsewhere'",
        },
    ]


async def test_request_offers_the_agents_tools_and_settings(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    script = Scripted("script", [text("hi"), done()], model="base-model")
    agents = {
        "assistant": AgentConfig(
            provider="script",
            model="agent-model",
            instructions="Be brief.",
            temperature=0.2,
            max_tokens=50,
            tools=["lookup"],
            handoffs=["other"],
        ),
        "other": AgentConfig(provider="script"),
    }
    h = await harness(agents=agents, providers={"script": script}, tools=[EchoTool("lookup")])
    await h.events(h.start("hello"))
    (request,) = script.requests
    assert request.model == "agent-model"
    assert request.instructions == "Be brief."
    assert (request.temperature, request.max_tokens) == (0.2, 50)
    assert request.messages == [{"role": "user", "content": "hello"}]
    assert [t["function"]["name"] for t in request.tools] == ["lookup", "transfer_to_other"]
    assert request.tools[0] == spec("lookup").to_openai()


# --- handoffs ---------------------------------------------------------------------------------


async def test_handoff_switches_agent_and_keeps_the_conversation(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    front = Scripted(
        "front", [text("Let me transfer you."), call("transfer_to_billing"), done("tool_calls")]
    )
    back = Scripted("back", [text("Your bill is 3 EUR."), done()], model="back-model")
    agents = {
        "triage": AgentConfig(
            provider="front", instructions="You triage.", handoffs=["billing"], tools=["lookup"]
        ),
        "billing": AgentConfig(provider="back", instructions="You do billing.", max_turns=3),
    }
    h = await harness(
        agents=agents, providers={"front": front, "back": back}, tools=[EchoTool("lookup")]
    )
    events = await h.events(h.start("my bill?", agent="triage"))
    assert kinds(events) == [
        "start",
        "content",
        "tool_call",
        "tool_result",
        "handoff",
        "content",
        "complete",
    ]
    assert events[0].fields == {"agent": "triage", "model": "front"}
    assert events[3].fields == {
        "tool_id": "id_transfer_to_billing_0",
        "result": "transferred to billing",
        "is_error": False,
    }
    assert events[4].fields == {"from_agent": "triage", "to_agent": "billing"}
    assert events[-1].fields["final_response"] == "Your bill is 3 EUR."
    # The second turn went to the target's provider, with its instructions, model and tools.
    (first,) = front.requests
    (second,) = back.requests
    assert first.instructions == "You triage."
    assert [t["function"]["name"] for t in first.tools] == ["lookup", "transfer_to_billing"]
    assert second.instructions == "You do billing."
    assert second.model == "back-model"
    assert second.tools == []
    assert second.messages == [
        {"role": "user", "content": "my bill?"},
        {
            "role": "assistant",
            "content": "Let me transfer you.",
            "tool_calls": [
                {
                    "id": "id_transfer_to_billing_0",
                    "type": "function",
                    "function": {"name": "transfer_to_billing", "arguments": "{}"},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "id_transfer_to_billing_0",
            "content": "transferred to billing",
        },
    ]


async def test_handoff_with_the_demo_cue_and_tagged_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agents = {
        "triage": AgentConfig(provider="demo", handoffs=["billing"]),
        "billing": AgentConfig(provider="demo", tools=["lookup"]),
    }
    loop = make_loop(agents, {"demo": demo(reply_words=1)}, [EchoTool("lookup")])
    out = ListWriter()
    with trio.fail_after(LIMIT):
        result = await loop.run(
            out,
            "triage",
            [{"role": "user", "content": "[handoff:billing] [tool:lookup] bill"}],
            tag=True,
        )
    assert [(kind, fields["agent"]) for kind, fields in out.events] == [
        ("tool_call", "triage"),
        ("tool_result", "triage"),
        ("handoff", "triage"),
        ("tool_call", "billing"),
        ("tool_result", "billing"),
        ("content", "billing"),
        ("content", "billing"),
        ("content", "billing"),
    ]
    assert out.events[2][1] == {"from_agent": "triage", "to_agent": "billing", "agent": "triage"}
    assert result.agent == "billing"
    assert result.text == "The tool said: lookup: {}"


async def test_untagged_events_carry_no_agent(autojump_clock: trio.testing.MockClock) -> None:
    loop = make_loop({"a": AgentConfig(provider="demo")}, {"demo": demo(reply_words=2)})
    out = ListWriter()
    with trio.fail_after(LIMIT):
        await loop.run(out, "a", [{"role": "user", "content": "hi"}])
    assert out.events and all("agent" not in fields for _, fields in out.events)


async def test_only_the_first_handoff_of_a_turn_is_taken(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    front = Scripted(
        "front",
        [
            call("transfer_to_b", id="x", index=0),
            call("transfer_to_c", id="y", index=1),
            done("tool_calls"),
        ],
    )
    back = Scripted("back", [text("b here"), done()])
    agents = {
        "a": AgentConfig(provider="front", handoffs=["b", "c"]),
        "b": AgentConfig(provider="back"),
        "c": AgentConfig(provider="front"),
    }
    h = await harness(agents=agents, providers={"front": front, "back": back})
    events = await h.events(h.start("hi", agent="a"))
    assert [(f["tool_id"], f["is_error"]) for f in of_kind(events, "tool_result")] == [
        ("x", False),
        ("y", True),
    ]
    assert of_kind(events, "handoff") == [{"from_agent": "a", "to_agent": "b"}]
    assert events[-1].fields["final_response"] == "b here"


# --- bounds and failures ----------------------------------------------------------------------


async def test_max_turns_ends_the_stream_with_max_turns(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    lookup = EchoTool("lookup")
    forever = Scripted("loop", [call("lookup"), done("tool_calls")])
    agents = {"assistant": AgentConfig(provider="loop", tools=["lookup"], max_turns=3)}
    h = await harness(agents=agents, providers={"loop": forever}, tools=[lookup])
    events = await h.events(h.start("go"))
    end = events[-1]
    assert end.kind == "error"
    assert end.fields["error"]["code"] == "max_turns"
    assert "3 turns" in end.fields["error"]["message"]
    assert len(forever.requests) == 3
    # The tools of turns 1 and 2 ran; the third turn's calls were neither announced nor run.
    assert len(lookup.calls) == 2
    assert kinds(events).count("tool_call") == kinds(events).count("tool_result") == 2


async def test_max_turns_raises_from_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    forever = Scripted("loop", [call("lookup"), done("tool_calls")])
    loop = make_loop(
        {"a": AgentConfig(provider="loop", tools=["lookup"], max_turns=1)},
        {"loop": forever},
        [EchoTool("lookup")],
    )
    with trio.fail_after(LIMIT), pytest.raises(MaxTurns, match="1 turns"):
        await loop.run(ListWriter(), "a", [{"role": "user", "content": "go"}])
    with pytest.raises(NotFound):
        await loop.run(ListWriter(), "nobody", [])


async def test_cancelling_the_stream_cancels_running_tools(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    wait = CancelRecordingTool()
    other = SleepTool("other", 1000)
    h = await harness(tools=[wait, other])
    stream_id = h.start("[tool:wait] [tool:other]")
    with trio.fail_after(LIMIT):
        await wait.started.wait()
        await trio.sleep(2)
        assert h.manager.cancel(stream_id, "client")
        await trio.testing.wait_all_tasks_blocked()
    assert wait.cancelled_at == 2.0  # at once
    assert other.ended == []
    events = await h.events(stream_id)
    assert kinds(events) == ["start", "tool_call", "tool_call", "cancelled"]


async def test_too_many_tool_calls_in_one_turn_fail_the_turn(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    flood = Scripted("flood", [*(call("lookup", index=i) for i in range(100)), done("tool_calls")])
    agents = {"assistant": AgentConfig(provider="flood", tools=["lookup"])}
    lookup = EchoTool("lookup")
    h = await harness(agents=agents, providers={"flood": flood}, tools=[lookup])
    events = await h.events(h.start("go"))
    assert events[-1].fields["error"]["code"] == "upstream_error"
    assert "more than 64 tool calls" in events[-1].fields["error"]["message"]
    assert lookup.calls == []


# --- fallback and circuit breakers ------------------------------------------------------------


async def test_fallback_before_the_first_token(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    primary = Scripted("primary", [down()], retries=1)
    backup = Scripted("backup", [text("from backup"), done()], model="backup-model")
    agents = {
        "assistant": AgentConfig(provider="primary", model="primary-model", fallback=["backup"])
    }
    h = await harness(agents=agents, providers={"primary": primary, "backup": backup})
    events = await h.events(h.start("hi"))
    assert kinds(events) == ["start", "retry", "retry", "content", "complete"]
    own_retry, fallback = of_kind(events, "retry")
    assert (own_retry["attempt"], own_retry["reason"]) == (1, "server_error")
    # Numbered across the chain; the next provider is tried at once.
    assert fallback == {"attempt": 2, "reason": "server_error", "retry_after": 0.0}
    assert events[-1].fields["final_response"] == "from backup"
    assert len(primary.requests) == 2
    assert [r.model for r in primary.requests] == ["primary-model"] * 2
    assert backup.requests[0].model == "backup-model"  # a fallback uses its own model
    assert h.metric("raafd_upstream_retries_total{provider=primary,reason=server_error}") == 2
    assert h.metric("raafd_upstream_errors_total{provider=primary,reason=server_error}") == 2
    assert h.loop.breakers.snapshot()["primary"]["failures"] == 1
    assert h.loop.breakers.snapshot()["backup"]["failures"] == 0


async def test_no_fallback_after_the_first_token(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    primary = Scripted("primary", [text("half an ans"), down("cut off")])
    backup = Scripted("backup", [text("never"), done()])
    agents = {"assistant": AgentConfig(provider="primary", fallback=["backup"])}
    h = await harness(agents=agents, providers={"primary": primary, "backup": backup})
    events = await h.events(h.start("hi"))
    assert kinds(events) == ["start", "content", "error"]
    assert events[-1].fields["error"] == {"code": "upstream_error", "message": "cut off"}
    assert backup.requests == []


async def test_every_provider_failing_names_them_all(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    primary = Scripted("primary", [down("primary is down")])
    backup = Scripted(
        "backup", [ProviderError("slow down", status=429, retry_after=7.0, reason="rate_limited")]
    )
    agents = {"assistant": AgentConfig(provider="primary", fallback=["backup"])}
    h = await harness(agents=agents, providers={"primary": primary, "backup": backup})
    events = await h.events(h.start("hi"))
    assert [f["reason"] for f in of_kind(events, "retry")] == ["server_error"]
    end = events[-1]
    assert end.fields == {
        "error": {
            "code": "upstream_error",
            "message": "every provider failed (primary: primary is down; backup: slow down)",
        },
        "retry_after": 7.0,
    }


async def test_breaker_opens_skips_then_trials_after_the_cooldown(
    autojump_clock: trio.testing.MockClock, harness: StartHarness, nursery: trio.Nursery
) -> None:
    primary = Switchable("primary", delay=1.0)
    backup = Scripted("backup", [text("backup"), done()])
    agents = {"assistant": AgentConfig(provider="primary", fallback=["backup"])}
    h = await harness(
        agents=agents,
        providers={"primary": primary, "backup": backup},
        breaker=BreakerConfig(failure_threshold=2, cooldown=30),
    )

    def state() -> dict[str, Any]:
        return h.loop.breakers.snapshot()["primary"]

    # Two failures (each falls back to the backup) open the circuit.
    for n in (1, 2):
        events = await h.events(h.start("hi"))
        assert events[-1].fields["final_response"] == "backup"
        assert [f["reason"] for f in of_kind(events, "retry")] == ["server_error"]
        assert primary.calls == n
    opened_at = trio.current_time()
    assert state() == {"state": "open", "failures": 2, "opened_at": opened_at, "retry_in": 30.0}

    # Open: the primary is skipped without a call, with a retry event saying why.
    await trio.sleep(10)
    events = await h.events(h.start("hi"))
    assert of_kind(events, "retry") == [
        {"attempt": 1, "reason": "circuit_open", "retry_after": 0.0}
    ]
    assert events[-1].fields["final_response"] == "backup"
    assert primary.calls == 2
    assert h.metric("raafd_upstream_retries_total{provider=primary,reason=circuit_open}") == 1

    # After the cooldown: half-open. One trial reaches the primary; a stream started while it
    # is in flight sees the circuit open. The trial fails: open again, fresh cooldown.
    await trio.sleep_until(opened_at + 30)
    assert state()["state"] == "half_open"
    trial = h.start("hi")
    await trio.sleep(0.5)
    other = await h.events(h.start("hi"))
    assert [f["reason"] for f in of_kind(other, "retry")] == ["circuit_open"]
    trial_events = await h.events(trial)
    assert [f["reason"] for f in of_kind(trial_events, "retry")] == ["server_error"]
    assert primary.calls == 3
    reopened = opened_at + 31
    assert trio.current_time() == pytest.approx(reopened)
    assert state()["state"] == "open" and state()["opened_at"] == pytest.approx(reopened)

    # Still open within the fresh cooldown; after it, a good trial closes the circuit.
    await trio.sleep_until(reopened + 29)
    events = await h.events(h.start("hi"))
    assert [f["reason"] for f in of_kind(events, "retry")] == ["circuit_open"]
    await trio.sleep_until(reopened + 30)
    primary.down = False
    events = await h.events(h.start("hi"))
    assert events[-1].fields["final_response"] == "ok"
    assert of_kind(events, "retry") == []
    assert state() == {"state": "closed", "failures": 0, "opened_at": None, "retry_in": 0.0}


async def test_a_cancelled_trial_frees_the_half_open_slot(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    primary = Switchable("primary", delay=5.0)
    backup = Scripted("backup", [text("backup"), done()])
    agents = {"assistant": AgentConfig(provider="primary", fallback=["backup"])}
    h = await harness(
        agents=agents,
        providers={"primary": primary, "backup": backup},
        breaker=BreakerConfig(failure_threshold=1, cooldown=10),
    )
    await h.events(h.start("hi"))  # fails at 5 s: open
    await trio.sleep(10)
    trial = h.start("hi")
    await trio.sleep(1)
    h.manager.cancel(trial)
    await trio.testing.wait_all_tasks_blocked()
    assert h.loop.breakers.snapshot()["primary"]["state"] == "half_open"
    primary.down = False
    events = await h.events(h.start("hi"))  # the next call is the trial
    assert events[-1].fields["final_response"] == "ok"
    assert h.loop.breakers.snapshot()["primary"]["state"] == "closed"


async def test_a_single_provider_with_an_open_circuit(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    primary = Switchable("primary", delay=0)
    agents = {"assistant": AgentConfig(provider="primary")}
    h = await harness(
        agents=agents,
        providers={"primary": primary},
        breaker=BreakerConfig(failure_threshold=1, cooldown=20),
    )
    first = await h.events(h.start("hi"))
    assert first[-1].fields["error"] == {"code": "upstream_error", "message": "primary is down"}
    await trio.sleep(5)
    events = await h.events(h.start("hi"))
    assert kinds(events) == ["start", "error"]  # nothing to fall back to: no retry event
    assert events[-1].fields == {
        "error": {
            "code": "upstream_error",
            "message": "provider 'primary' is unavailable (circuit open)",
        },
        "retry_after": 15.0,
    }
    assert primary.calls == 1


# --- the manager: sessions and bodies ---------------------------------------------------------


async def test_session_history_is_loaded_and_the_run_appended_before_complete(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    store = MemorySessions(delay=2.0)
    script = Scripted(
        "script",
        [call("lookup", '{"n": 1}', id="t1"), done("tool_calls")],
        [text("first answer"), done()],
        [text("second answer"), done()],
    )
    agents = {"assistant": AgentConfig(provider="script", tools=["lookup"])}
    h = await harness(
        agents=agents, providers={"script": script}, tools=[EchoTool("lookup")], sessions=store
    )
    events = await h.timed(h.start("one", session="s1"))
    end, ended = events[-1]
    assert end.kind == "complete" and end.fields["final_response"] == "first answer"
    assert ended == 2.0  # after the durable write, not before
    assert store.ended_at_append == [False]
    assert store.data["s1"] == [
        {"role": "user", "content": "one"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"n": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": 'lookup: {"n":1}'},
        {"role": "assistant", "content": "first answer"},
    ]

    events = await h.events(h.start("two", session="s1"))
    assert events[-1].fields["final_response"] == "second answer"
    assert script.requests[-1].messages == [
        *store.data["s1"][:4],
        {"role": "user", "content": "two"},
    ]
    assert store.data["s1"][4:] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second answer"},
    ]
    assert store.loads == ["s1", "s1"]
    assert store.ended_at_append == [False, False]


async def test_a_failed_run_saves_nothing_and_a_session_runs_one_stream_at_a_time(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    store = MemorySessions()
    h = await harness(sessions=store)
    events = await h.events(h.start("[fail]", session="s1"))
    assert events[-1].kind == "error"
    assert store.data == {}

    running = h.start("hello", session="s1")
    with pytest.raises(Conflict) as busy:
        h.start("again", session="s1")
    assert busy.value.field == "session"
    h.start("elsewhere", session="s2")  # another session is fine
    h.start("no session")
    await h.events(running)
    await h.events(h.start("again", session="s1"))  # free once the stream has ended
    assert [m["content"] for m in store.data["s1"] if m["role"] == "user"] == ["hello", "again"]


async def test_without_a_store_sessions_are_labels(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    h = await harness()
    first = h.start("hello", session="s1")
    second = h.start("hello", session="s1")  # no store: nothing to keep consistent
    for stream_id in (first, second):
        assert (await h.events(stream_id))[-1].kind == "complete"


async def test_start_with_a_body_of_its_own(
    autojump_clock: trio.testing.MockClock, harness: StartHarness
) -> None:
    h = await harness()

    async def body(out: StreamWriter) -> None:
        await out.emit("content", delta="from a workflow")
        await out.emit("handoff", from_agent="a", to_agent="b")
        await out.emit(
            "complete",
            final_response="done",
            usage={"prompt_tokens": 0, "completion_tokens": 0},
            finish_reason="stop",
        )

    stream = h.manager.start(agent="research-flow", body=body, model="mixed")
    events = await h.events(stream.id)
    assert [(e.kind, e.fields) for e in events][:3] == [
        ("start", {"agent": "research-flow", "model": "mixed"}),
        ("content", {"delta": "from a workflow"}),
        ("handoff", {"from_agent": "a", "to_agent": "b"}),
    ]
    labelled = h.manager.start(agent=None, body=body)  # the default agent's label and model
    assert (await h.events(labelled.id))[0].fields == {"agent": "assistant", "model": "demo"}


class RecordingBodies:
    """A body factory that records what the manager asks of it; its bodies complete at once."""

    def __init__(self, keeps_sessions: bool) -> None:
        self.keeps_sessions = keeps_sessions
        self.calls: list[tuple[str, list[dict[str, Any]], str | None]] = []

    def __call__(self, agent: str, messages: list[dict[str, Any]], session: str | None) -> Body:
        self.calls.append((agent, messages, session))

        async def body(out: StreamWriter) -> None:
            await out.emit("complete", final_response="", usage={}, finish_reason="stop")

        return body


@pytest.mark.parametrize("keeps_sessions", [True, False])
async def test_the_manager_runs_what_its_body_factory_builds(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, keeps_sessions: bool
) -> None:
    bodies = RecordingBodies(keeps_sessions)
    agents = {"assistant": AgentConfig(), "other": AgentConfig()}
    providers: dict[str, Provider] = {"demo": demo()}
    manager = StreamManager(
        StreamsConfig(), agents, providers, Metrics(), "assistant", bodies=bodies
    )
    await nursery.start(manager.run)
    first = manager.start(agent=None, messages=[{"role": "user", "content": "hi"}], session="s")
    if keeps_sessions:
        with pytest.raises(Conflict):  # one stream per kept session at a time
            manager.start(agent="other", messages=[], session="s")
    second = manager.start(agent="other", messages=[], session="t")
    for stream in (first, second):
        with trio.fail_after(LIMIT):
            await stream.wait()
        assert stream.status == "complete"
    sessions = ["s", "t"] if keeps_sessions else [None, None]  # None: not kept, only a label
    assert bodies.calls == [
        ("assistant", [{"role": "user", "content": "hi"}], sessions[0]),
        ("other", [], sessions[1]),
    ]
