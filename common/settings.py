"""Layered settings for the programs: defaults, then a TOML file, then ``DISPATCH_*`` environment
variables, then command-line flags (flags win).

A program describes its settings once, as a frozen dataclass whose fields carry their help text
(``setting(...)``); this module derives the flags, environment names and TOML keys from it, turns
strings into the field types, and reports a bad value as ``SettingsError`` naming the option and
where it came from. The dataclass's ``__post_init__`` checks ranges and raises ``SettingsError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

_NOT_GIVEN = object()


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    secret: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A settings field. ``flag`` overrides the derived ``--field-name``; ``secret`` values are
    never echoed in errors."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, option: str, message: str) -> None:
    """For ``__post_init__``: raise ``SettingsError`` unless ``condition`` holds."""
    if not condition:
        raise SettingsError(option, message)


def flag_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def env_name(prefix: str, field: dataclasses.Field[Any]) -> str:
    return prefix + field.name.upper()


def build_parser(
    cls: type[Any], *, prog: str, description: str, env_prefix: str
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every option can also be set in the --config TOML file (same name, with "
        f"underscores) or as {env_prefix}<NAME> in the environment; flags win.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _base_type(hints[field.name])
        default = _default_of(field)
        shown = "" if default is None or field.metadata.get("secret") else f" (default: {default})"
        help_text = field.metadata.get("help", "") + shown
        common: dict[str, Any] = {"dest": field.name, "default": _NOT_GIVEN, "help": help_text}
        if field.metadata.get("metavar"):
            common["metavar"] = field.metadata["metavar"]
        if kind is bool:
            parser.add_argument(flag_name(field), action=argparse.BooleanOptionalAction, **common)
        elif kind in (list, dict):
            # argparse appends to the default, so repeated flags start from None ("not given").
            parser.add_argument(flag_name(field), action="append", **{**common, "default": None})
        else:
            parser.add_argument(flag_name(field), **common)
    return parser


def load_settings(
    cls: type[C],
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    prog: str,
    description: str,
    env_prefix: str,
) -> C:
    """Parse ``argv`` (``--help`` exits), read ``--config`` and the environment, build ``cls``."""
    parser = build_parser(cls, prog=prog, description=description, env_prefix=env_prefix)
    args = parser.parse_args(argv)
    config_path = args.config or environ.get(env_prefix + "CONFIG")
    return settings_from_layers(
        cls,
        toml=_read_toml(config_path) if config_path else {},
        environ=environ,
        flags={
            k: v
            for k, v in vars(args).items()
            if v is not _NOT_GIVEN and v is not None and k != "config"
        },  # fmt: skip
        env_prefix=env_prefix,
    )


def settings_from_layers(
    cls: type[C],
    *,
    toml: Mapping[str, Any],
    environ: Mapping[str, str],
    flags: Mapping[str, Any],
    env_prefix: str,
) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(k.replace("-", "_") for k in toml) - set(fields))
    if unknown:
        raise SettingsError(unknown[0], "unknown setting in the config file")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        annotation = hints[name]
        for source, raw in (
            ("flag " + flag_name(field), flags.get(name, _NOT_GIVEN)),
            (
                "environment " + env_name(env_prefix, field),
                environ.get(env_name(env_prefix, field), _NOT_GIVEN),
            ),
            ("config file", toml.get(name, toml.get(name.replace("_", "-"), _NOT_GIVEN))),
        ):
            if raw is _NOT_GIVEN:
                continue
            try:
                values[name] = _convert(raw, annotation)
            except (TypeError, ValueError) as exc:
                shown = "<hidden>" if field.metadata.get("secret") else repr(raw)
                raise SettingsError(
                    flag_name(field), f"{exc} (got {shown} from {source})"
                ) from None
            break
    try:
        return cls(**values)
    except TypeError as exc:  # a required setting is missing
        missing = [
            f
            for f in fields.values()
            if f.name not in values
            and _default_of(f) is None
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise SettingsError(flag_name(missing[0]), "is required") from None
        raise SettingsError(cls.__name__, str(exc)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise SettingsError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("--config", f"{path} is not valid TOML: {exc}") from None


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` -> list; ``dict[str, str]`` -> dict."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(inner[0])
    return typing.get_origin(annotation) or annotation


def _convert(raw: Any, annotation: Any) -> Any:
    optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
    kind = _base_type(annotation)
    if optional and (raw is None or raw == ""):
        return None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("expected a whole number")
        return int(raw)
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return float(raw)
    if kind is Path:
        return Path(os.path.expanduser(str(raw)))
    if kind is str:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    if kind is list:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
    if kind is dict:
        return _key_values(raw)
    raise TypeError(f"unsupported setting type {annotation!r}")


def _key_values(raw: Any) -> dict[str, str]:
    """``{"a": "1"}`` from TOML, or ``["a=1", "b=2"]`` from repeated flags, or ``"a=1,b=2"``."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    items = raw if isinstance(raw, list) else [raw]
    pairs: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {part!r}")
            pairs[key.strip()] = value.strip()
    return pairs
