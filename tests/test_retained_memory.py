"""What a finished stream keeps while it is retained: its log and its summary, nothing of its run.

A daemon retains thousands of finished streams (``retention``, up to ``max_streams``), so an
object that a finished stream keeps alive by mistake costs that many times over
(``bench/retained_memory.py`` measures the bytes). These tests check it without measuring
memory: weak references to what a run made (its body, the agent loop's request and messages, a
provider's state) are dead once the stream has ended and its task has returned; no coroutine,
frame, task or closure is left per stream; and the log is held at its exact size.
"""

from __future__ import annotations

import collections
import gc
import math
import sys
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop
from raafd.config import AgentConfig, BreakerConfig, ProviderConfig, StreamsConfig
from raafd.core import EventLog
from raafd.metrics import Metrics
from raafd.providers.base import Delta, Provider, ProviderRequest, Sink, Usage
from raafd.providers.breaker import Breakers
from raafd.streams import Stream, StreamManager, StreamWriter

LIMIT = 1000  # clock seconds: the absolute timeout around every wait
TOKENS = 64


class Marker:
    """Something a run made, to follow with a weak reference."""

    def __init__(self, size: int = 0) -> None:
        self.payload = list(range(size))


class MarkingProvider:
    """Sends ``TOKENS`` words; keeps weak references to each request it got and to a state
    object of its own, held across its sends as a real provider holds its response."""

    config = ProviderConfig(max_retries=0)

    def __init__(self) -> None:
        self.name = "marking"
        self.refs: list[weakref.ref[Any]] = []

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        state = Marker(1000)
        self.refs += [weakref.ref(request), weakref.ref(state)]
        for i in range(TOKENS):
            await send.send(Delta(text=f" w{i}"))
        await send.send(Delta(usage=Usage(1, TOKENS), finish_reason="stop"))


@pytest.fixture
async def manager(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[tuple[StreamManager, MarkingProvider]]:
    provider = MarkingProvider()
    providers: dict[str, Provider] = {"marking": provider}
    agents = {"assistant": AgentConfig(provider="marking")}
    config, metrics = StreamsConfig(retention=math.inf), Metrics()
    loop = AgentLoop(agents, providers, Breakers(BreakerConfig()), None, metrics, config)
    manager = StreamManager(
        config, agents, providers, metrics, "assistant", bodies=AgentBodies(loop)
    )
    await nursery.start(manager.run)
    yield manager, provider


async def run_to_end(manager: StreamManager, **start: Any) -> Stream:
    """Start a stream, read it to its terminal event, and let its task return. (Callers bound
    the wait: a deadline scope per stream would stay in trio's deadline heap for a while.)"""
    stream = manager.start(agent=None, **start)
    async with stream.subscribe(0) as sub:
        async for _batch in sub:
            pass
    await trio.testing.wait_all_tasks_blocked()
    assert stream.status == "complete"
    return stream


def tracked() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


async def test_a_finished_agent_stream_keeps_nothing_of_its_run(
    autojump_clock: trio.testing.MockClock, manager: tuple[StreamManager, MarkingProvider]
) -> None:
    streams, provider = manager
    marker = Marker()
    marker_ref = weakref.ref(marker)
    messages = [{"role": "user", "content": "hello", "marker": marker}]
    with trio.fail_after(LIMIT):
        stream = await run_to_end(streams, messages=messages)
    del messages, marker
    gc.collect()
    assert provider.refs and [ref() for ref in provider.refs] == [None] * len(provider.refs)
    assert marker_ref() is None  # the input messages, as the agent loop took them
    # What replay and status need is still there.
    assert stream.head == TOKENS + 2
    assert [e.kind for e in stream.log.after(TOKENS)] == ["content", "complete"]
    assert stream.info()["status"] == "complete"


async def test_a_finished_stream_keeps_nothing_of_its_body(
    autojump_clock: trio.testing.MockClock, manager: tuple[StreamManager, MarkingProvider]
) -> None:
    streams, _ = manager
    refs: list[weakref.ref[Any]] = []

    def make_body() -> Any:
        state = Marker(1000)

        async def body(out: StreamWriter) -> None:
            for i in range(TOKENS):
                await out.emit("content", delta=f" {len(state.payload) + i}")
            await out.emit("complete", final_response="", finish_reason="stop")

        refs.extend([weakref.ref(state), weakref.ref(body)])
        return body

    with trio.fail_after(LIMIT):
        await run_to_end(streams, body=make_body())
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


async def test_a_retained_stream_is_a_few_objects_and_no_coroutine_frame_or_task(
    autojump_clock: trio.testing.MockClock, manager: tuple[StreamManager, MarkingProvider]
) -> None:
    streams, provider = manager
    n = 40
    with trio.fail_after(LIMIT):
        await run_to_end(streams, messages=[{"role": "user", "content": "warm up"}])
    before = tracked()
    with trio.fail_after(LIMIT):
        for i in range(n):
            await run_to_end(streams, messages=[{"role": "user", "content": f"hello {i}"}])
    provider.refs.clear()
    grown = tracked() - before
    # A coroutine, frame, task or closure left per stream would pin the whole run it belongs
    # to (its locals, the agent loop's turn, the provider's response).
    assert not {"coroutine", "frame", "Task", "Nursery", "function", "cell"} & set(grown)
    # Today some 12 each: the Stream and its dict, its Feed, log, FeedLimits, cancel scope and
    # its reason, the log's array, two bound methods (the callbacks between the stream, its
    # feed and the manager), a stale timer-heap entry; plus a few dozen in all that are not
    # per stream (trio's and the test's own).
    assert sum(grown.values()) <= 20 * n, grown.most_common(12)


async def test_a_finished_streams_log_is_held_at_its_exact_size(
    autojump_clock: trio.testing.MockClock, manager: tuple[StreamManager, MarkingProvider]
) -> None:
    streams, _ = manager
    with trio.fail_after(LIMIT):
        stream = await run_to_end(streams, messages=[{"role": "user", "content": "hello"}])
    log = stream.log
    # An empty log, plus the events' JSON, a 4-byte end offset and a kind byte per event.
    assert sys.getsizeof(log) == sys.getsizeof(EventLog(1, 1)) + log.nbytes + 5 * len(log) + 2
