"""``raafd ctl``: send one admin command to a running daemon and print the answer.

For people the answer is a key/value listing (nested objects flattened to dotted keys, numbers
right-aligned) or a table (lists of objects); ``--json`` prints the result exactly, as JSON.

Exit status: 0 on success; 1 when no daemon answers or it answers an error (one line on
stderr); 2 for bad usage or a configuration that does not load.

The socket is ``--socket PATH``; else ``admin_socket_path`` of ``--config PATH``; else the
``default_socket`` the caller passes; else that of the configuration found by the usual lookup.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from raafd.admin.client import AdminPermissionDenied, DaemonNotRunning, admin_call_sync
from raafd.config import LOG_LEVELS, ConfigError, load_config
from raafd.errors import RaafdError

__all__ = ["build_parser", "main", "render"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

_COMMANDS: Final = {
    "stats": "the daemon's figures (connections, streams, process)",
    "reload": "re-read the configuration file (like SIGHUP)",
    "drain": "stop gracefully: stop accepting, let streams finish, exit",
    "log-level": "change the log level",
    "connections": "list open client connections",
    "streams": "list streams",
    "kick": "close one client connection (--room NAME: remove a user from a room)",
    "cancel": "cancel one stream",
    "rooms": "list chat rooms",
    "room": "show one room: attributes, members, head, message rate",
    "jobs": "list background jobs (`jobs purge --status S --older-than D` forgets old ones)",
    "job": "show a job, or `job retry ID` / `job cancel ID`",
    "events": "print event-bus events matching a pattern (--follow: keep printing)",
}
_FOLLOW_WAIT: Final = 10.0  # seconds each long poll of `events --follow` waits


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _add_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # The same options before and after the command; only the top level sets defaults, so
    # ``raafd ctl --json stats`` and ``raafd ctl stats --json`` both work.
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print the result as JSON"
    )
    parser.add_argument(
        "--socket", type=Path, metavar="PATH", default=default(None), help="admin socket path"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="read the admin socket path from this configuration file",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        default=default(60.0),
        help="give up waiting for the answer after this long (default 60)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raafd ctl", description="Talk to a running raafd daemon over its admin socket."
    )
    _add_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_options(common, defaults=False)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, text in _COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name == "log-level":
            p.add_argument("level", choices=LOG_LEVELS)
        elif name == "kick":
            p.add_argument(
                "id", help="the connection id (see `raafd ctl connections`), or with --room a user"
            )
            p.add_argument("--room", help="remove the user `id` from this room (its membership)")
        elif name == "room":
            p.add_argument("room", help="the room's name (see `raafd ctl rooms`)")
        elif name == "cancel":
            p.add_argument("id", help="the stream id (see `raafd ctl streams`)")
        elif name == "events":
            p.add_argument("pattern", help="subjects to show: '*' one segment, '>' the rest")
            p.add_argument(
                "--since", type=int, metavar="SEQ", help="from the history after this seq"
            )
            p.add_argument("--follow", action="store_true", help="keep printing new events")
        elif name == "jobs":
            p.add_argument("action", nargs="?", choices=["purge"], help="purge: forget old jobs")
            p.add_argument("--status", help="only jobs in this state (purge: the state to forget)")
            p.add_argument("--agent", help="only jobs of this agent")
            p.add_argument("--limit", type=int, default=50, help="at most this many (50)")
            p.add_argument(
                "--older-than",
                type=_duration,
                metavar="D",
                help="purge: jobs that ended longer ago than D (seconds, or 30m, 12h, 7d)",
            )
        elif name == "job":
            p.add_argument("words", nargs="+", metavar="[retry|cancel] ID", help="the job id")
    return parser


def _duration(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    scale = units.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 30m, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def main(argv: Sequence[str], default_socket: Path | None = None) -> int:
    """Run ``raafd ctl`` with ``argv`` (the words after ``ctl``); return the exit status."""
    try:
        ns = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed usage or help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    path = _socket_path(ns, default_socket)
    if path is None:
        return EXIT_USAGE
    if ns.cmd == "events":
        return _events(path, ns)
    args: dict[str, Any] = {}
    if ns.cmd == "log-level":
        args["level"] = ns.level
    elif ns.cmd == "kick" and ns.room is not None:
        ns.cmd = "room-kick"
        args = {"room": ns.room, "user": ns.id}
    elif ns.cmd in ("kick", "cancel"):
        args["id"] = ns.id
    elif ns.cmd == "room":
        args["room"] = ns.room
    elif ns.cmd == "jobs":
        if ns.action == "purge":
            if ns.status is None or ns.older_than is None:
                print("raafd ctl: jobs purge needs --status and --older-than", file=sys.stderr)
                return EXIT_USAGE
            ns.cmd = "jobs-purge"
            args = {"status": ns.status, "older_than": ns.older_than}
        else:
            args = {"limit": ns.limit}
            if ns.status is not None:
                args["status"] = ns.status
            if ns.agent is not None:
                args["agent"] = ns.agent
    elif ns.cmd == "job":
        words = ns.words
        if len(words) == 1:
            args = {"id": words[0], "action": "show"}
        elif len(words) == 2 and words[0] in ("retry", "cancel"):
            args = {"id": words[1], "action": words[0]}
        else:
            print("raafd ctl: job ID | job retry ID | job cancel ID", file=sys.stderr)
            return EXIT_USAGE

    try:
        result = _call(path, ns.cmd, args, ns.timeout)
    except _CallFailed as exc:
        return _fail(str(exc))
    if ns.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(result) + "\n")
    return EXIT_OK


class _CallFailed(Exception):
    """No answer, or an error answer: the one line to print."""


def _call(path: Path, cmd: str, args: dict[str, Any], timeout: float) -> Any:
    try:
        return admin_call_sync(path, cmd, args, timeout=timeout)
    except DaemonNotRunning as exc:
        raise _CallFailed(f"no daemon is listening on {exc.path} (is raafd running?)") from None
    except AdminPermissionDenied as exc:
        raise _CallFailed(exc.message) from None
    except RaafdError as exc:
        raise _CallFailed(f"{exc.message} ({exc.code})") from None
    except OSError as exc:
        raise _CallFailed(f"cannot talk to the daemon on {path}: {exc.strerror or exc}") from None


def _events(path: Path, ns: argparse.Namespace) -> int:
    """``events``: one answer, or (``--follow``) long polls until interrupted, each asking
    from the ``next`` seq the last answer gave. One line per event (JSON with ``--json``)."""
    since: int | None = ns.since
    wait = min(_FOLLOW_WAIT, ns.timeout / 2) if ns.follow else 0.0
    try:
        while True:
            args: dict[str, Any] = {"pattern": ns.pattern, "wait": wait}
            if since is not None:
                args["since"] = since
            try:
                result = _call(path, "events", args, ns.timeout)
            except _CallFailed as exc:
                return _fail(str(exc))
            lagged = result.get("lagged")
            if lagged:
                print(
                    f"# missed seq {lagged['missed_from']} to {lagged['missed_to']}"
                    " (no longer in the history)",
                    file=sys.stderr,
                )
            for event in result["events"]:
                sys.stdout.write(_event_line(event, as_json=ns.json) + "\n")
            sys.stdout.flush()
            since = result["next"]
            if not ns.follow:
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def _event_line(event: dict[str, Any], *, as_json: bool) -> str:
    if as_json:
        return orjson.dumps(event).decode()
    data = orjson.dumps(event["data"]).decode()
    return f"{event['seq']:>8}  {event['ts']:.3f}  {event['subject']}  {data}"


def _socket_path(ns: argparse.Namespace, default_socket: Path | None) -> Path | None:
    if ns.socket is not None:
        return Path(ns.socket)
    if ns.config is None and default_socket is not None:
        return default_socket
    try:
        config, _ = load_config(ns.config)
    except ConfigError as exc:
        where = f" in {exc.source}" if exc.source else ""
        print(f"raafd ctl: the configuration{where} does not load:", file=sys.stderr)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
    return config.admin_socket_path


def _fail(message: str) -> int:
    print(f"raafd ctl: {message}", file=sys.stderr)
    return EXIT_FAILED


# --- rendering for people ---------------------------------------------------------------------


def render(result: Any) -> str:
    """A readable text form of an admin result (no trailing newline)."""
    if result is None:
        return "ok"
    if isinstance(result, dict):
        return _render_mapping(result)
    if isinstance(result, list):
        if not result:
            return "(none)"
        if all(isinstance(row, dict) for row in result):
            return _table(result)
        return "\n".join(_cell(item) for item in result)
    return _cell(result)


def _render_mapping(mapping: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = []
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in _flatten(mapping):
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            tables.append((key, value))
        else:
            pairs.append((key, value))
    parts = [_key_values(pairs)] if pairs else []
    for key, rows in tables:
        body = "\n".join("  " + line for line in _table(rows).splitlines())
        parts.append(f"{key}:\n{body}")
    return "\n\n".join(parts) if parts else "(empty)"


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name))
        else:
            out.append((name, value))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.3f}"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, list):
        if not value:
            return "(none)"
        if not any(isinstance(v, dict | list) for v in value):
            return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict) and not value:
        return "(none)"
    return orjson.dumps(value).decode()


def _key_values(pairs: list[tuple[str, Any]]) -> str:
    key_width = max(len(key) for key, _ in pairs)
    number_width = max((len(_cell(v)) for _, v in pairs if _is_number(v)), default=0)
    lines = []
    for key, value in pairs:
        text = _cell(value).rjust(number_width) if _is_number(value) else _cell(value)
        lines.append(f"{key.ljust(key_width)}  {text}".rstrip())
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> str:
    flat = [dict(_flatten(row)) for row in rows]
    columns: list[str] = []
    for row in flat:
        columns.extend(key for key in row if key not in columns)
    numeric = {
        col: all(_is_number(row[col]) for row in flat if row.get(col) is not None)
        and any(row.get(col) is not None for row in flat)
        for col in columns
    }
    cells = [[_cell(row.get(col)) for col in columns] for row in flat]
    headers = [col.upper() for col in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if numeric[col] else v.ljust(w)
            for v, w, col in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])
