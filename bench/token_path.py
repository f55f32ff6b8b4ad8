"""The CPU a token's Python path costs in raafd, in µs per token, with no system call in it.
Prints numbers; not a test.

The path is the one a token of an OpenAI-compatible upstream takes in the stream's task once
its read returned: the HTTP chunk's framing (``ChunkedBody``), the event stream and the JSON
(``OpenAIProvider._chunk_deltas``, what ``pump_deltas`` hands each read to), the sinks' ``send``
chain (``DeltaWatch`` → ``_TurnSink`` → the stream's writer), the append to the stream's log,
and the WebSocket frame its single subscriber's ``push`` builds. The read itself (the upstream
``recv``, the wait for it and the task's wake-up), the client ``send`` and the scheduler are
left out, as is everything a stream's start costs apart from building the ``Stream``.

Streams run one after another, 64 tokens each, so the caches stay hot: under 500 concurrent
streams the same path costs about 1.6 times as much (``bench/stream_bench.py --profile``). Use
it to compare two trees of the hot path (any tree whose OpenAI provider has
``_chunk_deltas``), quickly and with less noise than the full benchmark:

    PYTHONPATH=<tree> .venv/bin/python bench/token_path.py [--streams 3000] [--runs 5]

``--filter KIND`` (repeatable; ``all`` for one of each) puts the agent's output filters of
``bench/stream_bench.py --filters`` between the sinks and the stream's writer, as a stream of
an agent with those filters has them: the CPU a filter costs per token. (The filter timer's
task, a cost per stream rather than per token, is not started.)

It reaches into raafd's internals on purpose (the sinks and the writer are private).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import trio

from raafd.agents.runner import _TurnSink
from raafd.config import ProviderConfig, StreamsConfig
from raafd.gateway.connection import event_frame
from raafd.logging import configure_logging
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.providers.openai import OpenAIProvider, _ChunkState
from raafd.providers.retry import DeltaWatch
from raafd.providers.sse import SSEParser
from raafd.providers.upstream import UpstreamClient
from raafd.providers.wire import ChunkedBody
from raafd.streams.stream import Stream, _Writer
from raafd.timers import Timers

DELTAS = 64
# What bench/fake_upstream.mjs sends: the role chunk first, then one content chunk per read.
_CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"m","choices":[{"index":0,"delta":{"content":"%d@1732212345678.123|"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
_ROLE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)


def http_chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


FILTERS: dict[str, dict[str, Any]] = {  # as bench/stream_bench.py --filters configures them
    "redact": {"type": "redact", "patterns": ["sk-[A-Za-z0-9]{8,12}"]},
    "block": {"type": "block", "patterns": ["(?i:forbidden)"]},
    "max_output_chars": {"type": "max_output_chars", "max_chars": 1_000_000},
    "buffer": {"type": "buffer", "min_chars": 1, "max_delay_ms": 20.0},
}


def filtered(kinds: list[str]) -> Callable[[Stream], Any]:
    """The writer a stream with these filters gives its body (no filters: the stream's own)."""
    if not kinds:
        return _Writer
    from raafd.config import AgentConfig, FilterConfig
    from raafd.streams.filters import FilterContext, _FilteredWriter, build_filters

    configs = [FilterConfig(**FILTERS[kind]) for kind in kinds]
    chain = build_filters({"a": AgentConfig(filters=configs)})["a"]

    def writer(stream: Stream) -> Any:
        state = chain.open(FilterContext(stream.id, "a", trio.current_time))
        return _FilteredWriter(_Writer(stream), state)

    return writer


async def run_streams(streams: int, kinds: list[str]) -> float:
    """Seconds of CPU per token over ``streams`` streams of DELTAS tokens."""
    make_writer = filtered(kinds)
    metrics, config, timers = Metrics(), StreamsConfig(), Timers()
    client = UpstreamClient(max_connections=1, max_idle=1, idle_expiry=1.0, trust_env=False)
    provider_config = ProviderConfig(type="openai", base_url="http://127.0.0.1:9/v1", model="m")
    provider = OpenAIProvider("bench", provider_config, client, {})
    wire = [http_chunk(_CHUNK % i) for i in range(DELTAS)]
    frames = 0

    def push(event: StreamEvent) -> bool:
        nonlocal frames
        event_frame(event.json)
        frames += 1
        return True

    gc.collect()
    started = time.process_time()
    for _ in range(streams):
        stream = Stream(agent="a", model="m", config=config, metrics=metrics, timers=timers)
        async with stream.subscribe(stream.head) as subscription:
            subscription.push = push
            stream._gap_on = True  # as while a body runs: tokens move the idle timer
            send = DeltaWatch(_TurnSink(make_writer(stream), None)).send
            body, parser, state = ChunkedBody(), SSEParser(), _ChunkState()
            parser.feed(_ROLE)

            for chunk in wire:
                for delta in provider._chunk_deltas(parser, state, body.feed(chunk)):
                    await send(delta)  # never waits here: the subscriber keeps up
        stream.cancel()
    elapsed = time.process_time() - started
    # A redact or block filter holds the last characters of a stream back until its end, which
    # these streams never reach: their last delta may stay unsent.
    if frames < streams * (DELTAS - (1 if kinds else 0)):
        raise RuntimeError(f"{frames} frames for {streams * DELTAS} tokens")
    return elapsed / (streams * DELTAS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        choices=[*FILTERS, "all"],
        help="an output filter on the path (repeat for several, in order; all: one of each)",
    )
    args = parser.parse_args()
    kinds = list(FILTERS) if "all" in args.filter else args.filter
    configure_logging("warning")
    results = [trio.run(run_streams, args.streams, kinds) * 1e6 for _ in range(args.runs)]
    print(
        f"token path: {statistics.median(results):.2f} µs per token (median of {args.runs};"
        f" min {min(results):.2f}, max {max(results):.2f}; {args.streams} streams x {DELTAS};"
        f" filters: {', '.join(kinds) or 'none'})"
    )


if __name__ == "__main__":
    main()
