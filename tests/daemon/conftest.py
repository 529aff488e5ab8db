"""Fixtures for the HTTP API, query and event-stream tests: a real database (a SQLite file, and
PostgreSQL when configured), rows written straight through the peewee models, a fake task
service, the app and its test client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee
import pytest

from daemon import errors
from daemon.api.app import create_app
from daemon.api.live import LiveHub
from daemon.api.schemas import HttpLimits
from daemon.store import models
from daemon.store.database import Database
from daemon.store.models import Command, CommandHost, Host, HostConnection, OutputChunk, Task
from daemon.taskspec import TaskSpec

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Rows:
    """Writes fixture rows directly; every row gets the next change sequence number."""

    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def host(self, host_id: str, **values: Any) -> str:
        values.setdefault("first_seen_at", 1_700_000_000.0)
        values["labels"] = json.dumps(values.get("labels", {}))
        with self.db.connection_context():
            Host.create(id=host_id, **values)
        return host_id

    def connection(self, host_id: str, **values: Any) -> int:
        values.setdefault("connected_at", 1_700_000_000.0)
        with self.db.connection_context():
            return HostConnection.create(host_id=host_id, **values).id

    def task(
        self,
        name: str = "t",
        *,
        status: str = "running",
        created_at: float = 1_700_000_000.0,
        scripts: tuple[str, ...] = ("echo hi",),
        targets: dict[str, Any] | None = None,
        **values: Any,
    ) -> int:
        with self.db.connection_context(), self.db.atomic():
            task = Task.create(
                name=name,
                status=status,
                created_at=created_at,
                targets=json.dumps(targets or {"hosts": [], "labels": {}}),
                change_seq=self.next_seq(),
                **values,
            )
            for index, script in enumerate(scripts):
                Command.create(task=task, index=index, script=script, timeout_s=60.0)
            return task.id

    def update_task(self, task_id: int, **values: Any) -> int:
        seq = self.next_seq()
        with self.db.connection_context():
            Task.update(change_seq=seq, **values).where(Task.id == task_id).execute()
        return seq

    def execution(
        self, task_id: int, host_id: str, *, command_index: int = 0, status: str = "pending",
        **values: Any,
    ) -> int:  # fmt: skip
        with self.db.connection_context():
            command = Command.get(Command.task == task_id, Command.index == command_index)
            return CommandHost.create(
                task=task_id, command=command, command_index=command_index, host_id=host_id,
                status=status, change_seq=self.next_seq(), **values,
            ).id  # fmt: skip

    def executions(self, task_id: int, hosts: list[str], **values: Any) -> list[int]:
        """Many at once (one statement), change_seq in host order."""
        with self.db.connection_context(), self.db.atomic():
            command = Command.get(Command.task == task_id, Command.index == 0)
            first = self.seq + 1
            rows = [
                {"task": task_id, "command": command.id, "command_index": 0, "host_id": host,
                 "status": "pending", "change_seq": first + i, **values}
                for i, host in enumerate(hosts)
            ]  # fmt: skip
            self.seq += len(hosts)
            for batch in peewee.chunked(rows, 500):
                CommandHost.insert_many(batch).execute()
            query = CommandHost.select(CommandHost.id).where(CommandHost.task == task_id)
            return [row.id for row in query.order_by(CommandHost.id)]

    def update_execution(self, execution_id: int, **values: Any) -> int:
        seq = self.next_seq()
        with self.db.connection_context():
            CommandHost.update(change_seq=seq, **values).where(
                CommandHost.id == execution_id
            ).execute()
        return seq

    def chunk(self, execution_id: int, offset: int, data: bytes, *, stream: int = 1) -> int:
        seq = self.next_seq()
        with self.db.connection_context():
            task_id = CommandHost.get_by_id(execution_id).task_id
            OutputChunk.create(
                command_host=execution_id, task_id=task_id, stream=stream, offset=offset,
                size=len(data), data=data, change_seq=seq,
            )  # fmt: skip
        return seq

    def counts(self) -> dict[str, int]:
        with self.db.connection_context():
            return {model.__name__: model.select().count() for model in models.MODELS}


@pytest.fixture
def peewee_db(db_url: str) -> Iterator[peewee.Database]:
    """A SQLite file, and a fresh PostgreSQL database when DISPATCH_TEST_POSTGRES_URL is set
    (``db_url`` in tests/conftest.py)."""
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    yield db
    db.close_all()


@pytest.fixture
def sqlite_only(tmp_path: Path) -> str:
    """For a module's ``db_url`` override: tests that do not depend on the database's kind."""
    return f"sqlite:///{tmp_path / 'dispatch.db'}"


@pytest.fixture
def database(peewee_db: peewee.Database) -> Database:
    return Database(peewee_db, read_threads=4)


@pytest.fixture
def rows(peewee_db: peewee.Database) -> Rows:
    return Rows(peewee_db)


@dataclass
class FakeTaskService:
    """daemon.engine.tasks.TaskService as the HTTP layer sees it, writing rows like the real one."""

    database: Database
    rows: Rows
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    fail_with: BaseException | None = None

    async def create(self, spec: TaskSpec, *, start: bool, idempotency_key: str | None) -> int:
        self.calls.append(("create", spec, start, idempotency_key))
        if self.fail_with is not None:
            raise self.fail_with
        if idempotency_key is not None and idempotency_key in self.keys:
            digest, task_id = self.keys[idempotency_key]
            if digest != spec.digest():
                raise errors.Conflict("this Idempotency-Key was used with another request")
            return task_id
        known = await self.database.read(lambda: {h.id for h in Host.select(Host.id)})
        for index, host in enumerate(spec.target_hosts):
            if host not in known:
                raise errors.InvalidRequest(
                    f"no host {host!r} has ever connected", field=f"targets.hosts[{index}]"
                )
        task_id = await self.database.write(self._write, spec, start)
        if idempotency_key is not None:
            self.keys[idempotency_key] = (spec.digest(), task_id)
        return task_id

    def _write(self, spec: TaskSpec, start: bool) -> int:
        with models.database_proxy.atomic():
            task = Task.create(
                name=spec.name,
                status="queued" if start else "pending",
                created_at=time.time(),
                targets=json.dumps(
                    {"hosts": list(spec.target_hosts), "labels": spec.target_labels}
                ),
                max_concurrency=spec.max_concurrency,
                max_failures=spec.max_failures,
                delivery_timeout_s=spec.delivery_timeout_s,
                continue_on_error=spec.continue_on_error,
            )
            for index, command in enumerate(spec.commands):
                created = Command.create(
                    task=task, index=index, script=command.script,
                    args=json.dumps(list(command.args)), env=json.dumps(command.env),
                    cwd=command.cwd, timeout_s=command.timeout_s,
                )  # fmt: skip
                for host in spec.target_hosts:
                    CommandHost.create(
                        task=task, command=created, command_index=index, host_id=host,
                        status="pending",
                    )  # fmt: skip
            return task.id

    async def _task(self, task_id: int) -> Task:
        task = await self.database.read(Task.get_or_none, Task.id == task_id)
        if task is None:
            raise errors.NotFound(f"there is no task {task_id}")
        return task

    async def start(self, task_id: int) -> None:
        self.calls.append(("start", task_id))
        task = await self._task(task_id)
        if task.status != "pending":
            raise errors.Conflict(f"task {task_id} is {task.status}, not pending")
        await self.database.write(
            lambda: Task.update(status="queued").where(Task.id == task_id).execute()
        )

    async def cancel(self, task_id: int) -> None:
        self.calls.append(("cancel", task_id))
        task = await self._task(task_id)
        if task.status in ("completed", "failed", "cancelled"):
            raise errors.Conflict(f"task {task_id} has finished")
        await self.database.write(
            lambda: Task.update(cancel_requested=True).where(Task.id == task_id).execute()
        )

    async def retry(self, task_id: int, *, only: str) -> int:
        self.calls.append(("retry", task_id, only))
        await self._task(task_id)
        return self.rows.task("retry", status="pending", retry_of=task_id)


@pytest.fixture
def tasks(database: Database, rows: Rows) -> FakeTaskService:
    return FakeTaskService(database, rows)


@pytest.fixture
def live() -> LiveHub:
    return LiveHub(buffer_events=1000)


@pytest.fixture
def limits() -> HttpLimits:
    return HttpLimits()


@pytest.fixture
def app(database: Database, tasks: FakeTaskService, live: LiveHub, limits: HttpLimits) -> Any:
    return create_app(database=database, tasks=tasks, live=live, api_token=TOKEN, limits=limits)


@pytest.fixture
async def client(app: Any) -> AsyncIterator[Any]:
    async with app.test_app() as test_app:
        yield test_app.test_client()


@dataclass
class Api:
    """Authenticated requests through the test client: ``await api("GET", path)`` gives
    (status, JSON body); ``api.raw`` gives the response."""

    client: Any
    token: str = TOKEN
    auth: dict[str, str] = field(default_factory=lambda: dict(AUTH))

    async def raw(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return await self.client.open(path, method=method, headers=headers, **kwargs)

    async def __call__(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = await self.raw(method, path, **kwargs)
        return response.status_code, await response.get_json(force=True)


@pytest.fixture
def api(client: Any) -> Api:
    return Api(client)
