"""Client frames: raafd's parser reports what wsproto's frame protocol reports for the same bytes
fed in the same pieces (valid, fragmented, interleaved, malformed), and server frames encode."""

from __future__ import annotations

import os
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from raafd.gateway.frames import ClientFrames, close_frame, ping_frame, text_frame


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: str = "minimal",
    mask: bytes = b"\x11\x22\x33\x44",
) -> bytes:
    n = len(payload)
    if length == "minimal":
        length = "short" if n < 126 else "two" if n < 1 << 16 else "eight"
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    flag = 0x80 if masked else 0
    if length == "short":
        head += bytes((flag | min(n, 125),)) if n < 126 else bytes((flag | 125,))
    elif length == "two":
        head += bytes((flag | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((flag | 127,)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def normal(event: Event) -> tuple[Any, ...]:
    if isinstance(event, TextMessage):
        return ("text", event.data, event.frame_finished, event.message_finished)
    if isinstance(event, BytesMessage):
        return ("bytes", bytes(event.data), event.frame_finished, event.message_finished)
    if isinstance(event, Ping):
        return ("ping", bytes(event.payload))
    if isinstance(event, Pong):
        return ("pong", bytes(event.payload))
    assert isinstance(event, CloseConnection)
    return ("close", int(event.code), event.reason)


def both(pieces: list[bytes]) -> tuple[list[list[tuple[Any, ...]]], list[list[tuple[Any, ...]]]]:
    """The events after each piece, from raafd's parser and from wsproto's."""
    ours, theirs = ClientFrames(), Connection(ConnectionType.SERVER)
    got: list[list[tuple[Any, ...]]] = []
    want: list[list[tuple[Any, ...]]] = []
    for piece in pieces:
        ours.receive_data(piece)
        got.append([normal(e) for e in ours.events()])
        if any(e[0] == "close" for events in want for e in events):
            want.append([])  # wsproto ignores (or would refuse) data after a close
            continue
        theirs.receive_data(piece)
        want.append([normal(e) for e in theirs.events()])
    return got, want


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_texts = st.text(max_size=40).map(str.encode)
_bytes = st.binary(max_size=40)
_close_payloads = st.one_of(
    st.just(b""),
    st.binary(max_size=1),
    st.tuples(
        st.one_of(
            st.sampled_from([999, 1000, 1001, 1002, 1004, 1005, 1006, 1015, 2999, 3000, 4999]),
            st.integers(0, 65535),
        ),
        st.one_of(_texts, st.binary(max_size=6)),
    ).map(lambda cr: struct.pack("!H", cr[0]) + cr[1]),
)


_mostly = st.integers(0, 19).map(bool)  # True but one time in twenty


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text"] * 4 + ["binary", "cont", "cont", "ping", "pong", "close"]))
    if not draw(_mostly):
        kind = "odd"
    opcode = {"text": 1, "binary": 2, "cont": 0, "ping": 9, "pong": 10, "close": 8}.get(kind)
    if opcode is None:
        opcode = draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
    if kind == "text":
        payload = draw(
            _texts if draw(_mostly) else st.one_of(_texts.map(lambda t: t + b"\xff"), _bytes)
        )
    elif kind == "close":
        payload = draw(_close_payloads)
    elif kind in ("ping", "pong"):
        payload = draw(st.one_of(_bytes, st.binary(min_size=126, max_size=130)))
    else:
        payload = draw(st.one_of(_texts, _bytes, st.binary(min_size=200, max_size=70_000)))
    return client_frame(
        opcode,
        payload,
        fin=draw(st.booleans()) if kind in ("text", "binary", "cont") else draw(_mostly),
        rsv=0 if draw(_mostly) else draw(st.integers(0, 7)),
        masked=draw(_mostly),
        length=draw(st.sampled_from(["minimal"] * 8 + ["short", "two", "eight"])),
        mask=draw(st.binary(min_size=4, max_size=4)),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(frames(), max_size=12),
    st.lists(st.tuples(st.integers(0, 12), st.binary(min_size=1, max_size=12)), max_size=1),
    st.lists(st.integers(0, 1 << 20), max_size=12),
)
def test_events_are_wsprotos_for_any_bytes_in_any_pieces(
    parts: list[bytes], junk: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    for at, noise in junk:  # now and then, bytes that are no frame
        parts.insert(at, noise)
    data = b"".join(parts)
    got, want = both(split(data, cuts))
    assert got == want


def test_a_fragmented_text_message_with_a_ping_between_split_byte_by_byte() -> None:
    text = "héllo ✓ wörld".encode()
    data = (
        client_frame(1, text[:5], fin=False)
        + client_frame(9, b"hb")
        + client_frame(0, text[5:], fin=True)
        + client_frame(8, struct.pack("!H", 1000) + b"bye")
    )
    got, want = both([data[i : i + 1] for i in range(len(data))])
    assert got == want
    flat = [e for events in got for e in events]
    assert "".join(e[1] for e in flat if e[0] == "text") == "héllo ✓ wörld"
    assert ("ping", b"hb") in flat and flat[-1] == ("close", 1000, "bye")


def test_protocol_errors_close_1002_or_1007_and_stop_parsing() -> None:
    cases = [
        (client_frame(1, b"x", masked=False), 1002),
        (client_frame(1, b"x", rsv=4), 1002),
        (client_frame(3, b"x"), 1002),
        (client_frame(9, b"x", fin=False), 1002),
        (client_frame(0, b"x"), 1002),
        (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002),
        (client_frame(1, b"x", length="two"), 1002),
        (client_frame(1, b"\xff"), 1007),
        (client_frame(8, struct.pack("!H", 1005)), 1002),
        (client_frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),
    ]
    for data, code in cases:
        got, want = both([data + client_frame(1, b"after")])
        assert got == want
        assert got[0][-1][:2] == ("close", code)  # last: nothing after it is parsed


def test_length_encodings_at_their_bounds() -> None:
    for size, length, ok in [
        (125, "two", False),
        (126, "two", True),
        (65_535, "eight", False),
        (65_536, "eight", True),
    ]:
        got, want = both([client_frame(2, b"x" * size, length=length)])
        assert got == want
        assert (got[0][-1][0] == "bytes") is ok, (size, length)


def test_a_large_frame_in_pieces() -> None:
    payload = os.urandom(300_000)
    data = client_frame(2, payload, mask=b"\x01\x02\x03\x04")
    got, want = both(split(data, [3, 7, 1000, 1001, 65_536, 200_003]))
    assert got == want
    assert b"".join(e[1] for events in got for e in events) == payload


def test_server_frames() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert text_frame(b"x" * 70_000)[:10] == b"\x81\x7f" + struct.pack("!Q", 70_000)
    assert close_frame(4001, "slow") == b"\x88\x06\x0f\xa1slow"
    assert ping_frame(b"hb") == b"\x89\x02hb"
