"""``raafd serve | check-config | ctl | chat | version``."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from raafd import __version__
from raafd.config import Config, ConfigError, load_config
from raafd.logging import configure_logging, get_logger
from raafd.streams.filters import build_filters

__all__ = ["main", "serve"]

EXIT_CONFIG = 2
EXIT_FORCED = 130


def _print_problems(err: ConfigError) -> None:
    for line in err.problems:
        print(line, file=sys.stderr)


async def serve(config: Config, config_path: Path | None) -> int:
    """Run the daemon until it has drained; handle SIGTERM, SIGINT (twice forces) and SIGHUP."""
    from raafd.daemon import Daemon
    from raafd.metrics import observing_gc

    log = get_logger("raafd")
    daemon = Daemon(config, config_path)
    forced = False
    # What exists now (modules, config, the daemon's parts) lives as long as the process: move
    # it out of the collector's sight, so that a full collection walks only what came later.
    gc.collect()
    gc.freeze()
    daemon.frozen_objects = gc.get_freeze_count()  # walks them: once here, not per stats call
    # Each collection stops every stream. Young ones are kept small and frequent, middle ones
    # (every running stream walked) rare; see conf/raafd.toml and docs/performance.md.
    gc.set_threshold(*config.server.gc_thresholds)

    async def handle_signals(receiver: AsyncIterator[int], cancel_scope: trio.CancelScope) -> None:
        nonlocal forced
        stopping = False
        async for signum in receiver:
            if signum == signal.SIGHUP:
                try:
                    daemon.reload_from_file()
                except ConfigError:
                    pass  # logged by the daemon; the running configuration stays
            elif not stopping:
                stopping = True
                log.info("signal received; draining", signal=signal.Signals(signum).name)
                daemon.request_drain()
            elif signum == signal.SIGINT:
                log.warning("second interrupt; exiting now")
                forced = True
                cancel_scope.cancel()

    with (
        observing_gc(daemon.metrics),
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as receiver,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_signals, receiver, nursery.cancel_scope)
            await daemon.run()
            nursery.cancel_scope.cancel()
    return EXIT_FORCED if forced else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        config, path = load_config(args.config)
        build_filters(config.agents)  # the daemon builds them again; said here as problems
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    from raafd.admin.server import AdminSocketInUse

    rc = 1
    try:
        rc = trio.run(serve, config, path)
    except* (OSError, AdminSocketInUse) as group:
        for exc in _leaves(group):
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            get_logger("raafd").error("cannot start", error=message)
    return rc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _cmd_check_config(args: argparse.Namespace) -> int:
    from raafd.security.authenticator import build_authenticator

    try:
        config, path = load_config(args.config)
        build_filters(config.agents)  # patterns, and the entry points the agents name
        build_authenticator(config.auth)  # reads the JWT keys and JWKS files
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    where = str(path) if path else "built-in defaults"
    listen = config.server.unix_socket or f"{config.server.host}:{config.server.port}"
    print(
        f"ok: {where}: listen {listen}, {len(config.agents)} agent(s), "
        f"{len(config.providers)} provider(s), state in {config.state.dir}"
    )
    return 0


def _cmd_ctl(rest: list[str]) -> int:
    from raafd.admin import ctl

    return ctl.main(rest)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"raafd {__version__}")
    return 0


def _cmd_chat(rest: list[str]) -> int:
    from raafd.client import chat

    rc: int = chat.main(rest)
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raafd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the daemon in the foreground")
    p_serve.add_argument("--config", help="config file (default: lookup order, see docs)")
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("config_pos", nargs="?", help=argparse.SUPPRESS)
    p_check.add_argument("--config", help="config file")
    sub.add_parser("ctl", help="talk to a running daemon's admin socket", add_help=False)
    sub.add_parser("chat", help="interactive terminal chat client", add_help=False)
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # ctl and chat parse their own arguments.
    if args_list and args_list[0] == "ctl":
        return _cmd_ctl(args_list[1:])
    if args_list and args_list[0] == "chat":
        return _cmd_chat(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "check-config":
        args.config = args.config or args.config_pos
        return _cmd_check_config(args)
    return _cmd_version(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
