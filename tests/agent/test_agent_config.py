"""Settings: defaults, flags, environment, token file, and errors that name the option."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

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


def test_secret_token_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        AgentConfig(server="h:1", token="s3cret", token_file=Path("x"))
    assert "s3cret" not in str(caught.value)


def test_main_stops_on_a_bad_setting_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", "h:1", "--max-parallel", "-1"]) == 2
    assert capsys.readouterr().err == (
        "dispatch-agent: --max-parallel: must be between 1 and 10000\n"
    )
