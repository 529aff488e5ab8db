"""dispatchctl's parts that need no daemon: terminal-safe text, the settings' layers, the task it
asks for, and the exit status of usage and configuration errors (the event stream has its own
tests in test_event_stream.py)."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.settings import SettingsError
from dispatchctl import config
from dispatchctl.__main__ import build_parser, main
from dispatchctl.commands import moment
from dispatchctl.render import clean
from dispatchctl.run import request_body
from tests.e2e.cluster import free_port


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text\tand tabs\n", "plain text\tand tabs\n"),
        ("a\x1b[31mred\x1b[0m b", "ared b"),  # colours
        ("\x1b[2J\x1b[Hscreen", "screen"),  # clear the screen, move the cursor
        ("\x1b]0;evil title\x07x", "x"),  # window title (OSC ... BEL)
        ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),  # hyperlink (OSC ... ST)
        ("\x1bP1$r0m\x1b\\y", "y"),  # DCS
        ("\x1b(0q", "q"),  # charset switch
        ("\x9b31m8bit", "8bit"),  # 8-bit CSI
        ("bell\x07 bs\x08 cr\r lf\r\n", "bell␇ bs␈ cr␍ lf\n"),
        ("del\x7f nul\x00 esc\x1b", "del␡ nul␀ esc␛"),
        ("rtl\u202eoverride", "rtl\ufffdoverride"),
        ("ünïcödé ✓", "ünïcödé ✓"),
    ],
)
def test_clean_removes_escapes_and_shows_other_controls(raw: str, shown: str) -> None:
    assert clean(raw) == shown


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_settings_layers_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text('url = "http://file:1"\nrequest_timeout_s = 5\nreconnect_s = 9\n')
    environ = {
        "DISPATCHCTL_CONFIG": str(path),
        "DISPATCH_URL": "http://env:2",
        "DISPATCH_REQUEST_TIMEOUT_S": "7",
    }
    loaded = config.load(parsed("tasks", "--url", "http://flag:3"), environ)
    assert (loaded.url, loaded.request_timeout_s, loaded.reconnect_s) == ("http://flag:3", 7, 9)
    # options are accepted before the command too
    assert config.load(parsed("--url", "http://top:4", "tasks"), {}).url == "http://top:4"


def test_the_default_file_is_read_when_it_exists(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert config.load(parsed("tasks"), environ).url == "http://127.0.0.1:8080"
    (tmp_path / "dispatchctl.toml").write_text('token_file = "' + str(tmp_path / "t") + '"\n')
    (tmp_path / "t").write_text("tok-0123456789abcdef\n")
    assert config.load(parsed("tasks"), environ).resolved_token() == "tok-0123456789abcdef"


def test_a_token_in_a_file_others_may_read_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text('token = "tok-0123456789abcdef"\n')
    os.chmod(path, 0o644)
    assert config.load(parsed("tasks", "--config", str(path)), {}).token == "tok-0123456789abcdef"
    assert "holds a token and other users may read it (mode 644)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("toml", "argv", "message"),
    [
        ("colour = true\n", (), "colour: unknown setting in the config file"),
        ("", ("--url", "ftp://x"), "--url: must start with http:// or https://"),
        (
            "",
            ("--request-timeout-s", "soon"),
            "--request-timeout-s: input should be a valid number, unable to parse string as a "
            "number (got 'soon' from flag --request-timeout-s)",
        ),
        ("url = [", (), "is not valid TOML"),
        ("", ("--token-file", "/nonexistent/t"), "--token-file: cannot read /nonexistent/t"),
    ],
)
def test_bad_settings_stop_with_exit_2_naming_the_option(
    toml: str,
    argv: tuple[str, ...],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text(toml)
    monkeypatch.setenv("DISPATCHCTL_CONFIG", str(path))
    assert main(["tasks", *argv]) == 2
    assert message in capsys.readouterr().err


def test_usage_errors_exit_2_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would exit 3
    assert main(["run", "--url", url, "--", "true"]) == 2
    assert "name the targets with --host H and/or --label K=V" in capsys.readouterr().err
    assert main(["run", "--url", url, "--host", "a"]) == 2
    assert "give the script after --, or with -c SCRIPT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["tasks", "--since", "yesterday"])
    assert exited.value.code == 2
    assert "expected an RFC 3339 time" in capsys.readouterr().err
    assert main(["tasks", "--url", url]) == 3
    assert f"cannot reach {url}" in capsys.readouterr().err


def test_the_task_asked_for() -> None:
    args = parsed(
        "run",
        "--host",
        "a",
        "--host",
        "b",
        "--label",
        "role=web",
        "-c",
        "first",
        "--timeout",
        "30",
        "--max-failures",
        "2",
        "--",
        "echo",
        "--",
        "$HOME",
    )
    assert request_body(args) == {
        "name": "first",
        "commands": [
            {"script": "first", "timeout_s": 30.0},
            {"script": "echo -- $HOME", "timeout_s": 30.0},
        ],
        "targets": {"hosts": ["a", "b"], "labels": {"role": "web"}},
        "start": True,
        "max_failures": 2,
    }
    long = request_body(parsed("run", "--label", "a=b", "--", "x" * 80))
    assert long["name"] == "x" * 59 + "…" and "max_concurrency" not in long


def test_since_takes_an_age_or_a_time() -> None:
    ago = datetime.fromisoformat(moment("90m").replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - ago).total_seconds() - 5400) < 5
    assert moment("2026-01-31T12:00:00Z") == "2026-01-31T12:00:00Z"
    with pytest.raises(argparse.ArgumentTypeError):
        moment("last tuesday")


def test_settings_errors_name_the_option() -> None:
    with pytest.raises(SettingsError) as error:
        config.CtlConfig(token="x", token_file=Path("/y"))
    assert error.value.option == "--token"
