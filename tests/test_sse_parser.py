"""The sans-IO SSE parser: spec cases, bounds, and "any chunking gives the same events"."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raafd.providers.sse import ServerSentEvent, SSEError, SSEParser


def parse(*chunks: bytes) -> list[ServerSentEvent]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def parse_bytewise(data: bytes) -> list[ServerSentEvent]:
    return parse(*(data[i : i + 1] for i in range(len(data))))


# --- the spec's cases -------------------------------------------------------------------------


def test_multi_line_data_is_joined_with_newlines() -> None:
    data = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert parse(data) == [ServerSentEvent(data="YHOO\n+2\n10")]


def test_comments_and_blank_blocks_dispatch_nothing() -> None:
    data = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert parse(data) == [
        ServerSentEvent(data="first event", id="1"),
        ServerSentEvent(data="second event", id=""),  # a bare ``id`` resets the last id
        ServerSentEvent(data=" third event"),  # only one space is dropped
    ]


def test_empty_data_fields() -> None:
    assert parse(b"data\n\ndata\ndata\n\ndata:\n") == [
        ServerSentEvent(data=""),
        ServerSentEvent(data="\n"),
    ]  # the last block never ends, so it is not dispatched


def test_event_name_id_persistence_and_retry() -> None:
    parser = SSEParser()
    events = parser.feed(b"event: add\nid: 7\nretry: 1500\ndata: a\n\ndata: b\n\nretry: x1\n\n")
    assert events == [
        ServerSentEvent(data="a", event="add", id="7", retry=1500),
        ServerSentEvent(data="b", event="message", id="7", retry=None),
    ]
    assert parser.reconnection_time == 1500  # the invalid ``retry: x1`` was ignored


def test_id_with_nul_is_ignored_and_unknown_fields_too() -> None:
    assert parse(b"id: 1\n\nid: a\x00b\nfoo: bar\ndata: x\n\n") == [
        ServerSentEvent(data="x", id="1")
    ]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(eol: bytes) -> None:
    data = b"event: e" + eol + b"data: 1" + eol + b"data: 2" + eol + eol
    expected = [ServerSentEvent(data="1\n2", event="e")]
    assert parse(data) == expected
    assert parse_bytewise(data) == expected


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    assert parse(b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n") == [
        ServerSentEvent(data="a"),
        ServerSentEvent(data="b"),
    ]


def test_bom_is_dropped_once_even_when_split() -> None:
    assert parse(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [ServerSentEvent(data="a")]
    # a second BOM is part of the field name, which makes it an unknown field
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == [ServerSentEvent(data="b")]


def test_utf8_character_split_across_chunks() -> None:
    data = "data: héllo ✓\n\n".encode()
    assert parse(*(data[i : i + 1] for i in range(len(data)))) == [ServerSentEvent(data="héllo ✓")]


def test_incomplete_event_is_pending_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n') == []
    assert parser.pending
    assert parser.feed(b"\n") == [ServerSentEvent(data='{"a": 1}')]
    assert not parser.pending


def test_a_line_past_max_line_raises() -> None:
    parser = SSEParser(max_line=16)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 32)
    with pytest.raises(SSEError):
        SSEParser(max_line=16).feed(b"data: " + b"x" * 32 + b"\n")


def test_an_event_past_max_event_raises() -> None:
    parser = SSEParser(max_event=10)
    with pytest.raises(SSEError):
        parser.feed(b"data: 123456\ndata: 123456\n")


def test_openai_stream_shape() -> None:
    data = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n: keep-alive\n\ndata: [DONE]\n\n'
    assert [e.data for e in parse_bytewise(data)] == [
        '{"choices":[{"delta":{"content":"Hi"}}]}',
        "[DONE]",
    ]


# --- properties -------------------------------------------------------------------------------

_field_names = st.sampled_from(["data", "event", "id", "retry", "foo", ""])
_values = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_eols = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Byte streams in the shape of SSE, with every kind of line and line ending."""
    out = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["field", "bare", "comment", "blank"]))
        if kind == "field":
            space = draw(st.sampled_from(["", " ", "  "]))
            line = f"{draw(_field_names)}:{space}{draw(_values)}".encode()
        elif kind == "bare":
            line = draw(_field_names).encode()
        elif kind == "comment":
            line = b":" + draw(_values).encode()
        else:
            line = b""
        out += line + draw(_eols)
    return out + draw(st.binary(max_size=8))  # and maybe an unterminated tail


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@settings(max_examples=300, deadline=None)
@given(data=sse_streams(), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_any_chunking_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    whole = parse(data)
    assert parse(*_cut(data, cuts)) == whole
    assert parse_bytewise(data) == whole


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_arbitrary_bytes_never_break_the_parser(data: bytes, cuts: list[int]) -> None:
    assert parse(*_cut(data, cuts)) == parse(data)


def test_data_only_reads_whole_one_line_data_events() -> None:
    parser = SSEParser()
    assert parser.data_only(b"data: a\n\n") is None  # the first bytes: a BOM is checked by feed
    assert parser.feed(b"data: a\n\n") == [ServerSentEvent(data="a")]
    assert parser.data_only(b'data: {"x":1}\n\ndata: [DONE]\n\n') == [b'{"x":1}', b"[DONE]"]
    assert parser.data_only(b"data: \n\n") == [b""]
    refused = [
        b"event: e\ndata: a\n\n",  # another field
        b"data: a\ndata: b\n\n",  # two data lines, one event
        b"data: a\r\n\r\n",  # CR
        b"data: a\n",  # not ended
        b"data:a\n\n",  # no space after the colon
        b": ping\n\n",  # a comment
        b"\n\n",
    ]
    assert [parser.data_only(chunk) for chunk in refused] == [None] * len(refused)
    parser.feed(b"data: part")  # now the parser holds half a line
    assert parser.data_only(b"data: a\n\n") is None


@settings(max_examples=300, deadline=None)
@given(data=sse_streams(), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_data_only_agrees_with_feed(data: bytes, cuts: list[int]) -> None:
    fast, slow = SSEParser(max_line=24), SSEParser(max_line=24)
    got, want = [], []
    for piece in [*_cut(data, cuts), b"data: tail\n\n"]:
        values = fast.data_only(piece)
        try:
            want += [event.data for event in slow.feed(piece)]
        except SSEError:
            assert values is None  # what feed refuses is left to feed
            return
        if values is None:
            got += [event.data for event in fast.feed(piece)]
        else:
            got += [value.decode("utf-8", "replace") for value in values]
    assert got == want
    assert (fast.last_event_id, fast.reconnection_time, fast.pending) == (
        slow.last_event_id,
        slow.reconnection_time,
        slow.pending,
    )


_event_names = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=8
)
_data_texts = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.none() | _event_names, _data_texts), max_size=10),
    eols=st.lists(_eols, min_size=1, max_size=50),
    cuts=st.lists(st.integers(0, 600), max_size=20),
)
def test_encoded_events_round_trip(
    events: list[tuple[str | None, str]], eols: list[bytes], cuts: list[int]
) -> None:
    lines: list[str] = []
    for name, data in events:
        if name is not None:
            lines.append(f"event: {name}")
        lines.extend(f"data: {part}" for part in data.split("\n"))
        lines.append("")
    out, previous = b"", b""
    for i, line in enumerate(lines):
        eol = eols[i % len(eols)]
        if previous == b"\r" and line == "" and eol == b"\n":
            eol = b"\r\n"  # CR then LF would be one CRLF line ending, merging two lines
        out += line.encode() + eol
        previous = eol
    expected = [ServerSentEvent(data=data, event=name or "message") for name, data in events]
    assert parse(*_cut(out, cuts)) == expected
