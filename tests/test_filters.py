"""Output filters: the pure states (redact, block, max_output_chars, buffer), their checks at
config time, the entry-point plugins, and filtered streams run by the stream manager on
trio's autojump clock (exact times)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop
from raafd.config import AgentConfig, BreakerConfig, ConfigError, FilterConfig, StreamsConfig
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.providers.breaker import Breakers
from raafd.streams import StreamManager
from raafd.streams.body import StreamWriter
from raafd.streams.filters import (
    MAX_SPAN,
    Event,
    FilterChain,
    FilterContext,
    build_filters,
    pattern_span,
)

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "fakes" / "filterpkg"
LIMIT = 1000  # clock seconds: the absolute timeout around every wait

SECRET = r"sk-[A-Za-z0-9]{8,16}"


def chain(*filters: FilterConfig, agent: str = "a") -> FilterChain:
    return build_filters({agent: AgentConfig(filters=list(filters))})[agent]


def run(
    c: FilterChain, events: list[Event], clock: Callable[[], float] = lambda: 0.0
) -> list[Event]:
    state = c.open(FilterContext("st_test", "a", clock))
    out: list[Event] = []
    for event in events:
        out += state.feed(event)
    return out


def content(*deltas: str) -> list[Event]:
    return [Event("content", {"delta": d}) for d in deltas]


def complete(text: str) -> Event:
    return Event("complete", {"final_response": text, "usage": None, "finish_reason": "stop"})


def text_of(events: list[Event]) -> str:
    return "".join(e.fields["delta"] for e in events if e.kind == "content")


# --- redact -----------------------------------------------------------------------------------

REDACT = FilterConfig(type="redact", patterns=[SECRET], replacement="[key]")


def test_redact_catches_a_secret_split_over_three_deltas() -> None:
    out = run(chain(REDACT), [*content("my key is sk-ab", "cd12", "34ef please"), complete("x")])
    assert text_of(out) == "my key is [key] please"
    assert "sk-" not in text_of(out)
    assert out[-1].kind == "complete"


def test_redact_holds_back_only_what_a_match_may_still_need() -> None:
    # The longest match is 19 characters; a decision at a position needs 20 (one for \b).
    out = run(chain(REDACT), content("x" * 100))
    assert text_of(out) == "x" * (100 - 19)
    out = run(chain(REDACT), [*content("x" * 100), complete("")])
    assert text_of(out) == "x" * 100


def test_redact_catches_a_secret_over_a_buffer_chunk_boundary() -> None:
    # buffer first (it joins deltas into chunks), then redact across the chunks it releases.
    buffer = FilterConfig(type="buffer", min_chars=10, max_delay_ms=1000)
    c = chain(buffer, REDACT)
    out = run(c, [*content("aaaaaaa sk-", "1234", "5678 bbbbbbbbbbbb"), complete("done")])
    assert text_of(out) == "aaaaaaa [key] bbbbbbbbbbbb"


def test_redact_rewrites_the_final_response() -> None:
    out = run(chain(REDACT), [*content("sk-12345678"), complete("it is sk-12345678")])
    assert out[-1].fields["final_response"] == "it is [key]"
    assert text_of(out) == "[key]"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="sk-ab12 \n", max_size=80),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=8),
    patterns=st.sampled_from(
        [[r"sk-[a-z0-9]{2,6}"], [r"\bab\b", r"b{2,3}1"], [r"a(?:b|12)", r"k-\s{1,3}a"]]
    ),
)
def test_redact_any_split_gives_the_output_of_the_whole_text(
    text: str, cuts: list[int], patterns: list[str]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    c = chain(FilterConfig(type="redact", patterns=patterns, replacement="#"))
    out = run(c, [*content(*pieces), complete(text)])
    whole = re.compile("|".join(f"(?:{p})" for p in patterns)).sub("#", text)
    assert text_of(out) == whole
    assert out[-1].fields["final_response"] == whole


def test_patterns_without_a_bounded_span_are_refused() -> None:
    assert pattern_span(SECRET) == 19
    assert pattern_span(r"\bsk-\w{4}\b") == 7
    for bad, why in [
        (r"sk-\w+", "more than 1024"),
        ("a{0,3}", "empty"),
        (r"^sk", "anchors"),
        (r"sk(?=-)", "lookahead"),
        ("(", "not a valid"),
        (f"a{{{MAX_SPAN + 1}}}", "more than 1024"),
    ]:
        with pytest.raises(ValueError, match=why):
            pattern_span(bad)


def test_filter_problems_are_listed_with_their_paths() -> None:
    agents = {
        "a": AgentConfig(
            filters=[
                FilterConfig(type="redact", patterns=["ok", r"\d+"]),
                FilterConfig(type="block"),
                FilterConfig(type="nosuch"),
            ]
        )
    }
    with pytest.raises(ConfigError) as err:
        build_filters(agents)
    assert err.value.problems[0].startswith("agents.a.filters.0.patterns.1: the pattern can")
    assert err.value.problems[1] == (
        "agents.a.filters.1.patterns: a block filter needs at least one pattern"
    )
    assert err.value.problems[2].startswith("agents.a.filters.2.type: no filter named 'nosuch'")


def check_config(conf: Path, filters: str) -> subprocess.CompletedProcess[str]:
    conf.write_text(f'[agents.assistant]\nprovider = "demo"\nfilters = [{filters}]\n')
    return subprocess.run(
        [sys.executable, "-m", "raafd.cli", "check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_check_config_reports_a_bad_filter(tmp_path: Path) -> None:
    conf = tmp_path / "raafd.toml"
    done = check_config(
        conf, '{type = "redact", patterns = ["sk-.*"]}, {type = "buffer", min_chars = 0}'
    )
    # The field checks first (a pattern is checked once the tree is valid) ...
    assert done.returncode == 2, done.stdout + done.stderr
    assert "agents.assistant.filters.1.min_chars: must be greater than 0" in done.stderr
    # ... then the filters are built.
    done = check_config(conf, '{type = "redact", patterns = ["sk-.*"]}')
    assert done.returncode == 2
    assert "agents.assistant.filters.0.patterns.0: the pattern can match more than" in done.stderr
    done = check_config(conf, '{type = "redact", patterns = ["sk-.{1,9}"]}')
    assert done.returncode == 0, done.stdout + done.stderr


# --- block and max_output_chars ---------------------------------------------------------------


def test_block_ends_with_content_filtered_before_the_matching_text() -> None:
    c = chain(FilterConfig(type="block", patterns=[r"forbidden"]))
    out = run(c, [*content("this is for", "bidden text", " more"), complete("x")])
    assert {e.kind for e in out[:-1]} == {"content"}
    assert text_of(out) == "this is "  # in pieces, as each position was decided
    assert out[-1].fields["error"]["code"] == "content_filtered"


def test_max_output_chars_passes_the_text_up_to_the_limit_then_ends() -> None:
    c = chain(FilterConfig(type="max_output_chars", max_chars=10))
    out = run(c, [*content("12345", "6789", "abcdef", "never"), complete("x")])
    assert text_of(out) == "123456789a"
    assert out[-1].kind == "error"
    assert out[-1].fields["error"]["code"] == "output_limit"
    assert len(out) == 4


# --- buffer -----------------------------------------------------------------------------------


def test_buffer_joins_until_min_chars_and_flushes_before_other_events() -> None:
    c = chain(FilterConfig(type="buffer", min_chars=5, max_delay_ms=50))
    tool = Event("tool_call", {"tool_id": "t", "tool_name": "x", "arguments": {}})
    out = run(c, [*content("ab", "cd", "ef", "g"), tool, *content("h"), complete("x")])
    assert [(e.kind, e.fields.get("delta")) for e in out] == [
        ("content", "abcdef"),
        ("content", "g"),
        ("tool_call", None),
        ("content", "h"),
        ("complete", None),
    ]


def test_buffer_keeps_agents_of_a_workflow_apart() -> None:
    c = chain(FilterConfig(type="buffer", min_chars=100, max_delay_ms=50))
    events = [
        Event("content", {"delta": "a", "agent": "x"}),
        Event("content", {"delta": "b", "agent": "y"}),
        complete("x"),
    ]
    out = run(c, events)
    assert [e.fields for e in out[:2]] == [
        {"delta": "a", "agent": "x"},
        {"delta": "b", "agent": "y"},
    ]


# --- entry points -----------------------------------------------------------------------------


@pytest.fixture
def shout_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_an_entry_point_filter_is_loaded(shout_plugin: None) -> None:
    # In order: redact first, then the plugin upper-cases what redact passed on.
    c = chain(REDACT, FilterConfig(type="shout"))
    out = run(c, [*content("hi sk-abcd", "efgh"), complete("hi sk-abcdefgh")])
    assert text_of(out) == "HI [KEY]"
    assert out[-1].fields["final_response"] == "HI [KEY]"
    # The other way round the key is upper case by the time redact sees it: not a match.
    c = chain(FilterConfig(type="shout"), REDACT)
    assert text_of(run(c, [*content("hi sk-abcdefgh"), complete("")])) == "HI SK-ABCDEFGH"


def test_an_entry_point_filters_options_are_checked(shout_plugin: None) -> None:
    agents = {"a": AgentConfig(filters=[FilterConfig(type="shout", options={"loud": 1})])}
    with pytest.raises(ConfigError) as err:
        build_filters(agents)
    assert err.value.problems == ["agents.a.filters.0.options: unknown options: loud"]


# --- filtered streams -------------------------------------------------------------------------

Script = Callable[[StreamWriter], Awaitable[None]]


async def start_manager(nursery: trio.Nursery, filters: dict[str, list[FilterConfig]]) -> Any:
    agents = {name: AgentConfig(provider="demo", filters=f) for name, f in filters.items()}
    config, metrics = StreamsConfig(), Metrics()
    loop = AgentLoop(agents, {}, Breakers(BreakerConfig()), None, metrics, config)
    manager = StreamManager(
        config,
        agents,
        {},
        metrics,
        next(iter(agents)),
        bodies=AgentBodies(loop),
        filters=build_filters(agents),
    )
    await nursery.start(manager.run)
    return manager


async def read_timed(manager: StreamManager, stream_id: str) -> list[tuple[float, StreamEvent]]:
    """Every event with the clock time its batch arrived at."""
    out: list[tuple[float, StreamEvent]] = []
    with trio.fail_after(LIMIT):
        async with manager.subscribe(stream_id, 0) as sub:
            async for batch in sub:
                out += [(trio.current_time(), e) for e in batch]
    return out


async def test_buffer_releases_held_text_exactly_at_max_delay(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    buffer = FilterConfig(type="buffer", min_chars=10, max_delay_ms=250)
    manager = await start_manager(nursery, {"a": [buffer]})
    t0 = trio.current_time()

    async def body(out: StreamWriter) -> None:
        await out.emit("content", delta="ab")  # held from t0
        await trio.sleep(0.1)
        await out.emit("content", delta="cd")  # joins; still under min_chars
        await trio.sleep(1.0)  # nothing arrives: the timer releases "abcd" at t0 + 0.25
        await out.emit("content", delta="0123456789")  # min_chars: at once
        await out.emit("content", delta="e")  # held from t0 + 1.1
        await trio.sleep(0.05)
        await out.emit("complete", final_response="", usage=None, finish_reason="stop")

    stream = manager.start(agent="a", body=body)
    timed = await read_timed(manager, stream.id)
    got = [(round(t - t0, 6), e.fields.get("delta")) for t, e in timed if e.kind == "content"]
    assert got == [(0.25, "abcd"), (1.1, "0123456789"), (1.15, "e")]
    assert timed[-1][1].kind == "complete"


async def test_block_and_output_limit_end_the_stream_and_cancel_the_body(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager = await start_manager(
        nursery,
        {
            "b": [FilterConfig(type="block", patterns=["bad"])],
            "m": [FilterConfig(type="max_output_chars", max_chars=3)],
        },
    )
    reached: list[str] = []

    def script(agent: str) -> Script:
        async def body(out: StreamWriter) -> None:
            for word in ["ok ", "b", "ad", " words", " more"]:
                await out.emit("content", delta=word)
                await trio.sleep(0.01)
            reached.append(agent)  # never: the filter's terminal event cancelled the body

        return body

    for agent, code, text in [("b", "content_filtered", "ok "), ("m", "output_limit", "ok ")]:
        stream = manager.start(agent=agent, body=script(agent))
        events = [e for _, e in await read_timed(manager, stream.id)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert "".join(e.fields["delta"] for e in events if e.kind == "content") == text
        assert events[-1].kind == "error"
        assert events[-1].fields["error"]["code"] == code
        assert stream.status == "error"
    assert reached == []


async def test_a_failing_filter_ends_only_its_own_stream(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    shout_plugin: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shout = FilterConfig(type="shout", options={"fail_on": "boom"})
    manager = await start_manager(nursery, {"s": [shout]})

    def script(words: list[str]) -> Script:
        async def body(out: StreamWriter) -> None:
            for word in words:
                await out.emit("content", delta=word)
                await trio.sleep(0.01)
            await out.emit("complete", final_response="fine", usage=None, finish_reason="stop")

        return body

    failing = manager.start(agent="s", body=script(["a", "boom", "c"]))
    other = manager.start(agent="s", body=script(["x", "y"]))
    bad = [e for _, e in await read_timed(manager, failing.id)]
    good = [e for _, e in await read_timed(manager, other.id)]
    assert [e.kind for e in bad] == ["start", "content", "error"]
    assert bad[-1].fields["error"] == {"code": "internal", "message": "internal error"}
    assert [e.fields.get("delta") for e in good if e.kind == "content"] == ["X", "Y"]
    assert good[-1].fields["final_response"] == "FINE"
    assert "an output filter failed" in capsys.readouterr().out


async def test_a_stream_without_filters_runs_its_body_unwrapped(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager = await start_manager(nursery, {"plain": []})
    seen: list[object] = []

    async def body(out: StreamWriter) -> None:
        seen.append(type(out).__name__)
        await out.emit("complete", final_response="", usage=None, finish_reason="stop")

    stream = manager.start(agent="plain", body=body)
    await stream.wait()
    assert seen == ["_Writer"]  # the stream's own writer, no filter in between


# --- in the daemon ----------------------------------------------------------------------------


async def test_the_daemon_redacts_what_every_reader_sees(start_daemon: Any) -> None:
    """The demo echoes the input word by word: the code is split over deltas. NDJSON, the
    replay, the session and the OpenAI-compatible answer all carry the redacted text."""
    redact = {"type": "redact", "patterns": [r"code \d{4} \d{4}"], "replacement": "[code]"}
    rd = await start_daemon(
        providers={"demo": {"type": "demo", "tokens_per_second": 1000, "reply_words": 3}},
        agents={"assistant": {"provider": "demo", "filters": [redact, {"type": "buffer"}]}},
    )
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            async with client.stream(
                "POST",
                "/v1/streams",
                json={"input": "my code 1234 5678 ok", "session": "s1"},
                headers={"accept": "application/x-ndjson"},
            ) as response:
                lines = [json.loads(x) async for x in response.aiter_lines() if x]
            stream = lines[0]["stream"]
            async with client.stream(
                "GET",
                f"/v1/streams/{stream}/events?after=0",
                headers={"accept": "application/x-ndjson"},
            ) as response:
                replay = [json.loads(x) async for x in response.aiter_lines() if x]
            session = (await client.get("/v1/sessions/s1")).json()
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "assistant",
                    "messages": [{"role": "user", "content": "code 1111 2222"}],
                },
            )
    text = "".join(d.get("delta", "") for d in lines)
    assert text.startswith("my [code] ok ") and "1234" not in text
    assert lines[-1]["final_response"] == text
    assert replay == lines
    said = [m["content"] for m in session["messages"] if m["role"] == "assistant"]
    assert said == [text]
    assert [d["seq"] for d in lines] == list(range(1, len(lines) + 1))
    assert answer.json()["choices"][0]["message"]["content"].startswith("[code] ")


async def test_a_reload_with_a_bad_filter_changes_nothing_and_a_good_one_applies(
    start_daemon: Any, make_config: Callable[..., Any]
) -> None:
    rd = await start_daemon()
    daemon = rd.daemon
    bad = make_config(agents={"assistant": {"filters": [{"type": "redact", "patterns": ["x+"]}]}})
    with pytest.raises(ConfigError) as err:
        daemon.reload(bad)
    assert err.value.problems[0].startswith("agents.assistant.filters.0.patterns.0:")
    assert daemon.config.agents["assistant"].filters == []
    good = make_config(agents={"assistant": {"filters": [{"type": "block", "patterns": ["x"]}]}})
    daemon.reload(good)
    stream = daemon.streams.start(agent="assistant", messages=[{"role": "user", "content": "x"}])
    with trio.fail_after(20):
        await stream.wait()
    assert stream.terminal is not None
    assert stream.terminal.fields["error"]["code"] == "content_filtered"
    rd.cancel_scope.cancel()
