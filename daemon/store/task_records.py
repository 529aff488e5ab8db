"""The task rows the core reads and creates (synchronous; run through ``Database``).

Creating a task resolves its targets and writes the task, its commands and one CommandHost per
(command, host) in one transaction, so a task is either whole or absent. Everything else here
reads what the scheduler and dispatcher need to run or resume a task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from peewee import IntegrityError, chunked, fn

from daemon.errors import Conflict, InvalidRequest, NotFound
from daemon.states import EnrollmentState, ExecStatus, TaskStatus
from daemon.store.models import Command, CommandHost, Host, Task
from daemon.taskspec import CommandSpec, TaskSpec


def create_task(
    spec: TaskSpec,
    *,
    start: bool,
    idempotency_key: str | None,
    max_targets: int,
    retry_of: int | None = None,
) -> tuple[int, bool]:
    """Write a new task; returns (task id, created). A replayed ``idempotency_key`` with the same
    request returns the first task's id and ``created=False``."""
    db = Task._meta.database
    digest = spec.digest()
    if idempotency_key is not None:
        existing = _task_by_key(idempotency_key, digest)
        if existing is not None:
            return existing, False
    hosts = resolve_targets(spec, max_targets)
    now = time.time()
    try:
        with db.atomic():
            task = Task.create(
                name=spec.name,
                status=(TaskStatus.QUEUED if start else TaskStatus.PENDING).value,
                created_at=now,
                queued_at=now if start else None,
                targets=json.dumps(
                    {
                        "hosts": list(spec.target_hosts),
                        "labels": spec.target_labels,
                        "resolved": len(hosts),
                    }  # fmt: skip
                ),
                max_concurrency=spec.max_concurrency,
                max_failures=spec.max_failures,
                delivery_timeout_s=spec.delivery_timeout_s,
                continue_on_error=spec.continue_on_error,
                retry_of=retry_of,
                idempotency_key=idempotency_key,
                request_digest=digest,
            )
            command_ids = [
                _create_command(task.id, index, c) for index, c in enumerate(spec.commands)
            ]
            rows = (
                {
                    "task": task.id,
                    "command": command_id,
                    "command_index": index,
                    "host_id": host_id,
                    "status": ExecStatus.PENDING.value,
                }
                for host_id in hosts
                for index, command_id in enumerate(command_ids)
            )
            for batch in chunked(rows, 500):
                CommandHost.insert_many(batch).execute()
    except IntegrityError:
        # Two requests with the same key raced; the other one's task stands.
        if idempotency_key is not None:
            existing = _task_by_key(idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise
    return task.id, True


def _task_by_key(key: str, digest: str) -> int | None:
    row = Task.select(Task.id, Task.request_digest).where(Task.idempotency_key == key).first()
    if row is None:
        return None
    if row.request_digest != digest:
        raise Conflict(
            "this Idempotency-Key was already used with a different request",
            code="idempotency_key_reused",
        )
    return int(row.id)


def _create_command(task_id: int, index: int, command: CommandSpec) -> int:
    created = Command.create(
        task=task_id,
        index=index,
        script=command.script,
        args=json.dumps(list(command.args)),
        env=json.dumps(command.env),
        cwd=command.cwd,
        timeout_s=command.timeout_s,
    )
    return int(created.id)


def resolve_targets(spec: TaskSpec, max_targets: int) -> list[str]:
    """Named hosts (which must be known and approved) then approved label matches, without
    repeats, in that order: a host that is pending, rejected or revoked is never a target."""
    known = {
        row.id: (json.loads(row.labels), row.enrollment)
        for row in Host.select(Host.id, Host.labels, Host.enrollment).order_by(Host.id)
    }
    hosts: dict[str, None] = {}
    for index, host_id in enumerate(spec.target_hosts):
        if host_id not in known:
            raise InvalidRequest(f"unknown host {host_id!r}", field=f"targets.hosts.{index}")
        enrollment = known[host_id][1]
        if enrollment != EnrollmentState.APPROVED:
            raise InvalidRequest(
                f"host {host_id!r} is {enrollment}: only approved hosts can be targeted",
                field=f"targets.hosts.{index}",
            )
        hosts[host_id] = None
    if spec.target_labels:
        wanted = spec.target_labels.items()
        for host_id, (labels, enrollment) in known.items():
            if enrollment != EnrollmentState.APPROVED:
                continue
            if all(labels.get(key) == value for key, value in wanted):
                hosts[host_id] = None
    if not hosts:
        raise InvalidRequest("the targets match no host", field="targets")
    if len(hosts) > max_targets:
        raise InvalidRequest(
            f"the targets match {len(hosts)} hosts; at most {max_targets} per task",
            field="targets",
        )
    return list(hosts)


@dataclass(frozen=True)
class PlannedExecution:
    id: int
    host_id: str
    command_index: int
    status: ExecStatus


@dataclass(frozen=True)
class TaskPlan:
    task_id: int
    status: TaskStatus
    started_at: float | None
    max_concurrency: int | None
    max_failures: int | None
    delivery_timeout_s: float
    continue_on_error: bool
    cancel_requested: bool
    commands: dict[int, CommandSpec]
    by_host: dict[str, list[PlannedExecution]]  # each host's executions in command order


def load_plan(task_id: int) -> TaskPlan | None:
    task = Task.get_or_none(Task.id == task_id)
    if task is None:
        return None
    commands = {
        c.index: CommandSpec(
            script=c.script,
            timeout_s=c.timeout_s,
            args=tuple(json.loads(c.args)),
            env=json.loads(c.env),
            cwd=c.cwd,
        )
        for c in Command.select().where(Command.task == task_id)
    }
    by_host: dict[str, list[PlannedExecution]] = {}
    query = (
        CommandHost.select(
            CommandHost.id, CommandHost.host_id, CommandHost.command_index, CommandHost.status
        )
        .where(CommandHost.task == task_id)
        .order_by(CommandHost.id)
        .tuples()
    )
    for ch_id, host_id, index, status in query:
        by_host.setdefault(host_id, []).append(
            PlannedExecution(ch_id, host_id, index, ExecStatus(status))
        )
    for executions in by_host.values():
        executions.sort(key=lambda e: e.command_index)
    return TaskPlan(
        task_id=task.id,
        status=TaskStatus(task.status),
        started_at=task.started_at,
        max_concurrency=task.max_concurrency,
        max_failures=task.max_failures,
        delivery_timeout_s=task.delivery_timeout_s,
        continue_on_error=task.continue_on_error,
        cancel_requested=task.cancel_requested,
        commands=commands,
        by_host=by_host,
    )


def task_status(task_id: int) -> TaskStatus | None:
    row = Task.select(Task.status).where(Task.id == task_id).first()
    return TaskStatus(row.status) if row is not None else None


def tasks_in_status(status: TaskStatus, limit: int, exclude: Sequence[int] = ()) -> list[int]:
    """Oldest first: tasks run in the order they were queued."""
    query = Task.select(Task.id).where(Task.status == status.value)
    if exclude:
        query = query.where(Task.id.not_in(list(exclude)))
    return [row.id for row in query.order_by(Task.queued_at, Task.id).limit(limit)]


def execution_statuses(ids: Sequence[int]) -> dict[int, ExecStatus]:
    found: dict[int, ExecStatus] = {}
    for batch in chunked(ids, 500):
        query = CommandHost.select(CommandHost.id, CommandHost.status).where(
            CommandHost.id.in_(batch)
        )
        found.update((row.id, ExecStatus(row.status)) for row in query)
    return found


def unfinished_execution_ids(task_id: int, *, only_pending: bool = False) -> list[int]:
    wanted = [ExecStatus.PENDING] if only_pending else [s for s in ExecStatus if not s.terminal]
    query = CommandHost.select(CommandHost.id).where(
        (CommandHost.task == task_id) & CommandHost.status.in_([s.value for s in wanted])
    )
    return [row.id for row in query]


def status_counts(task_id: int) -> dict[ExecStatus, int]:
    query = (
        CommandHost.select(CommandHost.status, fn.COUNT(CommandHost.id))
        .where(CommandHost.task == task_id)
        .group_by(CommandHost.status)
        .tuples()
    )
    return {ExecStatus(status): count for status, count in query}


def retry_request(task_id: int) -> tuple[TaskSpec, list[str]]:
    """The spec of a finished task and the hosts where some command did not succeed."""
    task = Task.get_or_none(Task.id == task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if not TaskStatus(task.status).terminal:
        raise Conflict(f"task {task_id} is {task.status}; retry it once it has finished")
    plan = load_plan(task_id)
    assert plan is not None
    failed = [
        host_id
        for host_id, executions in plan.by_host.items()
        if any(e.status != ExecStatus.SUCCEEDED for e in executions)
    ]
    if not failed:
        raise Conflict(f"every host of task {task_id} succeeded; there is nothing to retry")
    approved = {
        row.id
        for row in Host.select(Host.id).where(
            Host.id.in_(failed) & (Host.enrollment == EnrollmentState.APPROVED.value)
        )
    }
    failed = [host_id for host_id in failed if host_id in approved]  # revoked hosts are left out
    if not failed:
        raise Conflict(
            f"the hosts of task {task_id} that did not succeed are no longer approved; "
            "there is nothing to retry"
        )
    # The retry names its hosts: the original labels may match other hosts by now.
    spec = TaskSpec(
        name=f"{task.name} (retry of {task_id})"[:200],
        commands=tuple(plan.commands[i] for i in sorted(plan.commands)),
        target_hosts=tuple(failed),
        max_concurrency=task.max_concurrency,
        max_failures=task.max_failures,
        delivery_timeout_s=task.delivery_timeout_s,
        continue_on_error=task.continue_on_error,
    )
    return spec, failed
