"""dispatchctl's settings: where the API is and how to sign in.

Layered like the daemon's (``common.settings``): defaults, then a TOML file, then ``DISPATCH_*``
environment variables (``DISPATCH_URL``, ``DISPATCH_TOKEN``, ...), then flags. The file is
``--config FILE``, else ``$DISPATCHCTL_CONFIG``, else ``~/.config/dispatchctl.toml`` (under
``$XDG_CONFIG_HOME`` when set) if it exists. The options are accepted before or after the
command (``dispatchctl --url U tasks`` and ``dispatchctl tasks --url U``).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import (
    Settings,
    SettingsError,
    UserPath,
    check,
    options,
    setting,
    settings_from_layers,
)

ENV_PREFIX = "DISPATCH_"
CONFIG_ENV = "DISPATCHCTL_CONFIG"


class CtlConfig(Settings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    url: str = setting(
        "http://127.0.0.1:8080",
        help="dispatchd's HTTP address (the API is under /api/v1)",
        metavar="URL",
    )
    token: str | None = setting(None, help="API token (bearer)", metavar="TOKEN", secret=True)
    token_file: UserPath | None = setting(
        None, help="file holding the API token (instead of --token)", metavar="FILE"
    )
    ca_file: UserPath | None = setting(
        None,
        help="PEM CA certificates that verify an https:// URL (default: the system's CAs)",
        metavar="FILE",
    )
    request_timeout_s: float = setting(
        30.0, gt=0, help="how long one API request may take", metavar="S"
    )
    reconnect_s: float = setting(
        60.0,
        ge=0,
        help="how long `run` keeps trying to get the task's event stream back after it broke",
        metavar="S",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        check(
            self.token is None or self.token_file is None,
            "--token",
            "give --token or --token-file, not both",
        )
        return self

    @classmethod
    def config_file_read(cls, path: Path, data: Mapping[str, Any], mode: int) -> None:
        if "token" in data and mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(
                f"dispatchctl: warning: {path} holds a token and other users may read it "
                f"(mode {mode:o}); chmod 600 it",
                file=sys.stderr,
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
    for option in options(CtlConfig):
        text = option.help
        if option.default() is not None:
            text += f" (default: {option.default()})"
        text += f"; environment {option.env}"
        group.add_argument(
            option.flag,
            dest=option.name,
            default=argparse.SUPPRESS,
            metavar=option.metavar or option.name.upper(),
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
    flags = {
        option.name: getattr(args, option.name)
        for option in options(CtlConfig)
        if getattr(args, option.name, None) is not None
    }
    return settings_from_layers(
        CtlConfig,
        flags=flags,
        environ=environ,
        toml_file=Path(explicit) if explicit else default_config_path(environ),
        toml_required=bool(explicit),
    )
