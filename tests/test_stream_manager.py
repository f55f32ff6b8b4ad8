"""The stream engine end to end: StreamManager, Stream, Subscription and the provider runner.

Everything runs on trio's autojump clock: timeouts, graces and token pacing are exact and
instant. Every wait has an absolute ``fail_after`` (in clock time, which autojump reaches at
once when the test would otherwise hang).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from raafd.agents.base import Tool, ToolSpec
from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop
from raafd.config import AgentConfig, BreakerConfig, ProviderConfig, StreamsConfig
from raafd.errors import BadRequest, Conflict, Gone, NotFound, TooManyStreams, Unavailable
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.providers.base import (
    Delta,
    Provider,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    ToolCallDelta,
    Usage,
)
from raafd.providers.breaker import Breakers
from raafd.providers.demo import DemoProvider
from raafd.providers.openai import OpenAIProvider
from raafd.providers.upstream import open_upstream_client
from raafd.streams import SlowConsumer, Stream, StreamManager, new_stream_id
from raafd.timers import Timers
from tests.fakes import FakeOpenAI, Script
from tests.waiting import let_loopback_land, wait_until

LIMIT = 1000  # clock seconds: the absolute timeout around every wait


# --- test providers ---------------------------------------------------------------------------


class HangingProvider:
    """Never sends; records when its request was closed (its scope cancelled)."""

    config = ProviderConfig(max_retries=0)  # retries are tested with the real providers

    def __init__(self, name: str = "hang") -> None:
        self.name = name
        self.started = trio.Event()
        self.closed_at: float | None = None

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        self.started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.closed_at = trio.current_time()


class TickProvider:
    """Sends ``n`` words, one every ``interval`` seconds (0: as fast as the channel takes them),
    counting what the channel accepted; then ``finish`` or hangs (``hang_after``)."""

    config = ProviderConfig(max_retries=0)  # retries are tested with the real providers

    def __init__(
        self, name: str = "tick", *, n: int = 20, interval: float = 0.1, hang_after: bool = False
    ) -> None:
        self.name = name
        self.n = n
        self.interval = interval
        self.hang_after = hang_after
        self.sent = 0
        self.closed_at: float | None = None

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        try:
            for i in range(self.n):
                await send.send(Delta(text=f"w{i} "))
                self.sent += 1
                if self.interval:
                    await trio.sleep(self.interval)
            if self.hang_after:
                await trio.sleep_forever()
            await send.send(Delta(usage=Usage(1, self.n), finish_reason="stop"))
        finally:
            self.closed_at = trio.current_time()


class ScriptProvider:
    """Sends the given items at once, then raises ``fail`` if given. Later requests (the agent
    loop's next turns, after tool calls) get ``then`` when given."""

    config = ProviderConfig(max_retries=0)  # retries are tested with the real providers

    def __init__(
        self,
        name: str,
        items: list[ProviderEvent],
        fail: Exception | None = None,
        then: list[ProviderEvent] | None = None,
    ) -> None:
        self.name = name
        self.items = items
        self.fail = fail
        self.then = then
        self.calls = 0

    async def stream(
        self, request: ProviderRequest, send: trio.MemorySendChannel[ProviderEvent]
    ) -> None:
        self.calls += 1
        if self.calls > 1 and self.then is not None:
            for item in self.then:
                await send.send(item)
            return
        for item in self.items:
            await send.send(item)
        if self.fail is not None:
            raise self.fail


class EchoTool:
    """A tool that answers with its arguments."""

    def __init__(self, name: str) -> None:
        self.spec = ToolSpec(name, f"echo for {name}", {"type": "object"})

    async def call(self, arguments: dict[str, Any]) -> str:
        await trio.lowlevel.checkpoint()
        return f"{self.spec.name} got {sorted(arguments)}"


class Tools:
    """The ``tools_for`` of a tool registry, over a fixed list."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = {t.spec.name: t for t in tools}

    def tools_for(self, names: Any) -> list[Tool]:
        return [self.tools[n] for n in names if n in self.tools]


# --- helpers ----------------------------------------------------------------------------------

StartManager = Callable[..., Awaitable[StreamManager]]


def agent_bodies(
    agents: dict[str, AgentConfig],
    providers: dict[str, Provider],
    metrics: Metrics,
    config: StreamsConfig,
    tools: list[Tool] | None = None,
) -> AgentBodies:
    """What the daemon gives a manager: the agent loop (default breakers, ``tools`` offered)
    as the body of normal streams, sessions not kept."""
    loop = AgentLoop(
        agents, providers, Breakers(BreakerConfig()), Tools(tools or []), metrics, config
    )
    return AgentBodies(loop)


@pytest.fixture
def start_manager(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> StartManager:
    """``await start_manager(providers={...}, tps=10, words=20, **streams_config)``: a running
    manager in the test's nursery. Agent ``assistant`` runs the demo provider; every extra
    provider gets an agent of its own name; ``tools`` are offered to every agent. (Tests
    take ``autojump_clock`` themselves too: pytest-trio hands ``trio.run`` the clock only from
    the test's own arguments.)"""

    async def start(
        *,
        providers: dict[str, Provider] | None = None,
        tps: float = 10.0,
        words: int = 20,
        first_token_delay: float = 0.0,
        tools: list[Tool] | None = None,
        **streams: Any,
    ) -> StreamManager:
        demo = DemoProvider(
            "demo",
            ProviderConfig(
                tokens_per_second=tps, reply_words=words, first_token_delay=first_token_delay
            ),
        )
        all_providers: dict[str, Provider] = {"demo": demo, **(providers or {})}
        names = [t.spec.name for t in tools or []]
        agents = {"assistant": AgentConfig(provider="demo", tools=names)}
        agents.update({name: AgentConfig(provider=name, tools=names) for name in providers or {}})
        config, metrics = StreamsConfig(**streams), Metrics()
        bodies = agent_bodies(agents, all_providers, metrics, config, tools)
        manager = StreamManager(config, agents, all_providers, metrics, "assistant", bodies=bodies)
        await nursery.start(manager.run)
        return manager

    return start


def user(text: str = "hello there") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def read_all(manager: StreamManager, stream_id: str, after: int = 0) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    with trio.fail_after(LIMIT):
        async with manager.subscribe(stream_id, after) as sub:
            async for batch in sub:
                assert batch
                events.extend(batch)
    return events


def assert_whole(events: list[StreamEvent], first: int = 1) -> StreamEvent:
    """Seqs run from ``first`` with no gap and exactly one terminal event, the last."""
    assert [e.seq for e in events] == list(range(first, first + len(events)))
    assert [e.terminal for e in events].count(True) == 1
    assert events[-1].terminal
    return events[-1]


def assert_lossless(events: list[StreamEvent], full: list[StreamEvent], after: int) -> None:
    """A possibly coalesced delivery of ``full`` after seq ``after``: the same events, except
    that runs of ``content`` may be merged into one carrying the last seq it covers."""
    rest = [e for e in full if e.seq > after]
    assert events[-1].terminal and events[-1].seq == rest[-1].seq
    assert [(e.seq, e.kind) for e in events if e.kind != "content"] == [
        (e.seq, e.kind) for e in rest if e.kind != "content"
    ]
    text = ""
    for event in events:
        if event.kind == "content":
            text += event.fields["delta"]
            assert text == "".join(
                e.fields["delta"] for e in rest if e.kind == "content" and e.seq <= event.seq
            )
    assert text == "".join(e.fields["delta"] for e in rest if e.kind == "content")


def metric(manager: StreamManager, key: str) -> float:
    value = manager._metrics.snapshot().get(key, 0.0)
    assert isinstance(value, float)
    return value


# --- a whole stream ---------------------------------------------------------------------------


def test_stream_ids_are_distinct_across_refills_and_in_a_forked_child() -> None:
    # 1,000 ids take 12,000 bytes: the 4 KiB pool is refilled twice.
    ids = [new_stream_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"st_[0-9a-f]{24}", i) for i in ids)
    # A child forked mid-pool must not hand out the parent's next bytes.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_stream_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"st_[0-9a-f]{24}", child)
    assert child != new_stream_id()


async def test_demo_stream_is_contiguous_and_ends_once(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=5)
    stream = manager.start(agent=None, messages=user("hello there"), owner="c1")
    assert stream.id.startswith("st_") and stream.status == "running"
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert events[0].kind == "start"
    assert events[0].fields == {"agent": "assistant", "model": "demo"}
    contents = [e.fields["delta"] for e in events if e.kind == "content"]
    assert len(contents) == 7
    assert end.kind == "complete"
    assert end.fields["final_response"] == "".join(contents)
    assert end.fields["final_response"].startswith("hello there streams")
    assert end.fields["usage"] == {"prompt_tokens": 2, "completion_tokens": 7}
    assert end.fields["finish_reason"] == "stop"
    assert stream.info()["status"] == "complete" and stream.finished
    assert metric(manager, "raafd_streams_started_total") == 1
    assert metric(manager, "raafd_streams_ended_total{kind=complete}") == 1
    assert metric(manager, "raafd_stream_events_total{event=content}") == 7
    assert metric(manager, "raafd_time_to_first_token_seconds_count") == 1
    assert metric(manager, "raafd_inter_token_gap_seconds_count") == 6


async def test_attach_at_any_seq_while_live_gets_exactly_the_rest(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    manager = await start_manager(words=60, tps=10, detach_grace=math.inf)
    stream = manager.start(agent=None, messages=user())
    rng = random.Random(7)
    results: list[tuple[int, list[StreamEvent]]] = []

    async def attach_later(delay: float) -> None:
        await trio.sleep(delay)
        after = rng.randint(0, stream.head)
        results.append((after, await read_all(manager, stream.id, after)))

    async with trio.open_nursery() as attachers:
        for i in range(40):
            # Exactly on a token's tick, just after it, and in between.
            delay = round(i * 0.15, 2) + rng.choice([0.0, 0.0001, 0.05])
            attachers.start_soon(attach_later, delay)
        attachers.start_soon(attach_later, 0.0)

    full = await read_all(manager, stream.id)
    assert_whole(full)
    assert len(results) == 41
    seen_afters = set()
    for after, events in results:
        seen_afters.add(after)
        assert [(e.seq, e.kind, e.fields) for e in events] == [
            (e.seq, e.kind, e.fields) for e in full[after:]
        ]
        assert_whole(events, after + 1)
    assert len(seen_afters) > 20


async def test_gone_names_the_oldest_seq_still_held(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=30, tps=100, log_max_events=10)
    stream = manager.start(agent=None, messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await stream.wait()
    head = stream.head
    assert head == 34  # start + 2 + 30 words + complete
    with pytest.raises(Gone, match=f"oldest available is seq {head - 9}"):
        manager.subscribe(stream.id, 0)
    rest = await read_all(manager, stream.id, head - 10)
    assert_whole(rest, head - 9)
    with pytest.raises(BadRequest):
        manager.subscribe(stream.id, head + 1)
    with pytest.raises(NotFound):
        manager.subscribe("st_nope", 0)


# --- backpressure -----------------------------------------------------------------------------


async def test_single_slow_subscriber_slows_the_provider_without_loss(
    autojump_clock: trio.testing.MockClock,
    start_manager: StartManager,
) -> None:
    flood = TickProvider("flood", n=200, interval=0)
    manager = await start_manager(
        providers={"flood": flood}, subscriber_buffer=8, idle_timeout=1000
    )
    stream = manager.start(agent="flood", messages=user())
    events: list[StreamEvent] = []
    with trio.fail_after(LIMIT):
        async with manager.subscribe(stream.id, 0) as sub:
            async for batch in sub:
                assert len(batch) <= 8
                events.extend(batch)
                # The producer, and with it the provider's reads, stopped at the subscriber's
                # buffer: the provider is blocked in its one send.
                assert stream.head - sub.cursor <= 8
                assert flood.sent <= sub.cursor + 8 + 1
                await trio.sleep(1)
    end = assert_whole(events)
    assert end.kind == "complete"
    assert [e.fields["delta"] for e in events if e.kind == "content"] == [
        f"w{i} " for i in range(200)
    ]
    assert trio.current_time() >= 200 / 8  # slowed to the reader's pace


async def test_a_flooding_openai_upstream_is_read_at_the_slow_subscribers_pace_without_loss(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    # A real socket and the OpenAI provider: its tokens reach the stream from the stream's own
    # task, whose send waits once the subscriber falls behind; in order, none lost, and the
    # producer never more than subscriber_buffer ahead. A pause in the middle stops appends.
    # The deltas of one read are one event, and a read is at most 64 KiB: 10,000 deltas (over
    # 1 MB) are more than subscriber_buffer events, so the stream is still running at the pause.
    let_loopback_land(autojump_clock)
    script = Script(deltas=10_000, interval=0)
    fake = FakeOpenAI(script)
    await nursery.start(fake.run)
    async with open_upstream_client(trust_env=False) as upstream:
        config = ProviderConfig(type="openai", base_url=fake.base_url, model="m")
        flood = OpenAIProvider("flood", config, upstream, {})
        manager = await start_manager(
            providers={"flood": flood}, subscriber_buffer=8, idle_timeout=1000
        )
        stream = manager.start(agent="flood", messages=user())
        events: list[StreamEvent] = []
        with trio.fail_after(LIMIT):
            async with manager.subscribe(stream.id, 0) as sub:
                async for batch in sub:
                    events.extend(batch)
                    assert stream.head - sub.cursor <= 8
                    if any(e.kind == "content" for e in events) and not any(
                        e.kind == "paused" for e in events
                    ):
                        assert manager.pause(stream.id)
                        head = stream.head  # the paused event's seq
                        await trio.sleep(5)
                        assert stream.head == head  # nothing appended while paused
                        assert manager.resume(stream.id)
                    await trio.sleep(0.1)
    end = assert_whole(events)
    assert end.kind == "complete"
    text = "".join(e.fields["delta"] for e in events if e.kind == "content")
    assert text == script.text  # all of it, in order
    assert [e.kind for e in events].count("paused") == 1


async def test_tokens_queued_behind_a_slow_subscriber_go_out_before_the_upstreams_error(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    # The error line arrives in the same read as tokens the stream could not take yet: they
    # are emitted first, then the error.
    let_loopback_land(autojump_clock)
    fake = FakeOpenAI(Script(deltas=60, interval=0, error_after=40))
    await nursery.start(fake.run)
    async with open_upstream_client(trust_env=False) as upstream:
        config = ProviderConfig(type="openai", base_url=fake.base_url, model="m", max_retries=0)
        provider = OpenAIProvider("up", config, upstream, {})
        manager = await start_manager(providers={"up": provider}, subscriber_buffer=4)
        stream = manager.start(agent="up", messages=user())
        events: list[StreamEvent] = []
        with trio.fail_after(LIMIT):
            async with manager.subscribe(stream.id, 0) as sub:
                async for batch in sub:
                    events.extend(batch)
                    await trio.sleep(0.1)
    end = assert_whole(events)
    assert end.kind == "error" and end.fields["error"]["code"] == "upstream_error"
    text = "".join(e.fields["delta"] for e in events if e.kind == "content")
    assert text == "".join(Script(deltas=60).content_pieces[:40])


async def test_shared_stream_stalled_subscriber_is_coalesced_then_dropped(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    manager = await start_manager(words=100, tps=10, subscriber_buffer=5, max_lag=30)
    stream = manager.start(agent=None, messages=user("go"))
    fast: dict[int, list[tuple[StreamEvent, float]]] = {0: [], 1: []}
    stalled_batches: list[list[StreamEvent]] = []
    dropped: list[SlowConsumer] = []
    resumed: list[Any] = []
    coalesced: list[float] = []

    async def read_fast(i: int) -> None:
        async with manager.subscribe(stream.id, 0) as sub:
            async for batch in sub:
                fast[i].extend((e, trio.current_time()) for e in batch)

    async def read_stalled(task_status: trio.TaskStatus[None]) -> None:
        async with manager.subscribe(stream.id, 0) as sub:
            task_status.started()
            try:
                stalled_batches.append(await sub.__anext__())  # start, maybe the first word
                await trio.sleep(1.25)  # ~12 events behind: over subscriber_buffer
                stalled_batches.append(await sub.__anext__())
                await trio.sleep(5)  # ~50 behind: over max_lag
                await sub.__anext__()
            except SlowConsumer as exc:
                dropped.append(exc)
                coalesced.append(metric(manager, "raafd_coalesced_events_total"))
            resumed.append(sub.cursor)
        # It resumes from its last seq on a new subscription and gets the rest (coalesced
        # while it is behind in a shared stream, so lossless rather than event by event).
        resumed.append(await read_all(manager, stream.id, sub.cursor))

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as readers:
            await readers.start(read_stalled)
            readers.start_soon(read_fast, 0)
            readers.start_soon(read_fast, 1)

    # The fast two got every event, each at the moment it was appended (the producer never
    # waited): a word every 0.1 s from t=0, the last at 10.1 s.
    for i in (0, 1):
        assert_whole([e for e, _ in fast[i]])
        assert len(fast[i]) == 1 + 101 + 1
        contents = [(e.seq, t) for e, t in fast[i] if e.kind == "content"]
        for n, (_, t) in enumerate(contents):
            assert t == pytest.approx(n * 0.1, abs=1e-6)
    full = [e for e, _ in fast[0]]

    # The stalled one: its second batch was coalesced (lossless, carries the last seq).
    second = stalled_batches[1]
    assert len(second) == 1 and second[0].kind == "content"
    merged = second[0]
    first_cursor = stalled_batches[0][-1].seq
    assert merged.seq > first_cursor + 10
    assert merged.fields["delta"] == "".join(
        e.fields["delta"]
        for e in full
        if e.kind == "content" and first_cursor < e.seq <= merged.seq
    )
    assert coalesced == [merged.seq - first_cursor - 1]  # the content events after it became one
    # ... and then it was dropped, with a reason naming where to resume.
    assert len(dropped) == 1 and dropped[0].code == "slow_consumer"
    assert f"resume after seq {merged.seq}" in dropped[0].message
    assert metric(manager, "raafd_slow_consumer_disconnects_total") == 1
    assert resumed[0] == merged.seq
    assert_lossless(resumed[1], full, merged.seq)
    assert stream.status == "complete"


async def test_late_joiner_replaying_history_in_a_shared_stream_is_not_dropped(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    manager = await start_manager(words=200, tps=10, subscriber_buffer=5, max_lag=30)
    stream = manager.start(agent=None, messages=user("go"))
    full: list[StreamEvent] = []

    async def read_fast() -> None:
        full.extend(await read_all(manager, stream.id))

    nursery.start_soon(read_fast)
    late: list[StreamEvent] = []
    with trio.fail_after(LIMIT):
        await trio.sleep(10.05)
        assert stream.head > 100  # far more history than max_lag
        async with manager.subscribe(stream.id, 0) as sub:
            async for batch in sub:
                late.extend(batch)
                await trio.sleep(0.1)  # a reader a bit slow, catching up on coalesced batches
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert metric(manager, "raafd_slow_consumer_disconnects_total") == 0
    assert_lossless(late, full, 0)
    assert len(late) < len(full)


async def test_finished_stream_replay_is_never_coalesced(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=40, tps=100, subscriber_buffer=4, detach_grace=math.inf)
    stream = manager.start(agent=None, messages=user())
    with trio.fail_after(LIMIT):
        await stream.wait()
        async with manager.subscribe(stream.id) as a, manager.subscribe(stream.id) as b:
            got_a = [e async for batch in a for e in batch]
            got_b = [e async for batch in b for e in batch]
    assert_whole(got_a)
    assert [e.seq for e in got_b] == [e.seq for e in got_a]
    assert metric(manager, "raafd_coalesced_events_total") == 0


# --- control ----------------------------------------------------------------------------------


async def test_cancel_closes_the_provider_at_once(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    hang = HangingProvider()
    manager = await start_manager(providers={"hang": hang})
    stream = manager.start(agent="hang", messages=user())
    events: list[StreamEvent] = []

    async def reader() -> None:
        events.extend(await read_all(manager, stream.id))

    nursery.start_soon(reader)
    with trio.fail_after(LIMIT):
        await hang.started.wait()
        await trio.sleep(3)
        now = trio.current_time()
        assert manager.cancel(stream.id, "client") is True
        assert stream.status == "cancelled"  # the terminal event is in the log already
        await trio.testing.wait_all_tasks_blocked()
    assert hang.closed_at == now  # no clock time passed: the request closed at once
    assert [(e.kind, e.fields) for e in events] == [
        ("start", {"agent": "hang", "model": "hang"}),
        ("cancelled", {"reason": "client"}),
    ]
    assert manager.cancel(stream.id, "admin") is False  # exactly one terminal event
    assert stream.head == 2
    with pytest.raises(BadRequest):
        manager.cancel(stream.id, "because")
    with pytest.raises(Conflict):
        manager.pause(stream.id)
    with pytest.raises(Conflict):
        manager.resume(stream.id)


async def test_cancel_racing_completion_still_ends_once(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    quick = ScriptProvider("quick", [Delta(text="a"), Delta(text="b"), Delta(finish_reason="stop")])
    manager = await start_manager(providers={"quick": quick})
    outcomes = set()
    for k in range(40):
        stream = manager.start(agent="quick", messages=user())
        events: list[StreamEvent] = []
        with trio.fail_after(LIMIT):
            async with manager.subscribe(stream.id, 0) as sub:
                for _ in range(k):
                    await trio.lowlevel.checkpoint()
                stream.cancel("client")
                async for batch in sub:
                    events.extend(batch)
        end = assert_whole(events)
        outcomes.add(end.kind)
        assert stream.status == end.kind
    assert outcomes == {"cancelled", "complete"}  # both sides of the race were hit


async def test_pause_stops_the_provider_and_resume_continues(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    tick = TickProvider(n=30, interval=0.1)
    manager = await start_manager(providers={"tick": tick}, idle_timeout=2, pause_timeout=60)
    stream = manager.start(agent="tick", messages=user())
    events: list[tuple[StreamEvent, float]] = []

    async def reader() -> None:
        async with manager.subscribe(stream.id, 0) as sub:
            async for batch in sub:
                events.extend((e, trio.current_time()) for e in batch)

    nursery.start_soon(reader)
    with trio.fail_after(LIMIT):
        await trio.sleep(1.05)
        assert manager.pause(stream.id) is True
        assert manager.pause(stream.id) is False
        assert stream.status == "paused"
        await trio.sleep(1)
        sent_then = tick.sent
        await trio.sleep(9)  # far past idle_timeout: paused time is not idle
        assert tick.sent == sent_then  # the provider is blocked in its send
        assert tick.sent <= 11 + 1
        assert manager.resume(stream.id) is True
        assert manager.resume(stream.id) is False
        assert stream.info()["status"] == "running"
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
    kinds = [e.kind for e, _ in events]
    assert_whole([e for e, _ in events])
    assert kinds[-1] == "complete"
    paused, resumed = kinds.index("paused"), kinds.index("resumed")
    assert resumed == paused + 1  # nothing was appended while paused
    assert events[paused][1] == pytest.approx(1.05)
    assert events[resumed][1] == pytest.approx(11.05)
    assert [e.fields["delta"] for e, _ in events if e.kind == "content"] == [
        f"w{i} " for i in range(30)
    ]


async def test_pause_timeout_cancels(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager, nursery: trio.Nursery
) -> None:
    tick = TickProvider(n=100, interval=0.1)
    manager = await start_manager(providers={"tick": tick}, pause_timeout=5)
    stream = manager.start(agent="tick", messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await trio.sleep(1)
        stream.pause()
        await trio.sleep(2)
        stream.resume()  # a resume restarts the clock for the next pause
        await trio.sleep(1)
        stream.pause()
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == pytest.approx(9)
    assert stream.terminal is not None
    assert (stream.terminal.kind, stream.terminal.fields) == ("cancelled", {"reason": "timeout"})
    assert tick.closed_at == pytest.approx(9)


# --- timeouts ---------------------------------------------------------------------------------


async def test_first_token_timeout(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(first_token_delay=100, first_token_timeout=5)
    stream = manager.start(agent=None, messages=user())
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert trio.current_time() == pytest.approx(5)
    assert end.kind == "error" and end.fields["error"]["code"] == "timeout"
    assert "first_token_timeout" in end.fields["error"]["message"]


async def test_idle_timeout_does_not_count_paused_time(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    tick = TickProvider(n=1, hang_after=True)
    manager = await start_manager(providers={"tick": tick}, idle_timeout=3, pause_timeout=60)
    stream = manager.start(agent="tick", messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await trio.sleep(1)
        stream.pause()
        await trio.sleep(10)
        stream.resume()
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
    # First token at 0, 1 s idle, 10 s paused, then the 2 s left: 13.
    assert trio.current_time() == pytest.approx(13)
    end = stream.terminal
    assert end is not None and end.kind == "error"
    assert end.fields["error"]["code"] == "timeout"
    assert "idle_timeout" in end.fields["error"]["message"]
    assert tick.closed_at == pytest.approx(13)


async def test_idle_timeout_counts_from_the_last_token(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    # 30 tokens 1 s apart, each well within idle_timeout, then silence: the timer fires
    # idle_timeout after the last token, not after the first (lazily re-armed deadline).
    tick = TickProvider(n=30, interval=1.0, hang_after=True)
    manager = await start_manager(providers={"tick": tick}, idle_timeout=4)
    stream = manager.start(agent="tick", messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()  # the body unwinds after the terminal event
    # Tokens at 0..29 s, then the provider sleeps 1 s and hangs: the last token was at 29.
    assert trio.current_time() == pytest.approx(33)
    end = stream.terminal
    assert end is not None and end.kind == "error"
    assert "idle_timeout" in end.fields["error"]["message"]
    assert tick.closed_at == pytest.approx(33)


async def test_idle_timeout_shorter_than_the_first_token_time_left(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    # The first token moves the deadline *earlier* (idle 2 s < 100 s first-token time left).
    tick = TickProvider(n=1, hang_after=True)
    manager = await start_manager(providers={"tick": tick}, first_token_timeout=100, idle_timeout=2)
    stream = manager.start(agent="tick", messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await stream.wait()
    assert trio.current_time() == pytest.approx(2)  # the token at 0, then 2 s idle
    end = stream.terminal
    assert end is not None and "idle_timeout" in end.fields["error"]["message"]


async def test_max_duration(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=1000, tps=10, max_duration=7)
    stream = manager.start(agent=None, messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await stream.wait()
    assert trio.current_time() == pytest.approx(7)
    end = stream.terminal
    assert end is not None and end.fields["error"]["code"] == "timeout"
    assert "max_duration" in end.fields["error"]["message"]


# --- detach grace -----------------------------------------------------------------------------


async def test_detach_grace_cancels_a_stream_nobody_watches(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    hang = HangingProvider()
    manager = await start_manager(providers={"hang": hang}, detach_grace=5)
    stream = manager.start(agent="hang", messages=user())
    with trio.fail_after(LIMIT):
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == pytest.approx(5)
    assert stream.terminal is not None
    assert stream.terminal.fields == {"reason": "detached"}
    assert hang.closed_at == pytest.approx(5)


async def test_reattach_within_the_grace_keeps_the_stream(
    autojump_clock: trio.testing.MockClock,
    start_manager: StartManager,
) -> None:
    manager = await start_manager(words=100, tps=10, detach_grace=5)
    stream = manager.start(agent=None, messages=user("go"))
    with trio.fail_after(LIMIT):
        await trio.sleep(3)  # nobody yet, within the grace
        async with manager.subscribe(stream.id, 0) as sub:
            await sub.__anext__()
            cursor = sub.cursor
        await trio.sleep(4.5)  # left, came back within the grace
        events = await read_all(manager, stream.id, cursor)
    assert assert_whole(events, cursor + 1).kind == "complete"

    # Leaving for good: cancelled one grace after the last subscriber left.
    stream = manager.start(agent=None, messages=user("go"))
    with trio.fail_after(LIMIT):
        async with manager.subscribe(stream.id, 0) as sub:
            await sub.__anext__()
            await trio.sleep(2)
        left = trio.current_time()
        await stream.wait()
    assert trio.current_time() == pytest.approx(left + 5)
    assert stream.terminal is not None and stream.terminal.fields == {"reason": "detached"}


# --- the manager ------------------------------------------------------------------------------


async def test_limits_and_bad_starts(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    hang = HangingProvider()
    manager = await start_manager(
        providers={"hang": hang}, max_streams=3, max_streams_per_connection=2
    )
    a1 = manager.start(agent="hang", messages=user(), owner="a")
    manager.start(agent="hang", messages=user(), owner="a")
    with pytest.raises(TooManyStreams):
        manager.start(agent="hang", messages=user(), owner="a")
    manager.start(agent="hang", messages=user(), owner="b")
    with pytest.raises(TooManyStreams):
        manager.start(agent="hang", messages=user(), owner="c")
    assert manager.running_count() == 3
    a1.cancel("client")
    assert manager.running_count() == 2
    a3 = manager.start(agent="hang", messages=user(), owner="a", stream_id="mine-1")
    assert a3.id == "mine-1"
    a3.cancel()
    with pytest.raises(Conflict) as conflict:
        manager.start(agent="hang", messages=user(), stream_id="mine-1")
    assert conflict.value.field == "stream"
    with pytest.raises(BadRequest):
        manager.start(agent="hang", messages=user(), stream_id="no spaces/allowed")
    with pytest.raises(NotFound) as missing:
        manager.start(agent="nobody", messages=user())
    assert missing.value.field == "agent"
    with pytest.raises(NotFound):
        manager.get("st_missing")


async def test_a_principal_runs_at_most_its_cap_over_all_its_connections(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    hang = HangingProvider()
    manager = await start_manager(
        providers={"hang": hang}, max_streams_per_connection=2, max_streams_per_principal=3
    )
    alice = [
        manager.start(agent="hang", messages=user(), owner=owner, principal="alice")
        for owner in ("c1", "c1", "c2")
    ]
    with pytest.raises(TooManyStreams) as refused:
        manager.start(agent="hang", messages=user(), owner="c3", principal="alice")
    assert "alice already runs 3 streams" in refused.value.message
    # Others, and starts no principal is counted for (auth off, background jobs), go on.
    manager.start(agent="hang", messages=user(), owner="c4", principal="bob")
    manager.start(agent="hang", messages=user(), owner="c5")
    alice[0].cancel("client")  # an ended stream gives its place back
    manager.start(agent="hang", messages=user(), owner="c3", principal="alice")
    with pytest.raises(TooManyStreams):
        manager.start(agent="hang", messages=user(), owner="c3", principal="alice")
    for stream in [*alice[1:]]:
        stream.cancel("client")
    assert manager.running_count() == 3


async def test_drain_lets_streams_finish_then_cancels_the_rest(
    autojump_clock: trio.testing.MockClock,
    start_manager: StartManager,
) -> None:
    hang = HangingProvider()
    manager = await start_manager(providers={"hang": hang}, words=5, tps=10)
    short = manager.start(agent=None, messages=user("go"), detach_grace=math.inf)
    long = manager.start(agent="hang", messages=user(), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await manager.drain(grace=2)
    assert trio.current_time() == pytest.approx(2)
    assert short.status == "complete"
    assert long.terminal is not None and long.terminal.fields == {"reason": "drain"}
    await trio.testing.wait_all_tasks_blocked()
    assert hang.closed_at == pytest.approx(2)
    with pytest.raises(Unavailable):
        manager.start(agent=None, messages=user())
    assert manager.stats()["draining"] is True


async def test_drain_returns_as_soon_as_all_streams_end(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=5, tps=10)
    stream = manager.start(agent=None, messages=user("go"), detach_grace=math.inf)
    with trio.fail_after(LIMIT):
        await manager.drain(grace=30)
    assert stream.status == "complete"
    assert trio.current_time() < 1


async def test_retention_reaper_forgets_finished_streams(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=3, tps=10, retention=10, detach_grace=math.inf)
    first = manager.start(agent=None, messages=user("go"))
    with trio.fail_after(LIMIT):
        await first.wait()
        ended = trio.current_time()
        await trio.sleep(4)
        second = manager.start(agent=None, messages=user("go"))
        await second.wait()
        assert manager.stats()["by_status"]["complete"] == 2
        await trio.sleep_until(ended + 9.9)
        assert manager.get(first.id) is first
        await trio.sleep_until(ended + 10.01)
        with pytest.raises(NotFound):
            manager.get(first.id)
        assert manager.get(second.id) is second
        await trio.sleep(5)
        with pytest.raises(NotFound):
            manager.get(second.id)
    assert manager.list_streams() == []
    assert metric(manager, "raafd_active_streams{status=complete}") == 0


async def test_stats_and_listing(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    hang = HangingProvider()
    manager = await start_manager(providers={"hang": hang})
    s1 = manager.start(agent="hang", messages=user(), owner="c1", session="sess")
    s2 = manager.start(agent="hang", messages=user(), owner="c1")
    s2.pause()
    await trio.sleep(2)
    async with manager.subscribe(s1.id, 0):
        stats = manager.stats()
        listing = manager.list_streams()
    assert stats["running"] == 2
    assert stats["by_status"] == {
        "running": 1,
        "paused": 1,
        "complete": 0,
        "error": 0,
        "cancelled": 0,
    }
    assert stats["subscribers"] == 1
    assert [row["id"] for row in listing] == [s2.id, s1.id]
    row = listing[1]
    assert (row["agent"], row["status"], row["seq"], row["subscribers"]) == (
        "hang",
        "running",
        1,
        1,
    )
    assert row["age"] == pytest.approx(2)
    assert row["session"] == "sess"
    assert metric(manager, "raafd_active_streams{status=paused}") == 1
    assert metric(manager, "raafd_active_streams{status=running}") == 1


async def test_not_running_manager_refuses(autojump_clock: trio.testing.MockClock) -> None:
    config, agents, metrics = StreamsConfig(), {"assistant": AgentConfig()}, Metrics()
    bodies = agent_bodies(agents, {}, metrics, config)
    manager = StreamManager(config, agents, {}, metrics, "assistant", bodies=bodies)
    with pytest.raises(Unavailable):
        manager.start(agent=None, messages=user())


# --- the provider runner ----------------------------------------------------------------------


async def test_upstream_failure_mid_stream(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(words=10)
    stream = manager.start(agent=None, messages=user("[fail-after:3]"))
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert [e.kind for e in events].count("content") == 3
    assert end.fields == {
        "error": {"code": "upstream_error", "message": "demo provider failed mid-stream"}
    }
    assert metric(manager, "raafd_upstream_errors_total{provider=demo,reason=upstream_error}") == 1


async def test_tool_call_is_merged_from_fragments(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    manager = await start_manager(tools=[EchoTool("calc")])
    stream = manager.start(agent=None, messages=user('[tool:calc {"a": 1, "b": [2, 3]}]'))
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    # The agent loop runs the call, then the model answers from its result.
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["start", "tool_call", "tool_result"]
    assert set(kinds[3:-1]) == {"content"} and kinds[-1] == "complete"
    assert events[1].fields == {
        "tool_id": "call_demo_0_0",
        "tool_name": "calc",
        "arguments": {"a": 1, "b": [2, 3]},
    }
    assert events[2].fields == {
        "tool_id": "call_demo_0_0",
        "result": "calc got ['a', 'b']",
        "is_error": False,
    }
    assert end.fields["finish_reason"] == "stop"
    assert end.fields["final_response"] == "The tool said: calc got ['a', 'b']"


async def test_invalid_tool_arguments_retry_notice_and_usage(
    autojump_clock: trio.testing.MockClock,
    start_manager: StartManager,
) -> None:
    script = ScriptProvider(
        "script",
        [
            RetryNotice(attempt=1, reason="rate_limited", retry_after=0.5),
            Delta(text="Hi"),
            Delta(tool_calls=(ToolCallDelta(1, "c1", "lookup", '{"q": '),)),
            Delta(tool_calls=(ToolCallDelta(0, "c0", "broken", "{oops"),)),
            Delta(tool_calls=(ToolCallDelta(1, arguments='"x"}'),)),
            Delta(usage=Usage(4, 2), finish_reason="tool_calls"),
        ],
        then=[Delta(text="Done"), Delta(usage=Usage(6, 1), finish_reason="stop")],
    )
    manager = await start_manager(providers={"script": script}, tools=[EchoTool("lookup")])
    stream = manager.start(agent="script", messages=user())
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert [(e.kind, e.fields) for e in events[1:-1]] == [
        ("retry", {"attempt": 1, "reason": "rate_limited", "retry_after": 0.5}),
        ("content", {"delta": "Hi"}),
        ("tool_call", {"tool_id": "c0", "tool_name": "broken", "arguments": {"_raw": "{oops"}}),
        ("tool_call", {"tool_id": "c1", "tool_name": "lookup", "arguments": {"q": "x"}}),
        # Answered at once (unknown tool), then the real tool's result.
        ("tool_result", {"tool_id": "c0", "result": "unknown tool 'broken'", "is_error": True}),
        ("tool_result", {"tool_id": "c1", "result": "lookup got ['q']", "is_error": False}),
        ("content", {"delta": "Done"}),
    ]
    assert end.fields == {
        "final_response": "Done",
        "usage": {"prompt_tokens": 4 + 6, "completion_tokens": 2 + 1},  # summed over turns
        "finish_reason": "stop",
    }
    # A notice the provider sends itself is passed on; retries are counted where they are
    # decided (the retry wrapper), see test_retries_before_first_token_are_counted_once.


async def test_retries_before_first_token_are_counted_once(
    start_manager: Any, autojump_clock: trio.testing.MockClock
) -> None:
    demo = DemoProvider("flaky", ProviderConfig(max_retries=2, retry_base=0.1, retry_max=1.0))
    manager = await start_manager(providers={"flaky": demo})
    stream = manager.start(agent="flaky", messages=[{"role": "user", "content": "[fail]"}])
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert [e.fields["attempt"] for e in events if e.kind == "retry"] == [1, 2]
    assert end.kind == "error" and end.fields["error"]["code"] == "upstream_error"
    assert (
        metric(manager, "raafd_upstream_retries_total{provider=flaky,reason=upstream_error}") == 2
    )
    assert metric(manager, "raafd_upstream_errors_total{provider=flaky,reason=upstream_error}") == 3


async def test_internal_failure_reveals_nothing(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    broken = ScriptProvider("broken", [Delta(text="a")], fail=RuntimeError("key=sk-secret-123"))
    manager = await start_manager(providers={"broken": broken})
    stream = manager.start(agent="broken", messages=user())
    events = await read_all(manager, stream.id)
    end = assert_whole(events)
    assert end.fields == {"error": {"code": "internal", "message": "internal error"}}
    assert b"sk-secret" not in b"".join(e.json for e in events)


async def test_stream_standalone_cancelled_before_it_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = Stream(
        agent="a", model="m", config=StreamsConfig(), metrics=Metrics(), timers=Timers()
    )
    stream.cancel("admin")
    ran = []

    async def body(out: Any) -> None:
        ran.append(True)

    await stream.run(body)
    assert ran == []
    assert [(e.kind, e.fields) for e in stream.log.after(0)] == [
        ("start", {"agent": "a", "model": "m"}),
        ("cancelled", {"reason": "admin"}),
    ]


async def test_stream_logs_carry_the_stream_id_not_the_spawners_ids(
    start_manager: StartManager, autojump_clock: trio.testing.MockClock
) -> None:
    import structlog

    manager = await start_manager(words=1)
    structlog.contextvars.bind_contextvars(req="req_1", conn="c_1")
    try:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            stream = manager.start(agent=None, messages=user())
            await read_all(manager, stream.id)
    finally:
        structlog.contextvars.unbind_contextvars("req", "conn")
    started = [entry for entry in logs if entry["event"] == "stream started"]
    assert started and started[0]["stream"] == stream.id
    assert "req" not in started[0] and "conn" not in started[0]


async def test_a_refused_push_leaves_the_event_to_the_pull_path(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    # A subscriber that takes live events by push refuses every third one (its socket queue
    # full, say): the refused event and what follows come through the pull path, each once, in
    # order, and no push is offered while a pulled batch is still in hand.
    manager = await start_manager(words=40, tps=20)
    stream = manager.start(agent=None, messages=user(), detach_grace=math.inf)
    pushed: list[StreamEvent] = []
    pulled: list[StreamEvent] = []
    offers = 0
    with trio.fail_after(LIMIT):
        async with manager.subscribe(stream.id, 0) as sub:

            def push(event: StreamEvent) -> bool:
                nonlocal offers
                offers += 1
                assert not sub._held  # never while a pulled batch is undelivered
                assert event.seq == sub.cursor + 1
                if offers % 3 == 0:
                    return False
                pushed.append(event)
                return True

            sub.push = push
            async for batch in sub:
                pulled.extend(batch)
                await trio.sleep(0.01)  # the batch is "in hand" for a while
    events = sorted(pushed + pulled, key=lambda e: e.seq)
    assert_whole(events)
    assert len({e.seq for e in events}) == len(events)  # none twice
    assert pushed and any(e.kind == "content" for e in pulled[1:])  # both paths were used


async def test_a_reader_without_a_task_takes_what_pushes_refused(
    autojump_clock: trio.testing.MockClock, start_manager: StartManager
) -> None:
    # The gateway's way: open() synchronously, live events by push, and take_nowait() (which
    # never waits) for what a push refused. A batch in hand holds the pushes back until the
    # reader asks again.
    manager = await start_manager(words=40, tps=20)
    stream = manager.start(agent=None, messages=user(), detach_grace=math.inf)
    sub = manager.subscribe(stream.id, 0)
    sub.open()
    taken: list[StreamEvent] = []
    offers = refused = 0

    def push(event: StreamEvent) -> bool:
        nonlocal offers, refused
        assert not sub._held and event.seq == sub.cursor + 1
        offers += 1
        if offers % 4 == 0:
            refused += 1
            return False  # refused: left for take_nowait
        taken.append(event)
        return True

    sub.push = push
    with trio.fail_after(LIMIT):
        first = sub.take_nowait()
        assert first is not None and [e.kind for e in first] == ["start"]
        taken += first
        await trio.sleep(0.2)  # events appended meanwhile wait: the batch is still in hand
        assert offers == 0 and stream.head > sub.cursor
        while not sub.done:
            while (batch := sub.take_nowait()) is not None:
                taken += batch
            # As the gateway does: come back when a push was refused (or the last was taken).
            await wait_until(lambda seen=refused: refused > seen or sub.done)
    sub.close()
    assert sub.take_nowait() is None and stream.subscribers == 0
    assert_whole(taken)
    assert len({e.seq for e in taken}) == len(taken) and offers >= 20
