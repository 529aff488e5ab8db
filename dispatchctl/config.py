"""dispatchctl's settings: where the API is and how to sign in.

Layered like the daemon's (``common.settings``): defaults, then a TOML file, then ``DISPATCH_*``
environment variables (``DISPATCH_URL``, ``DISPATCH_TOKEN``, ...), then flags. The file is
``--config FILE``, else ``$DISPATCHCTL_CONFIG``, else ``~/.config/dispatchctl.toml`` (under
``$XDG_CONFIG_HOME`` when set) if it exists. The options are accepted before or after the
command (``dispatchctl --url U tasks`` and ``dispatchctl tasks --url U``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.settings import (
    SettingsError,
    check,
    env_name,
    flag_name,
    setting,
    settings_from_layers,
)

ENV_PREFIX = "DISPATCH_"
CONFIG_ENV = "DISPATCHCTL_CONFIG"


@dataclasses.dataclass(frozen=True)
class CtlConfig:
    url: str = setting(
        "http://127.0.0.1:8080",
        help="dispatchd's HTTP address (the API is under /api/v1)",
        metavar="URL",
    )
    token: str | None = setting(None, help="API token (bearer)", metavar="TOKEN", secret=True)
    token_file: Path | None = setting(
        None, help="file holding the API token (instead of --token)", metavar="FILE"
    )
    ca_file: Path | None = setting(
        None,
        help="PEM CA certificates that verify an https:// URL (default: the system's CAs)",
        metavar="FILE",
    )
    request_timeout_s: float = setting(30.0, help="how long one API request may take", metavar="S")
    reconnect_s: float = setting(
        60.0,
        help="how long `run` keeps trying to get the task's event stream back after it broke",
        metavar="S",
    )

    def __post_init__(self) -> None:
        check(
            self.url.startswith(("http://", "https://")),
            "--url",
            "must start with http:// or https://",
        )
        check(self.request_timeout_s > 0, "--request-timeout-s", "must be greater than 0")
        check(self.reconnect_s >= 0, "--reconnect-s", "must not be negative")
        check(
            self.token is None or self.token_file is None,
            "--token",
            "give --token or --token-file, not both",
        )

    def resolved_token(self) -> str | None:
        if self.token_file is None:
            return self.token
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise SettingsError(
                "--token-file", f"cannot read {self.token_file}: {exc.strerror}"
            ) from None
        if not token:
            raise SettingsError("--token-file", f"{self.token_file} is empty")
        return token


def add_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The settings as flags of ``parser``. Only the top-level parser shows their help; every
    parser leaves an option it was not given unset (``SUPPRESS``), so a command's parser never
    overwrites what the top level parsed."""
    group = parser.add_argument_group("connection") if top else parser
    for field in dataclasses.fields(CtlConfig):
        text = field.metadata["help"]
        if field.default is not None:
            text += f" (default: {field.default})"
        text += f"; environment {env_name(ENV_PREFIX, field)}"
        group.add_argument(
            flag_name(field),
            dest=field.name,
            default=argparse.SUPPRESS,
            metavar=field.metadata.get("metavar") or field.name.upper(),
            help=text if top else argparse.SUPPRESS,
        )
    group.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"TOML file with these settings (default: ${CONFIG_ENV}, else "
        "~/.config/dispatchctl.toml if it exists)"
        if top
        else argparse.SUPPRESS,
    )


def default_config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or str(Path.home()), ".config"
    )
    return Path(base) / "dispatchctl.toml"


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> CtlConfig:
    """The settings from the parsed command line, the environment and the config file."""
    explicit = getattr(args, "config", None) or environ.get(CONFIG_ENV)
    path = Path(explicit) if explicit else default_config_path(environ)
    toml: dict[str, Any] = {}
    if explicit or path.exists():
        toml = _read_toml(path)
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CtlConfig)
        if getattr(args, f.name, None) is not None
    }
    return settings_from_layers(
        CtlConfig, toml=toml, environ=environ, flags=flags, env_prefix=ENV_PREFIX
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
            mode = os.fstat(file.fileno()).st_mode
    except OSError as exc:
        raise SettingsError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("--config", f"{path} is not valid TOML: {exc}") from None
    if "token" in data and mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"dispatchctl: warning: {path} holds a token and other users may read it "
            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it",
            file=sys.stderr,
        )
    return data
