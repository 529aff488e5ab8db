"""The shapes of HTTP requests: pydantic models that validate them (answers: ``api_responses``).

Request models are strict: unknown fields are rejected, a boolean is not a number, a string is not
a number, NaN and Infinity are not numbers, and no text may hold a NUL character or a lone
surrogate. Limits that come from the daemon's configuration (how many commands, how large a
script, the page size) are checked against the ``HttpLimits`` passed as validation context
(``model_validate(data, context={"limits": limits})``); without a context the defaults apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from daemon.identifiers import HOST_ID, LABEL_KEY, MAX_LABEL_VALUE
from daemon.states import ExecStatus, HostStatus, TaskStatus
from daemon.store.views import parse_rfc3339


@dataclass(frozen=True)
class HttpLimits:
    """What the HTTP layer accepts and how long it waits (config: ``[http]``)."""

    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    max_targets: int = 10_000  # entries in targets.hosts (the resolved hosts: daemon.engine.tasks)
    max_label_selectors: int = 32  # entries in targets.labels
    max_commands: int = 20  # commands per task
    max_script_bytes: int = 64 << 10  # one script, UTF-8 encoded
    max_args: int = 1000  # positional parameters of one command
    max_env: int = 1000  # environment variables of one command
    max_page_size: int = 1000  # ?limit= upper bound
    default_page_size: int = 100
    max_connections_shown: int = 50  # GET /hosts/{id}: newest connection records
    body_timeout_s: float = 10.0  # the whole request body must arrive within this
    response_timeout_s: float = 60.0  # sending an ordinary response (not the event stream)
    sse_keepalive_s: float = 15.0  # a ": keepalive" comment on an idle event stream
    # Events buffered per live watcher before it is cut off and resyncs from the database. The
    # hub owns the buffer: whoever builds it passes LiveHub(buffer_events=limits.sse_buffer_events).
    sse_buffer_events: int = 1000
    sse_replay_batch: int = 500  # rows per database read when an event stream catches up
    max_event_streams: int = 1000  # open event streams; more get 503
    stats_max_groups: int = 100  # GET /tasks/{id}/stats: output groups listed
    stats_hosts_per_group: int = 20
    stats_preview_bytes: int = 200


DEFAULT_LIMITS = HttpLimits()
MAX_ID = (1 << 63) - 1  # ids are signed 64-bit in the database
MAX_COUNT = 1_000_000  # max_concurrency, max_failures (32-bit integers in PostgreSQL)


def limits_of(info: ValidationInfo) -> HttpLimits:
    context = info.context or {}
    limits = context.get("limits")
    return limits if isinstance(limits, HttpLimits) else DEFAULT_LIMITS


# --- text -----------------------------------------------------------------------------------


def _check_text(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "lone_surrogate", "must be valid Unicode text (it holds a lone surrogate)"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_check_text)]
HostId = Annotated[str, StringConstraints(pattern=HOST_ID.pattern)]
EnvKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
LabelKey = Annotated[Text, StringConstraints(pattern=LABEL_KEY.pattern)]
LabelValue = Annotated[Text, StringConstraints(max_length=MAX_LABEL_VALUE)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# --- POST /api/v1/tasks ---------------------------------------------------------------------


class CommandIn(_Strict):
    script: Annotated[Text, StringConstraints(min_length=1)] = Field(
        description="shell script, run with /bin/sh -c; at most max_script_bytes (64 KiB) UTF-8"
    )
    args: list[Text] = Field(default_factory=list, description="positional parameters $1, $2, …")
    timeout_s: float = Field(600.0, gt=0, le=86400, description="seconds before it is killed")
    env: dict[EnvKey, Text] = Field(default_factory=dict)
    cwd: Annotated[Text, StringConstraints(max_length=4096)] = Field(
        "", description="absolute working directory; empty: the agent's default"
    )

    @field_validator("script")
    @classmethod
    def _script_size(cls, value: str, info: ValidationInfo) -> str:
        limit = limits_of(info).max_script_bytes
        if len(value.encode("utf-8")) > limit:
            raise PydanticCustomError(
                "script_too_large", "must be at most {limit} bytes as UTF-8", {"limit": limit}
            )
        return value

    @field_validator("args")
    @classmethod
    def _args_count(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limit = limits_of(info).max_args
        if len(value) > limit:
            raise PydanticCustomError(
                "too_many_args", "must have at most {limit} arguments", {"limit": limit}
            )
        return value

    @field_validator("env")
    @classmethod
    def _env_count(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        limit = limits_of(info).max_env
        if len(value) > limit:
            raise PydanticCustomError(
                "too_many_env", "must have at most {limit} variables", {"limit": limit}
            )
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd_absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise PydanticCustomError("relative_path", "must be an absolute path or empty")
        return value


class TargetsIn(_Strict):
    hosts: list[HostId] = Field(default_factory=list, description="host ids")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="every host whose labels include all of these"
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limit = limits_of(info).max_targets
        if len(value) > limit:
            raise PydanticCustomError(
                "too_many_targets", "must have at most {limit} hosts", {"limit": limit}
            )
        seen: set[str] = set()
        for host in value:
            if host in seen:
                raise PydanticCustomError("duplicate_host", "lists '{host}' twice", {"host": host})
            seen.add(host)
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        limit = limits_of(info).max_label_selectors
        if len(value) > limit:
            raise PydanticCustomError(
                "too_many_labels", "must have at most {limit} labels", {"limit": limit}
            )
        return value


class TaskCreate(_Strict):
    """A task: commands to run, in order, on every target host."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "name": "restart nginx",
                    "commands": [{"script": "systemctl restart nginx", "timeout_s": 60}],
                    "targets": {"hosts": ["web-1"], "labels": {}},
                    "max_concurrency": 50,
                    "max_failures": 0,
                    "start": False,
                }
            ]
        },
    )

    name: Annotated[Text, StringConstraints(min_length=1, max_length=200)]
    commands: list[CommandIn] = Field(min_length=1)
    targets: TargetsIn
    max_concurrency: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="hosts at once; null: no limit"
    )
    max_failures: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="failed hosts tolerated before the rest is cancelled; null: any",
    )
    delivery_timeout_s: float = Field(
        0.0, ge=0, le=86400, description="wait this long for an offline target; 0: fail at once"
    )
    continue_on_error: bool = False
    start: bool = False

    @field_validator("commands")
    @classmethod
    def _commands(cls, value: list[CommandIn], info: ValidationInfo) -> list[CommandIn]:
        limit = limits_of(info).max_commands
        if len(value) > limit:
            raise PydanticCustomError(
                "too_many_commands", "must have at most {limit} commands", {"limit": limit}
            )
        return value

    @field_validator("targets")
    @classmethod
    def _some_target(cls, value: TargetsIn) -> TargetsIn:
        if not value.hosts and not value.labels:
            raise PydanticCustomError("no_targets", "must name at least one host or label")
        return value


class IdempotencyHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None,
        max_length=200,
        description="retrying a create with the same key and body returns the same task",
    )


# --- query strings --------------------------------------------------------------------------


class _Query(BaseModel):
    """Query strings are text: numbers are parsed (lax), unknown parameters are rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # parameters that may be given more than once (a list); any other repeated one is an error
    repeatable: ClassVar[frozenset[str]] = frozenset()


def _statuses(allowed: type[TaskStatus] | type[ExecStatus]):
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        for status in value.split(","):
            if status not in allowed.__members__.values():
                raise PydanticCustomError(
                    "unknown_status",
                    "must be one or more (comma-separated) of {names}",
                    {"names": ", ".join(allowed)},
                )
        return value

    return AfterValidator(check)


_LEAP_SECOND = re.compile(r"(T\d\d:\d\d:)60", re.IGNORECASE)


def _parse_time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        # RFC 3339 allows a leap second (23:59:60); Python's datetime does not: take :59
        return parse_rfc3339(_LEAP_SECOND.sub(r"\g<1>59", value, count=1))
    except (ValueError, OverflowError):
        raise PydanticCustomError(
            "rfc3339", "must be an RFC 3339 time such as 2025-05-01T12:00:00Z"
        ) from None


def _check_page_size(value: int | None, info: ValidationInfo) -> int | None:
    limit = limits_of(info).max_page_size
    if value is not None and value > limit:
        raise PydanticCustomError("page_too_large", "must be at most {limit}", {"limit": limit})
    return value


Time = Annotated[Text, Field(json_schema_extra={"format": "date-time"})] | None
Cursor = Annotated[str, StringConstraints(max_length=512)] | None


class _Page(_Query):
    since: Time = Field(None, description="RFC 3339, inclusive")
    until: Time = Field(None, description="RFC 3339, exclusive")
    limit: int | None = Field(None, ge=1, description="page size, 1..max_page_size (1000)")
    cursor: Cursor = Field(None, description="next_cursor of the previous page")

    @field_validator("since", "until")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        _parse_time(value)
        return value

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_page_size(value, info)

    def time_range(self) -> tuple[float | None, float | None]:
        return _parse_time(self.since), _parse_time(self.until)

    def page_size(self, limits: HttpLimits) -> int:
        return self.limit if self.limit is not None else limits.default_page_size


class TaskListQuery(_Page):
    """Newest first. since/until filter on the task's created_at."""

    status: Annotated[str | None, _statuses(TaskStatus)] = Field(
        None, description="comma-separated task statuses"
    )
    host: HostId | None = Field(None, description="tasks with an execution on this host")


class ExecutionListQuery(_Page):
    """since/until filter on started_at: executions that never started are then left out."""

    status: Annotated[str | None, _statuses(ExecStatus)] = Field(
        None, description="comma-separated execution statuses"
    )
    host: HostId | None = None


class HostListQuery(_Query):
    repeatable = frozenset({"label"})
    status: HostStatus | None = None
    label: list[Text] = Field(default_factory=list, description="k=v, repeatable: all must match")
    limit: int | None = Field(None, ge=1)
    cursor: Cursor = None

    @field_validator("label")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, _ = item.partition("=")
            if not sep or not key:
                raise PydanticCustomError("label_selector", "must look like key=value")
        return value

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_page_size(value, info)

    def label_selectors(self) -> dict[str, str]:
        return dict(item.partition("=")[::2] for item in self.label)


class OutputQuery(_Query):
    stream: Literal["stdout", "stderr"] = "stdout"


class RetryQuery(_Query):
    only: Literal["failed"] = Field(
        "failed", description="retry the hosts that did not succeed (the only mode so far)"
    )


class EventsQuery(_Query):
    last_event_id: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,19}$")] | None = Field(
        None, description="for clients that cannot set the Last-Event-ID header"
    )
    output: bool = Field(True, description="false: leave out output events")
