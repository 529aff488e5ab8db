"""Settings: defaults, flags, environment, token file, and errors that name the option."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.__main__ import main
from agent.config import AgentConfig, load_config, split_server
from common.settings import SettingsError


def test_defaults() -> None:
    config = load_config(["--server", "dispatch.example:7443"], {})
    assert config.server == "dispatch.example:7443"
    assert config.token is None
    assert config.host_id == socket.gethostname()
    assert config.labels == {}
    assert config.max_parallel == 8
    assert config.output_chunk_bytes == 64 * 1024
    assert config.output_flush_s == 0.05
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.journal_dir == (
        Path.home() / ".local" / "state" / "dispatch-agent" / socket.gethostname()
    )


def test_flags_and_environment(tmp_path: Path) -> None:
    argv = [
        "--server=[::1]:7443",
        "--host-id=web-1",
        "--label",
        "role=web",
        "--label",
        "dc=par",
        "--state-dir",
        str(tmp_path),
    ]
    config = load_config(argv, {"DISPATCH_AGENT_MAX_PARALLEL": "3", "DISPATCH_AGENT_HOST_ID": "x"})
    assert config.host_id == "web-1"  # the flag wins over the environment
    assert config.max_parallel == 3
    assert config.labels == {"role": "web", "dc": "par"}
    assert config.journal_dir == tmp_path
    assert split_server(config.server) == ("::1", 7443)


def test_token_file_is_read_once(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret\n")
    config = load_config(["--server", "h:1", "--token-file", str(token_file)], {})
    assert config.token == "s3cret"
    assert config.token_file is None


@pytest.mark.parametrize(
    ("argv", "option", "message"),
    [
        ([], "--server", "is required"),
        (["--server", "no-port"], "--server", "expected HOST:PORT, got 'no-port'"),
        (["--server", "h:70000"], "--server", "expected HOST:PORT"),
        (["--server", "h:1", "--max-parallel", "0"], "--max-parallel", "between 1 and 10000"),
        (["--server", "h:1", "--max-parallel", "two"], "--max-parallel", "valid integer"),
        (["--server", "h:1", "--label", "novalue"], "--label", "expected KEY=VALUE"),
        (["--server", "h:1", "--output-flush-s", "0"], "--output-flush-s", "must be positive"),
        (["--server", "h:1", "--token", "a", "--token-file", "f"], "--token", "not both"),
        (["--server", "h:1", "--token-file", "/nonexistent"], "--token-file", "cannot read"),
        (["--server", "h:1", "--log-level", "loud"], "--log-level", "one of"),
        (
            ["--server", "h:1", "--output-chunk-bytes", str(4 * 1024 * 1024)],
            "--output-chunk-bytes",
            "under --event-batch-max-bytes",
        ),
    ],
)
def test_bad_settings_name_the_option(argv: list[str], option: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_config(argv, {})
    assert caught.value.option == option
    assert message in str(caught.value)


def test_secret_token_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        AgentConfig(server="h:1", token="s3cret", token_file=Path("x"))
    assert "s3cret" not in str(caught.value)
    config = tmp_path / "agent.toml"
    config.write_text("token = 1234567890123456\n")
    with pytest.raises(SettingsError) as caught:
        load_config(["--server", "h:1", "--config", str(config)], {})
    assert str(caught.value) == (
        f"--token: input should be a valid string (got <hidden> from config file {config})"
    )
    assert "s3cret" not in repr(AgentConfig(server="h:1", token="s3cret", plaintext=True))


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "file:1"\nmax_parallel = 2\nlog_level = "debug"\n[labels]\nrole = "db"\n'
    )
    environ = {
        "DISPATCH_AGENT_CONFIG": str(config),
        "DISPATCH_AGENT_MAX_PARALLEL": "3",
        "DISPATCH_AGENT_LABELS": "role=web,dc=par",
        "dispatch_agent_log_level": "error",  # names are in capitals, as documented
    }
    loaded = load_config(["--max-parallel", "4", "--plaintext"], environ)
    assert (loaded.server, loaded.max_parallel, loaded.log_level) == ("file:1", 4, "debug")
    assert loaded.labels == {"role": "web", "dc": "par"}  # a layer's labels replace, not merge


@pytest.mark.parametrize(
    ("environ", "toml", "message"),
    [
        (
            {"DISPATCH_AGENT_MAX_PARALLEL": "many"},
            "",
            "--max-parallel: input should be a valid integer, unable to parse string as an "
            "integer (got 'many' from environment DISPATCH_AGENT_MAX_PARALLEL)",
        ),
        (
            {},
            "plaintext = 'maybe'",
            "--plaintext: input should be a valid boolean, unable to interpret input "
            "(got 'maybe' from config file {path})",
        ),
        ({}, "max_paralel = 3", "max_paralel: unknown setting in the config file"),
        ({}, "max_parallel = [", "--config: {path} is not valid TOML"),
        (
            {"DISPATCH_AGENT_LABELS": "novalue"},
            "",
            "--label: expected KEY=VALUE, got 'novalue' "
            "(got 'novalue' from environment DISPATCH_AGENT_LABELS)",
        ),
    ],
)
def test_a_bad_value_names_where_it_came_from(
    environ: dict[str, str], toml: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as caught:
        load_config(["--server", "h:1", "--config", str(path)], environ)
    assert str(caught.value).startswith(message.format(path=path))


def test_a_missing_config_file_is_an_error() -> None:
    with pytest.raises(SettingsError) as caught:
        load_config(["--server", "h:1", "--config", "/nonexistent.toml"], {})
    assert str(caught.value) == "--config: cannot read /nonexistent.toml: No such file or directory"


def test_a_config_built_in_code_is_frozen_and_ignores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISPATCH_AGENT_MAX_PARALLEL", "3")
    unset: dict[str, Any] = {"tls_ca": ""}  # "" unsets an optional setting
    config = AgentConfig(server="h:1", plaintext=True, **unset)
    assert (config.max_parallel, config.tls_ca) == (8, None)
    with pytest.raises(ValidationError):
        setattr(config, "max_parallel", 9)  # noqa: B010 (a frozen model refuses it)


def test_main_stops_on_a_bad_setting_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", "h:1", "--max-parallel", "-1"]) == 2
    assert capsys.readouterr().err == (
        "dispatch-agent: --max-parallel: must be between 1 and 10000\n"
    )
