"""Config: every class of mistake gets a `path: reason` line; env overrides; the sample file."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import attrs
import pytest

from raafd.config import Config, ConfigError, RateConfig, apply_env, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    return info.value.problems


def test_defaults_match_protocol() -> None:
    cfg = parse_config({})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.state.dir == "./var"
    assert list(cfg.agents) == ["assistant"]
    assert cfg.agents["assistant"].provider == "demo"
    assert cfg.providers["demo"].type == "demo"


def test_unknown_key_suggests_the_near_one() -> None:
    assert problems("[server]\nprot = 1") == ["server.prot: unknown key (did you mean 'port'?)"]
    assert problems("[sever]\nport = 1") == ["sever: unknown key (did you mean 'server'?)"]


def test_wrong_type() -> None:
    assert problems('[server]\nport = "80"') == [
        "server.port: expected an integer, got the string '80'"
    ]
    assert problems("[streams]\nretention = true") == [
        "streams.retention: expected a number, got true"
    ]
    assert problems("server = 3") == ["server: expected a table"]
    assert problems("[auth]\ntokens = [1]") == ["auth.tokens.0: expected a string, got 1"]


def test_out_of_range_reports_every_problem() -> None:
    assert problems("[server]\nport = 70000\nshutdown_grace = -1") == [
        "server.port: must be between 0 and 65535, got 70000",
        "server.shutdown_grace: must be 0 or more, got -1.0",
    ]
    assert problems("[server]\ngc_thresholds = [10000, 50]") == [
        "server.gc_thresholds: must be three integers (young, middle, old), got 2"
    ]
    assert problems("[server]\ngc_thresholds = [50, 10, 10]") == [
        "server.gc_thresholds: the first must be 100 or more and the others 1 or more,"
        " got [50, 10, 10]"
    ]
    assert problems('[server]\ngc_thresholds = [1000, "a", 1]') == [
        "server.gc_thresholds.1: expected an integer, got the string 'a'"
    ]
    assert problems('[logging]\nlevel = "loud"') == [
        "logging.level: must be one of debug, info, warning, error, critical; got 'loud'"
    ]


def test_store_backend_is_sqlite_or_memory_and_needs_a_restart() -> None:
    from raafd.config import diff_configs, is_reloadable

    assert parse_config({}).store.backend == "sqlite"
    memory = parse_config({"store": {"backend": "memory"}})
    assert memory.store.backend == "memory"
    assert problems('[store]\nbackend = "redis"') == [
        "store.backend: must be one of sqlite, memory; got 'redis'"
    ]
    assert problems("[store]\nbackend = 1") == ["store.backend: expected a string, got 1"]
    assert diff_configs(parse_config({}), memory) == ["store.backend"]
    assert not is_reloadable("store.backend")


def test_cross_references() -> None:
    found = problems('default_agent = "a"\n[agents.a]\nprovider = "demp"')
    assert found == [
        "agents.a.provider: no provider named 'demp' is configured (did you mean 'demo'?)"
    ]
    assert problems('[providers.x]\ntype = "openai"') == [
        "providers.x.base_url: required for a openai provider"
    ]


def test_public_listener_needs_auth_or_explicit_consent() -> None:
    (line,) = problems('[server]\nhost = "0.0.0.0"')
    assert line.startswith("server.host: '0.0.0.0' is not a loopback address")
    parse_config(tomllib.loads('[server]\nhost = "0.0.0.0"\n[auth]\ntokens = ["t"]'), {})
    text = '[server]\nhost = "0.0.0.0"\n[auth]\ntokens_env = "T"'
    parse_config(tomllib.loads(text), {"T": "t1,t2"})
    parse_config(tomllib.loads('[server]\nhost = "0.0.0.0"\nallow_public_without_auth = true'))
    # A token source that yields nothing is no auth: the guard holds, beside the source's line.
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), {})
    assert [line.split(":")[0] for line in info.value.problems] == [
        "auth.tokens_env",
        "server.host",
    ]


def test_the_echo_endpoint_is_never_public_without_auth() -> None:
    public = '[server]\nhost = "0.0.0.0"\nallow_public_without_auth = true\n'
    (line,) = problems(public + '[websocket]\necho_path = "/v1/echo"')
    assert line.startswith("websocket.echo_path: never served on a non-loopback host")
    parse_config(tomllib.loads('[websocket]\necho_path = "/v1/echo"'))  # loopback
    text = '[server]\nhost = "0.0.0.0"\n[auth]\ntokens = ["t"]\n[websocket]\necho_path = "/e"'
    parse_config(tomllib.loads(text), {})
    for bad in ("echo", "/v1/ws", "/e?x=1"):
        (line,) = problems(f'[websocket]\necho_path = "{bad}"')
        assert line.startswith("websocket.echo_path: a path such as /v1/echo"), line


def test_a_token_source_that_yields_no_token_fails_closed() -> None:
    env_source = tomllib.loads('[auth]\ntokens_env = "RAAFD_TOKENS"')
    unset = "auth.tokens_env: the environment variable RAAFD_TOKENS is not set; set it, or remove"
    blank = "auth.tokens_env: the environment variable RAAFD_TOKENS is empty or holds no token;"
    for environ, start in (
        ({}, unset),
        ({"RAAFD_TOKENS": ""}, unset),
        ({"RAAFD_TOKENS": " , "}, blank),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(env_source, environ)
        (line,) = info.value.problems
        assert line.startswith(start), line
    good = parse_config(env_source, {"RAAFD_TOKENS": " a, ,b "})
    assert good.auth.all_tokens({"RAAFD_TOKENS": " a, ,b "}) == {"a", "b"}
    assert problems('[auth]\ntokens = ["", "  "]') == [
        "auth.tokens: every entry is empty, so it holds no token"
    ]
    assert parse_config({"auth": {"tokens": ["k", " "]}}).auth.all_tokens({}) == {"k"}
    assert parse_config({}).auth.all_tokens({}) == frozenset()  # no source: auth is off


def test_the_daemon_refuses_a_token_source_that_yields_nothing() -> None:
    from raafd.daemon import Daemon

    config = parse_config({"auth": {"tokens_env": "RAAFD_TOKENS"}}, {"RAAFD_TOKENS": "k"})
    with pytest.raises(ConfigError) as info:
        Daemon(config, environ={"RAAFD_TOKENS": ""})
    assert info.value.problems[0].startswith("auth.tokens_env: ")
    authenticator = Daemon(config, environ={"RAAFD_TOKENS": "k"}).authenticator()
    assert authenticator.enabled and authenticator.authenticate("k").user.startswith("token-")


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad), {})
    (line,) = info.value.problems
    assert line.startswith(f"{bad}: TOML syntax error") and "line 2" in line


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), {})
    assert info.value.problems == [f"{missing}: cannot read file: No such file or directory"]


def test_env_override_applies_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n")
    cfg, _ = load_config(str(path), {"RAAFD_SERVER__PORT": "9100", "RAAFD_LOGGING__LEVEL": "debug"})
    assert cfg.server.port == 9100 and cfg.logging.level == "debug"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {"RAAFD_SERVER__PORT": "high"})
    assert info.value.problems == ["server.port: expected an integer, got the string 'high'"]
    assert apply_env({}, {"RAAFD_AGENTS__BOT__MODEL": "m", "OTHER": "x"}) == {
        "agents": {"bot": {"model": "m"}}
    }


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {})[1] is None  # built-in defaults
    (tmp_path / "raafd.toml").write_text("[server]\nport = 1111\n")
    assert load_config(None, {})[0].server.port == 1111
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 2222\n")
    assert load_config(None, {"RAAFD_CONFIG": str(other)})[0].server.port == 2222
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[server]\nport = 3333\n")
    assert load_config(str(explicit), {"RAAFD_CONFIG": str(other)})[0].server.port == 3333


def _paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for a in attrs.fields(cls):
        t = hints[a.name]
        if t is RateConfig:
            out.append(f"{prefix}{a.name}")  # an inline table: { rate = …, burst = … }
        elif isinstance(t, type) and attrs.has(t):
            out += _paths(t, f"{prefix}{a.name}.")
        elif typing.get_origin(t) is not dict or not attrs.has(typing.get_args(t)[1]):
            out.append(f"{prefix}{a.name}")
    return out


def test_sample_config_is_the_defaults_and_lists_every_option() -> None:
    sample = ROOT / "conf" / "raafd.toml"
    cfg, _ = load_config(str(sample), {})
    assert cfg == Config()
    text = sample.read_text()
    hints = typing.get_type_hints(Config)
    for path in _paths(Config):
        key = path.rsplit(".", 1)[-1]
        assert f"\n{key} =" in text or f"\n# {key} =" in text, f"{path} is not in conf/raafd.toml"
    for section in ("providers", "agents", "tools"):
        value_cls = typing.get_args(hints[section])[1]
        for a in attrs.fields(value_cls):
            assert f"\n{a.name} =" in text or f"\n# {a.name} =" in text, f"{section}.*.{a.name}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raafd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_cli(tmp_path: Path) -> None:
    ok = _cli("check-config", str(ROOT / "conf" / "raafd.toml"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nprot = 1\nport = "x"\n[logging]\nlevel = "loud"\n')
    out = _cli("check-config", "--config", str(bad))
    assert out.returncode == 2
    assert sorted(out.stderr.splitlines()) == [
        "logging.level: must be one of debug, info, warning, error, critical; got 'loud'",
        "server.port: expected an integer, got the string 'x'",
        "server.prot: unknown key (did you mean 'port'?)",
    ]


def test_a_wrong_type_does_not_hide_the_other_problems() -> None:
    found = problems(
        '[server]\nport = "x"\nmax_connections = 0\nbacklog = true\ngc_thresholds = [1]\n'
        '[streams]\nretention = -1\nmax_streams = "many"\n'
        '[providers.p]\ntype = "bogus"\nretry_base = []\n'
        '[agents.a]\nmax_turns = 0\nprovider = "p"\n'
        '[logging]\nlevel = "loud"\nformat = 1\n'
    )
    assert sorted(found) == [
        "agents.a.max_turns: must be between 1 and 1000, got 0",
        "logging.format: expected a string, got 1",
        "logging.level: must be one of debug, info, warning, error, critical; got 'loud'",
        "providers.p.retry_base: expected a number, got an array",
        "providers.p.type: must be one of demo, openai, anthropic, ollama; got 'bogus'",
        "server.backlog: expected an integer, got true",
        "server.gc_thresholds: must be three integers (young, middle, old), got 1",
        "server.max_connections: must be greater than 0, got 0",
        "server.port: expected an integer, got the string 'x'",
        "streams.max_streams: expected an integer, got the string 'many'",
        "streams.retention: must be 0 or more, got -1.0",
    ]


def test_check_config_and_serve_refuse_an_empty_token_source(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(f'[auth]\ntokens_env = "RAAFD_TEST_TOKENS"\n[state]\ndir = "{tmp_path}"\n')
    line = "auth.tokens_env: the environment variable RAAFD_TEST_TOKENS is not set; set it,"
    for command in ("check-config", "serve"):
        out = _cli(command, "--config", str(path))  # RAAFD_TEST_TOKENS is not in its env
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.startswith(line) and len(out.stderr.splitlines()) == 1, out.stderr


def test_tool_and_handoff_references() -> None:
    assert problems('[agents.assistant]\ntools = ["clok"]') == [
        "agents.assistant.tools.0: no tool named 'clok' is configured (did you mean 'clock'?)"
    ]
    (line,) = problems('[tools."bad name"]\ntype = "clock"')
    assert line.startswith("tools.bad name: a tool name must be")
    (line,) = problems('[tools.w]\nurl = "http://x"\nparameters = { type = "nonsense" }')
    assert line.startswith("tools.w.parameters") and "JSON Schema" in line
    assert problems('[agents.assistant]\nhandoffs = ["nobody"]') == [
        "agents.assistant.handoffs.0: no agent named 'nobody' is configured"
    ]


def test_merge_reloadable_takes_reloadable_keys_and_keeps_the_rest() -> None:
    from raafd.config import merge_reloadable

    running = parse_config({"server": {"port": 8080}})
    new = parse_config(
        {
            "server": {"port": 9090, "shutdown_grace": 3.0},
            "websocket": {"max_frame": 4096, "send_queue": 8},
            "logging": {"level": "debug"},
            "breaker": {"failure_threshold": 2},
        }
    )
    merged = merge_reloadable(running, new)
    assert merged.server.port == 8080 and merged.server.shutdown_grace == 3.0
    assert merged.websocket.max_frame == 4096 and merged.websocket.send_queue == 256
    assert merged.logging.level == "debug" and merged.breaker.failure_threshold == 2
