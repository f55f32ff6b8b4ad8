"""Property tests for raafd's decoders (client commands and the configuration; client frames
and request heads have theirs in test_frames.py and test_http_raw.py) and a short run of the
black-box fuzzer (bench/fuzz.py) against a real daemon: whatever comes in, a decoder answers
with its own error type or a value, never anything else, and the daemon keeps serving a normal
client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fuzz import COMMANDS, fuzz, mutate, random_frames
from raafd.config import ConfigError, parse_config
from raafd.errors import RaafdError
from raafd.gateway.frames import ClientFrames
from raafd.protocol.commands import COMMANDS as COMMAND_TYPES
from raafd.protocol.commands import parse_command
from tests.waiting import wait_until

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(["type", "ref", "input", "agent", "stream", "after", "messages", "token"])


@given(st.dictionaries(KEYS, JSON, max_size=6), st.sampled_from(sorted(COMMAND_TYPES)))
def test_any_json_object_is_a_command_or_a_bad_request(data: dict[str, Any], kind: str) -> None:
    data.setdefault("type", kind)
    try:
        parse_command(json.dumps(data), COMMAND_TYPES)
    except RaafdError as err:
        assert err.code == "bad_request"
        assert isinstance(err.message, str) and err.message


@given(st.binary(max_size=400))
def test_any_bytes_are_a_command_or_a_bad_request(raw: bytes) -> None:
    try:
        parse_command(raw, COMMAND_TYPES)
    except RaafdError as err:
        assert err.code == "bad_request"


@given(st.sampled_from(COMMANDS), st.randoms(use_true_random=False))
def test_mutated_commands_are_commands_or_bad_requests(seed: bytes, rng: Any) -> None:
    try:
        parse_command(mutate(rng, seed), COMMAND_TYPES)
    except RaafdError as err:
        assert err.code == "bad_request"


@given(st.randoms(use_true_random=False))
def test_the_fuzzers_frames_parse_as_events_and_at_most_one_close(rng: Any) -> None:
    from wsproto.events import CloseConnection

    data, count, _ = random_frames(rng, 16)
    frames = ClientFrames()
    frames.receive_data(data)
    events = list(frames.events())
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0])
    assert count >= 1


SECTIONS = st.sampled_from(["server", "http", "websocket", "auth", "limits", "streams", "chat"])


@settings(max_examples=200)
@given(
    st.dictionaries(SECTIONS, st.dictionaries(st.text(max_size=12), JSON, max_size=4), max_size=3)
)
def test_any_config_table_is_a_config_or_a_list_of_problems(data: dict[str, Any]) -> None:
    try:
        parse_config(data, {})
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and ": " in p for p in err.problems)


async def test_a_short_fuzz_run_leaves_the_daemon_serving_a_normal_client(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(
        server={"header_timeout": 2.0},
        providers={"demo": {"tokens_per_second": 2000.0, "reply_words": 6}},
        limits={"connection": {"commands": {"rate": 0}, "stream_starts": {"rate": 0}}},
        streams={"retention": 2.0, "detach_grace": 1.0},
    )
    with trio.fail_after(90):
        report = await fuzz(
            rd.address, frames=6000, requests=150, seed=3, http_connections=8, http_wait=4.0
        )
    assert report.frames >= 6000 and report.requests == 150
    assert report.http_hangs == 0
    assert report.normal_streams >= 1 and report.normal_failures == []
    assert report.probes >= 1
    # Every fuzz connection is gone: none is left holding a connection slot or a task.
    with trio.fail_after(20):
        await wait_until(lambda: rd.daemon.listener.open_connections == 0)
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            assert (await http.get("/healthz")).status_code == 200
