"""Layered settings for the programs, through pydantic-settings: defaults, then a TOML file, then
``DISPATCH_*`` environment variables, then command-line flags (flags win).

A program describes its settings once, as a frozen ``Settings`` subclass whose fields carry their
help text (``setting(...)``) and their range (``gt``/``ge``/``le``); ``options()`` derives the
flag, environment name and TOML key of each. pydantic-settings does the layering
(``Settings.settings_customise_sources``: the flags as init kwargs, an ``EnvSettingsSource``, a
``TomlConfigSettingsSource``) and pydantic the conversions and checks. What this module adds is
the argparse side (``build_parser``) and one adapter, ``_settings_error``: pydantic reports a
field by its name and without saying which layer gave the value, while every error here is a
``SettingsError`` naming the option as a user types it and where its value came from.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import os
import stat
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import annotated_types  # pydantic's own: Field(gt=...) is annotated_types.Gt in .metadata
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

C = TypeVar("C", bound="Settings")


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def setting(
    default: Any = PydanticUndefined,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    secret: bool = False,
    default_factory: Callable[[], Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> Any:
    """A settings field. ``flag`` overrides the derived ``--field-name``; ``secret`` values are
    never echoed, in errors or in the config's repr; ``gt``/``ge``/``le`` bound a number."""
    extra: JsonDict = {"flag": flag, "metavar": metavar, "secret": secret}
    field: dict[str, Any] = {
        "description": help,
        "json_schema_extra": extra,
        "repr": not secret,
        "gt": gt,
        "ge": ge,
        "le": le,
    }
    if default_factory is not None:
        return Field(default_factory=default_factory, **field)
    return Field(default, **field)


def check(condition: bool, option: str, message: str) -> None:
    """For the cross-field ``model_validator``s: raise ``SettingsError`` unless ``condition``."""
    if not condition:
        raise SettingsError(option, message)


def _expand_user(path: Path) -> Path:
    return Path(os.path.expanduser(path))


def _key_values(raw: Any) -> Any:
    """``{"a": "1"}`` from TOML, ``["a=1", "b=2"]`` from repeated flags, ``"a=1,b=2"`` from the
    environment (which pydantic-settings would otherwise decode as JSON: ``NoDecode``)."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if not isinstance(raw, str | list):
        return raw  # pydantic reports it as not a dict
    pairs: dict[str, str] = {}
    for item in raw if isinstance(raw, list) else [raw]:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                # Not a ValueError: a malformed value, reported with where it came from.
                raise PydanticCustomError(
                    "key_value", "expected KEY=VALUE, got {part}", {"part": repr(part)}
                )
            pairs[key.strip()] = value.strip()
    return pairs


UserPath = Annotated[Path, AfterValidator(_expand_user)]
"""A path in which ``~`` is the user's home directory, as in a shell."""

KeyValues = Annotated[dict[str, str], NoDecode, BeforeValidator(_key_values)]
"""``KEY=VALUE`` pairs: a TOML table, repeated flags, or ``K=V,K=V`` in the environment."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting as a user meets it: ``name`` is its TOML key, ``flag`` and ``env`` the rest."""

    name: str
    flag: str
    env: str
    help: str
    metavar: str | None
    secret: bool
    field: FieldInfo

    @property
    def required(self) -> bool:
        return self.field.is_required()

    def default(self) -> Any:
        """The default (a factory's value, made now); ``None`` when there is none."""
        if self.required:
            return None
        return self.field.get_default(call_default_factory=True)


def options(cls: type[Settings]) -> list[Option]:
    prefix = cls.model_config.get("env_prefix") or ""
    found = []
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag, metavar = extra.get("flag"), extra.get("metavar")
        found.append(
            Option(
                name=name,
                flag=flag if isinstance(flag, str) else "--" + name.replace("_", "-"),
                env=prefix + name.upper(),
                help=field.description or "",
                metavar=metavar if isinstance(metavar, str) else None,
                secret=extra.get("secret") is True,
                field=field,
            )
        )
    return found


@dataclasses.dataclass
class _Layers:
    """What one ``settings_from_layers`` call reads, for ``settings_customise_sources`` (which
    pydantic-settings calls without arguments of ours) and for naming where a value came from."""

    flags: Mapping[str, Any]
    environ: Mapping[str, str]
    toml_file: Path | None
    toml_required: bool
    toml: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# Set only while ``settings_from_layers`` builds a config: a config built in code (tests,
# simulations) takes exactly the values given, not the process's environment.
_LAYERS: contextvars.ContextVar[_Layers | None] = contextvars.ContextVar("layers", default=None)


class _Environment(EnvSettingsSource):
    """The environment ``settings_from_layers`` was given (not ``os.environ``), read as
    ``<PREFIX><FIELD_NAME>`` in capitals. pydantic-settings names a variable ``env_prefix +
    field_name``: matched exactly, that would be ``DISPATCH_max_parallel``; matched without case,
    both sides lower-cased. So: the second, shown only the variables named in capitals."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls, case_sensitive=False)
        self.env_vars = {name.lower(): value for name, value in environ.items() if name.isupper()}


class Settings(BaseSettings):
    """Base of the programs' settings: immutable, unknown keys refused, environment names exact
    (``<env_prefix><FIELD_NAME>``), an empty value of an optional setting meaning unset."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _settings_error(type(self), exc, _LAYERS.get()) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (the init kwargs) over the environment over the TOML file; no .env files, no
        secrets directory. Outside ``settings_from_layers``: the init kwargs alone."""
        layers = _LAYERS.get()
        if layers is None:
            return (init_settings,)
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _Environment(settings_cls, layers.environ),
        ]
        if layers.toml_file is not None:
            toml = _toml_source(settings_cls, layers.toml_file, layers.toml_required)
            if toml is not None:
                layers.toml = toml.toml_data
                sources.append(toml)
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """``DISPATCH_TLS_CA=`` (or ``--tls-ca ''``, or ``tls_ca = ""``) unsets an optional
        setting instead of naming the current directory."""
        if not isinstance(data, dict):
            return data
        return {
            key: None if value == "" and key in cls.model_fields and _optional(cls, key) else value
            for key, value in data.items()
        }

    @classmethod
    def config_file_read(cls, path: Path, data: Mapping[str, Any], mode: int) -> None:
        """Called with each TOML file read (its keys and ``st_mode``); a program may warn."""


def _optional(cls: type[Settings], name: str) -> bool:
    return type(None) in typing.get_args(cls.model_fields[name].annotation)


def _toml_source(
    settings_cls: type[BaseSettings], path: Path, required: bool
) -> TomlConfigSettingsSource | None:
    # TomlConfigSettingsSource skips a file that does not exist; a --config FILE must.
    if not required and not path.expanduser().is_file():
        return None
    try:
        mode = path.expanduser().stat().st_mode
        with path.expanduser().open("rb"):
            pass
        source = TomlConfigSettingsSource(settings_cls, toml_file=path)
    except OSError as exc:
        raise SettingsError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("--config", f"{path} is not valid TOML: {exc}") from None
    if issubclass(settings_cls, Settings):
        settings_cls.config_file_read(path, source.toml_data, stat.S_IMODE(mode))
    return source


# pydantic's errors for a value outside its Field bounds; ``_bounds`` words them.
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than_equal")


def _settings_error(
    cls: type[Settings], exc: ValidationError, layers: _Layers | None
) -> SettingsError:
    """The first of pydantic's errors as a ``SettingsError``. pydantic names a field by its
    Python name, words a range in its own terms and does not know which source gave a value.
    Here the option is named as the user spells it; a value pydantic could not parse is shown
    with where it came from (``<hidden>`` for a secret); a value out of range or refused by a
    check gets the check's sentence alone; a model validator's ``SettingsError`` passes as is."""
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    error = (unknown or errors)[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, SettingsError):  # raised by a model_validator: already worded
        return cause
    if error["type"] == "extra_forbidden":
        return SettingsError(str(error["loc"][0]), "unknown setting in the config file")
    by_name = {option.name: option for option in options(cls)}
    option = by_name.get(str(error["loc"][0])) if error["loc"] else None
    if option is None:  # not about one field (pydantic's own wording is all there is)
        return SettingsError(cls.__name__, error["msg"])
    if error["type"] == "missing":
        return SettingsError(option.flag, "is required")
    if error["type"] in _BOUND_ERRORS:
        return SettingsError(option.flag, _bounds(option.field))
    if isinstance(cause, ValueError):  # a field_validator's check of a well-formed value
        return SettingsError(option.flag, str(cause))
    message = error["msg"][:1].lower() + error["msg"][1:]
    return SettingsError(option.flag, f"{message} ({_got(option, error, layers)})")


def _bounds(field: FieldInfo) -> str:
    low: object = None
    high: object = None
    exclusive = False
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Gt):
            low, exclusive = constraint.gt, True
        elif isinstance(constraint, annotated_types.Ge):
            low = constraint.ge
        elif isinstance(constraint, annotated_types.Le):
            high = constraint.le
    if low is not None and high is not None:
        return f"must be between {low} and {high}"
    if high is not None:
        return f"must be at most {high}"
    if exclusive:
        return "must be positive" if low == 0 else f"must be greater than {low}"
    return "must not be negative" if low == 0 else f"must be at least {low}"


def _got(option: Option, error: ErrorDetails, layers: _Layers | None) -> str:
    shown = "<hidden>" if option.secret else repr(error["input"])
    if layers is None:
        return f"got {shown}"
    if option.name in layers.flags:
        source = f"flag {option.flag}"
    elif option.env in layers.environ:
        source = f"environment {option.env}"
    elif option.name in layers.toml:
        source = f"config file {layers.toml_file}"
    else:
        source = "the default"
    return f"got {shown} from {source}"


def build_parser(cls: type[Settings], *, prog: str, description: str) -> argparse.ArgumentParser:
    prefix = cls.model_config.get("env_prefix") or ""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every option can also be set in the --config TOML file (same name, with "
        f"underscores) or as {prefix}<NAME> in the environment; flags win.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for option in options(cls):
        default = option.default()
        shown = "" if default is None or option.secret else f" (default: {default})"
        common: dict[str, Any] = {"dest": option.name, "help": option.help + shown}
        if option.metavar:
            common["metavar"] = option.metavar
        kind = typing.get_origin(option.field.annotation) or option.field.annotation
        if kind is bool:
            action: Any = argparse.BooleanOptionalAction
        elif kind is dict:
            action = "append"
        else:
            action = "store"
        # Not given: left out of the namespace, so the lower layers apply.
        parser.add_argument(option.flag, action=action, default=argparse.SUPPRESS, **common)
    return parser


def load_settings(
    cls: type[C],
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    prog: str,
    description: str,
) -> C:
    """Parse ``argv`` (``--help`` exits), read ``--config`` and the environment, build ``cls``.
    The file is ``--config FILE``, else ``$<env_prefix>CONFIG``."""
    flags = vars(build_parser(cls, prog=prog, description=description).parse_args(argv))
    config_path = flags.pop("config", None) or environ.get(
        (cls.model_config.get("env_prefix") or "") + "CONFIG"
    )
    return settings_from_layers(
        cls, flags=flags, environ=environ, toml_file=Path(config_path) if config_path else None
    )


def settings_from_layers(
    cls: type[C],
    *,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    toml_file: Path | None,
    toml_required: bool = True,
) -> C:
    """``cls`` from flags (by field name) over ``environ`` over ``toml_file`` over the defaults.
    A ``toml_file`` that is not ``toml_required`` is read only if it exists."""
    token = _LAYERS.set(_Layers(dict(flags), environ, toml_file, toml_required))
    try:
        return cls(**flags)
    finally:
        _LAYERS.reset(token)
