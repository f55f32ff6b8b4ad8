"""The admin socket: protocol, server, client and ``raafd ctl``, over real unix sockets."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from raafd.admin import ctl
from raafd.admin.client import DaemonNotRunning, admin_call
from raafd.admin.protocol import MAX_LINE, LineSplitter, LineTooLong, parse_request
from raafd.admin.server import AdminServer, AdminSocketInUse
from raafd.errors import BadRequest, NotFound, RaafdError
from raafd.metrics import Metrics

STATS = {
    "version": "0.1.0",
    "uptime": 12.5,
    "connections": {"open": 3, "total": 120},
    "draining": False,
}
CONNECTIONS = [
    {"id": "c1", "user": "alice", "streams": 2, "transport": "ws"},
    {"id": "c22", "user": None, "streams": 14, "transport": "sse"},
]


async def _stats(args: dict[str, Any]) -> Any:
    return STATS


async def _connections(args: dict[str, Any]) -> Any:
    return CONNECTIONS


async def _kick(args: dict[str, Any]) -> Any:
    if args["id"] != "c1":
        raise NotFound(f"no connection {args['id']!r}", field="args.id")
    return {"kicked": args["id"]}


async def _log_level(args: dict[str, Any]) -> Any:
    return {"level": args["level"]}


async def _echo(args: dict[str, Any]) -> Any:
    return args


async def _boom(args: dict[str, Any]) -> Any:
    raise RuntimeError("database password is hunter2")


async def _grouped(args: dict[str, Any]) -> Any:
    async def fail() -> None:
        raise NotFound("no such thing")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)


async def _unencodable(args: dict[str, Any]) -> Any:
    return {"when": object()}


HANDLERS = {
    "stats": _stats,
    "connections": _connections,
    "kick": _kick,
    "log-level": _log_level,
    "drain": _echo,
    "echo": _echo,
    "boom": _boom,
    "grouped": _grouped,
    "unencodable": _unencodable,
}


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    # Keeps log lines out of the captured stdout of the ctl tests, and lets tests read them.
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "admin.sock"


@pytest.fixture
async def server(nursery: trio.Nursery, sock_path: Path) -> AdminServer:
    srv = AdminServer(sock_path, HANDLERS, metrics=Metrics())
    with trio.fail_after(5):
        assert await nursery.start(srv.run) == sock_path
    return srv


class Raw:
    """A line-oriented test client that sends whatever bytes it is given."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        with trio.fail_after(5):
            await self.stream.send_all(data)

    async def line(self) -> bytes:
        with trio.fail_after(5):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    async def answer(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self.line())
        return answer

    async def ask(self, data: bytes) -> dict[str, Any]:
        await self.send(data)
        return await self.answer()


def exists(path: Path) -> bool:
    return path.exists()


def write(path: Path, text: str) -> None:
    path.write_text(text)


def read(path: Path) -> str:
    return path.read_text()


@asynccontextmanager
async def raw(path: Path) -> AsyncIterator[Raw]:
    with trio.fail_after(5):
        stream = await trio.open_unix_socket(str(path))
    async with stream:
        yield Raw(stream)


# --- framing and parsing (pure) ---------------------------------------------------------------


def test_splitter_joins_chunks_and_splits_lines() -> None:
    s = LineSplitter(max_line=10)
    assert s.feed(b'{"a"') == []
    assert s.feed(b":1}\n{}\n{") == [b'{"a":1}', b"{}"]
    assert s.end() == b"{"
    assert s.end() is None


def test_splitter_reports_an_oversize_line_once_and_recovers() -> None:
    s = LineSplitter(max_line=4)
    too_long = LineTooLong(4)
    assert s.feed(b"abcd\n") == [b"abcd"]  # exactly the limit is fine
    assert s.feed(b"abc") == []
    assert s.feed(b"de") == [too_long]  # reported as soon as the limit is passed
    assert s.feed(b"fghij") == []  # the rest of that line is skipped
    assert s.feed(b"k\nok\n") == [b"ok"]
    assert s.feed(b"toolong\nx\n") == [too_long, b"x"]
    assert s.end() is None


def test_parse_request_names_the_field() -> None:
    commands = {"stats", "kick", "log-level"}
    assert parse_request(b'{"cmd": "stats"}', commands).args == {}
    cases = {
        b'{"cmd": "kick", "args": {}}': "args.id",
        b'{"cmd": "kick", "args": {"id": 7}}': "args.id",
        b'{"cmd": "log-level", "args": {"level": "loud"}}': "args.level",
        b'{"cmd": "stats", "args": {"verbose": true}}': "args.verbose",
        b'{"cmd": "stats", "args": []}': "args",
        b'{"cmd": "stats", "extra": 1}': "extra",
        b'{"cmd": 5}': "cmd",
        b'{"cmd": "nope"}': "cmd",
        b'{"args": {}}': "cmd",
    }
    for line, field in cases.items():
        with pytest.raises(BadRequest) as info:
            parse_request(line, commands)
        assert info.value.field == field, line


# --- the server -------------------------------------------------------------------------------


async def test_round_trip(server: AdminServer, sock_path: Path) -> None:
    with trio.fail_after(5):
        assert await admin_call(sock_path, "stats") == STATS
        assert await admin_call(sock_path, "echo", {"x": [1, "two"]}) == {"x": [1, "two"]}
        assert await admin_call(sock_path, "kick", {"id": "c1"}) == {"kicked": "c1"}


async def test_many_requests_on_one_connection(server: AdminServer, sock_path: Path) -> None:
    async with raw(sock_path) as conn:
        # Pipelined in one write: answered in order, one line each.
        await conn.send(b'{"cmd": "stats"}\n{"cmd": "echo", "args": {"n": 2}}\n')
        assert (await conn.answer()) == {"ok": True, "result": STATS}
        assert (await conn.answer()) == {"ok": True, "result": {"n": 2}}
        assert (await conn.ask(b'{"cmd": "connections"}\n'))["result"] == CONNECTIONS


async def test_socket_is_private(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "run" / "raafd" / "admin.sock"
    with trio.fail_after(5):
        await nursery.start(AdminServer(path, HANDLERS).run)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


async def test_socket_file_is_removed_on_exit(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(AdminServer(sock_path, HANDLERS).run)
        assert exists(sock_path)
        nursery.cancel_scope.cancel()
    assert not exists(sock_path)


async def test_stale_socket_file_is_replaced(
    nursery: trio.Nursery, sock_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    # What a crashed daemon leaves: a socket file nobody listens on.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with trio.fail_after(5):
        await nursery.start(AdminServer(sock_path, HANDLERS).run)
        assert await admin_call(sock_path, "stats") == STATS
    assert any("stale" in entry["event"] for entry in logs)


async def test_second_server_refuses_while_first_is_live(
    server: AdminServer, sock_path: Path
) -> None:
    with trio.fail_after(5), pytest.raises(AdminSocketInUse) as info:
        await AdminServer(sock_path, HANDLERS).run()
    assert str(sock_path) in str(info.value)
    assert "another raafd daemon is already listening" in str(info.value)
    with trio.fail_after(5):  # the first one is untouched
        assert await admin_call(sock_path, "stats") == STATS


async def test_refuses_when_something_else_answers_on_the_path(sock_path: Path) -> None:
    # A live listener that holds no lock (an older daemon, another program): the probe sees it.
    other = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with other:
        await other.bind(str(sock_path))
        other.listen(1)
        with trio.fail_after(5), pytest.raises(AdminSocketInUse, match=r"admin\.sock"):
            await AdminServer(sock_path, HANDLERS).run()
        assert exists(sock_path)


async def test_refuses_to_replace_a_file_that_is_not_a_socket(sock_path: Path) -> None:
    write(sock_path, "precious")
    with trio.fail_after(5), pytest.raises(OSError, match="is not a socket"):
        await AdminServer(sock_path, HANDLERS).run()
    assert read(sock_path) == "precious"


async def test_bad_input_gets_errors_and_the_connection_goes_on(
    server: AdminServer, sock_path: Path
) -> None:
    bad = {
        b"{not json\n": None,
        b'{"cmd": "frobnicate"}\n': "cmd",
        b'{"args": {}}\n': "cmd",
        b"[1, 2]\n": None,
        b'{"cmd": "stats", "extra": 1}\n': "extra",
        b'{"cmd": "kick", "args": {"id": "c1", "who": 1}}\n': "args.who",
        b'{"cmd": "kick", "args": {"who": "c1"}}\n': "args.id",
        b"\xff\xfe\n": None,
        b"\n": None,
    }
    async with raw(sock_path) as conn:
        for line, field in bad.items():
            answer = await conn.ask(line)
            assert answer["ok"] is False, line
            assert answer["error"]["code"] == "bad_request", line
            assert answer["error"]["message"], line
            assert answer["error"].get("field") == field, line
        assert await conn.ask(b'{"cmd": "stats"}\n') == {"ok": True, "result": STATS}
    with trio.fail_after(5):  # and the server takes new connections
        assert await admin_call(sock_path, "stats") == STATS


async def test_oversize_line(server: AdminServer, sock_path: Path) -> None:
    def echo_line(size: int) -> bytes:
        head, tail = b'{"cmd": "echo", "args": {"x": "', b'"}}'
        return head + b"a" * (size - len(head) - len(tail)) + tail + b"\n"

    async with raw(sock_path) as conn:
        answer = await conn.ask(echo_line(MAX_LINE + 1000))
        assert answer["ok"] is False
        assert answer["error"]["code"] == "too_large"
        # The rest of the long line was skipped; the next line is read normally.
        assert await conn.ask(b'{"cmd": "stats"}\n') == {"ok": True, "result": STATS}
        at_limit = await conn.ask(echo_line(MAX_LINE))
        assert at_limit["ok"] is True
        assert len(at_limit["result"]["x"]) > MAX_LINE - 100


async def test_handler_errors(
    server: AdminServer, sock_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    async with raw(sock_path) as conn:
        not_found = await conn.ask(b'{"cmd": "kick", "args": {"id": "c9"}}\n')
        assert not_found == {
            "ok": False,
            "error": {"code": "not_found", "message": "no connection 'c9'", "field": "args.id"},
        }
        await conn.send(b'{"cmd": "boom"}\n')
        line = await conn.line()
        assert b"hunter2" not in line
        assert b"Traceback" not in line
        assert b"RuntimeError" not in line
        boom = json.loads(line)
        assert boom["ok"] is False
        assert boom["error"]["code"] == "internal"
        # A handler's nursery wraps errors in a group; the one RaafdError inside still shows.
        grouped = await conn.ask(b'{"cmd": "grouped"}\n')
        assert grouped["error"] == {"code": "not_found", "message": "no such thing"}
        unencodable = await conn.ask(b'{"cmd": "unencodable"}\n')
        assert unencodable["error"]["code"] == "internal"
        assert (await conn.ask(b'{"cmd": "stats"}\n'))["ok"] is True
    failures = [e for e in logs if e["event"] == "admin command failed"]
    assert [e["cmd"] for e in failures] == ["boom", "unencodable"]
    assert all(e["log_level"] == "error" and e["exc_info"] for e in failures)


async def test_client_raises_the_daemons_error(server: AdminServer, sock_path: Path) -> None:
    with trio.fail_after(5), pytest.raises(NotFound) as info:
        await admin_call(sock_path, "kick", {"id": "c9"})
    assert info.value.message == "no connection 'c9'"
    assert info.value.field == "args.id"
    with trio.fail_after(5), pytest.raises(RaafdError) as internal:
        await admin_call(sock_path, "boom")
    assert internal.value.code == "internal"


async def test_last_line_without_newline_is_answered(server: AdminServer, sock_path: Path) -> None:
    async with raw(sock_path) as conn:
        await conn.send(b'{"cmd": "stats"}')
        with trio.fail_after(5):
            await conn.stream.send_eof()
        assert await conn.answer() == {"ok": True, "result": STATS}
        with pytest.raises(EOFError):
            await conn.answer()


async def test_idle_connection_is_closed(
    nursery: trio.Nursery, sock_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    srv = AdminServer(sock_path, HANDLERS, idle_timeout=30)
    with trio.fail_after(5):
        await nursery.start(srv.run)
    async with raw(sock_path) as conn:
        assert (await conn.ask(b'{"cmd": "stats"}\n'))["ok"] is True
        start = trio.current_time()
        # Trickling bytes of an unfinished request does not keep the connection open.
        for _ in range(4):
            await trio.sleep(7)
            await conn.send(b" ")
        with trio.fail_after(100):  # virtual seconds
            assert await conn.stream.receive_some(100) == b""
        assert trio.current_time() - start == pytest.approx(30)


async def test_connections_are_bounded_but_all_served(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    srv = AdminServer(sock_path, HANDLERS, max_connections=2)
    with trio.fail_after(5):
        await nursery.start(srv.run)
    results: list[Any] = []

    async def one(i: int) -> None:
        results.append(await admin_call(sock_path, "echo", {"i": i}))

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(one, i)
    assert sorted(r["i"] for r in results) == list(range(20))


async def test_requests_are_counted(server: AdminServer, sock_path: Path) -> None:
    with trio.fail_after(5):
        await admin_call(sock_path, "stats")
        with pytest.raises(BadRequest):
            await admin_call(sock_path, "no-such-command")
    assert server.metrics is not None
    registry = server.metrics.registry
    sample = registry.get_sample_value
    assert sample("raafd_admin_requests_total", {"cmd": "stats", "ok": "true"}) == 1
    # Client text never becomes a label value.
    assert sample("raafd_admin_requests_total", {"cmd": "-", "ok": "false"}) == 1


async def test_client_when_no_daemon(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with trio.fail_after(5), pytest.raises(DaemonNotRunning) as info:
        await admin_call(path, "stats")
    assert str(info.value) == f"no raafd daemon is listening on {path}"


# --- raafd ctl --------------------------------------------------------------------------------


async def run_ctl(*argv: str, default_socket: Path | None = None) -> int:
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(lambda: ctl.main(list(argv), default_socket))


async def test_ctl_prints_a_listing_for_people(
    server: AdminServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_ctl("stats", "--socket", str(sock_path)) == 0
    out = capsys.readouterr().out
    assert out == (
        "version            0.1.0\n"
        "uptime             12.500\n"
        "connections.open        3\n"
        "connections.total     120\n"
        "draining           no\n"
    )


async def test_ctl_prints_a_table_for_lists(
    server: AdminServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_ctl("connections", default_socket=sock_path) == 0
    assert capsys.readouterr().out == (
        "ID   USER   STREAMS  TRANSPORT\nc1   alice        2  ws\nc22  -           14  sse\n"
    )


async def test_ctl_json_is_the_exact_result(
    server: AdminServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_ctl("--json", "stats", "--socket", str(sock_path)) == 0
    assert json.loads(capsys.readouterr().out) == STATS
    assert await run_ctl("connections", "--json", "--socket", str(sock_path)) == 0
    assert json.loads(capsys.readouterr().out) == CONNECTIONS
    assert await run_ctl("log-level", "debug", "--json", "--socket", str(sock_path)) == 0
    assert json.loads(capsys.readouterr().out) == {"level": "debug"}


async def test_ctl_error_answer(
    server: AdminServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_ctl("kick", "c9", "--socket", str(sock_path)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "raafd ctl: no connection 'c9' (not_found)\n"


async def test_ctl_finds_the_socket_through_config(
    server: AdminServer, sock_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "raafd.toml"
    write(config, f'[admin]\nsocket = "{sock_path}"\n')
    assert await run_ctl("kick", "c1", "--config", str(config)) == 0
    assert capsys.readouterr().out == "kicked  c1\n"


def test_ctl_config_problems_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "raafd.toml"
    config.write_text("[admin]\nsokcet = 1\n")
    assert ctl.main(["stats", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "admin.sokcet: unknown key (did you mean 'socket'?)" in err.splitlines()


def test_ctl_when_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nobody.sock"
    assert ctl.main(["stats", "--socket", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"raafd ctl: no daemon is listening on {path} (is raafd running?)\n"


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["log-level", "loud"], ["kick"], ["stats", "--timeout", "0"]],
)
def test_ctl_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(argv, Path("/nonexistent/admin.sock")) == 2
    assert "usage: raafd ctl" in capsys.readouterr().err


def test_render() -> None:
    assert ctl.render(None) == "ok"
    assert ctl.render([]) == "(none)"
    assert ctl.render({}) == "(empty)"
    assert ctl.render("done") == "done"
    assert ctl.render({"applied": ["logging.level"], "needs_restart": []}) == (
        "applied        logging.level\nneeds_restart  (none)"
    )
    assert ctl.render({"total": 2, "rooms": [{"name": "lobby", "members": 10}]}) == (
        "total  2\n\nrooms:\n  NAME   MEMBERS\n  lobby       10"
    )
