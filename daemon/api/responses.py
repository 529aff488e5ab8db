"""The shapes of the HTTP API's answers, for ``/openapi.json``.

These models do not validate what the daemon sends (``store.views`` renders that); they document
it, and the tests check real responses against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class HostOut(BaseModel):
    id: str
    hostname: str
    labels: dict[str, str]
    status: str
    connected_at: str | None
    last_seen_at: str | None
    first_seen_at: str | None
    agent_version: str
    address: str
    enrollment: Literal["pending", "approved", "rejected", "revoked"] = Field(
        description="only approved hosts connect and can be targeted"
    )


class ConnectionOut(BaseModel):
    id: str
    connected_at: str | None
    disconnected_at: str | None
    address: str
    agent_version: str
    close_reason: str | None


class HostDetailOut(HostOut):
    connections: list[ConnectionOut] = Field(description="newest first, bounded")


class HostPage(BaseModel):
    items: list[HostOut]
    next_cursor: str | None


class CommandOut(BaseModel):
    index: int
    script: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    timeout_s: float


class ProgressOut(BaseModel):
    total: int
    finished: int
    percent: float
    by_status: dict[str, int]


class TaskOut(BaseModel):
    id: str
    name: str
    status: str
    created_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    commands: list[CommandOut]
    targets: dict[str, Any]
    max_concurrency: int | None
    max_failures: int | None
    delivery_timeout_s: float
    continue_on_error: bool
    retry_of: str | None
    cancel_requested: bool
    error: str | None
    progress: ProgressOut


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class ExecutionOut(BaseModel):
    id: str
    task_id: str
    command_index: int
    host_id: str
    status: str
    reason: str | None
    error: str | None
    exit_code: int | None
    signal: int | None
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    stdout_bytes: int
    stderr_bytes: int
    output_truncated: bool


class ExecutionDetailOut(ExecutionOut):
    stdout: str = Field(description="stored output, UTF-8 with replacement; gaps are marked")
    stderr: str
    stdout_omitted_bytes: int
    stderr_omitted_bytes: int


class ExecutionPage(BaseModel):
    items: list[ExecutionOut]
    next_cursor: str | None


class DurationStats(BaseModel):
    count: int
    min: float | None
    avg: float | None
    p95: float | None
    max: float | None


class OutputGroup(BaseModel):
    command_index: int
    exit_code: int | None
    output_digest: str
    count: int
    hosts: list[str] = Field(description="the first hosts of the group by id, bounded")
    stdout_preview: str


class TaskStatsOut(BaseModel):
    task_id: str
    total: int
    by_status: dict[str, int]
    by_exit_code: dict[str, int]
    duration_s: DurationStats
    groups: list[OutputGroup] = Field(description="largest first, bounded")
    groups_total: int
