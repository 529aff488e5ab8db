"""Agent enrolment at hello, over in-memory links into the real session manager, writer, registry
and dispatcher (TLS and the gRPC path: test_enrollment_tls.py and tests/e2e).

What these prove: the enrolment token only ever enrols (an enrolled host is refused ``enrolled``,
Salt's CVE-2024-38822 lesson); a per-host credential speaks for its host only, only while the
host is approved, and is stored as its sha256 alone; every refusal reaches the agent as a
Refusal, ends the stream with its gRPC status and is audited; revoking closes the live stream at
once and fails what runs on it; only approved hosts are targets.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import betterproto2
import peewee
import pytest
import trio

from common.link import MemoryLink, memory_link_pair
from daemon.agents.admission import SessionManager
from daemon.agents.enrollment import Enrollment
from daemon.agents.grpc_bridge import StreamEnd
from daemon.agents.registry import HostRevoked, Registry
from daemon.engine.executions import ExecutionLimits
from daemon.engine.hosts import HostAdmin
from daemon.engine.records import DatabaseRecords
from daemon.engine.tasks import TaskService
from daemon.errors import Conflict, InvalidRequest, NotFound
from daemon.ops.audit import AuditLog
from daemon.store import models
from daemon.store.database import Database
from daemon.store.models import AuditEvent, CommandHost, Host, Task
from daemon.store.task_records import retry_request
from daemon.taskspec import CommandSpec, TaskSpec
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import open_acking_writer, open_engine

TOKEN = "enrolment-token-0123456789"


@dataclass
class Stream:
    """The agent's end of one stream into the session manager."""

    link: MemoryLink
    ended: trio.Event
    result: list[StreamEnd | None]

    async def reply(self) -> tuple[str, Any]:
        """The first message that is not a heartbeat: ("welcome", Welcome) or ("refusal", ...)."""
        with trio.fail_after(5):
            while True:
                kind, value = betterproto2.which_one_of(await self.link.receive(), "kind")
                if kind != "heartbeat":
                    return kind, value

    async def end(self) -> StreamEnd | None:
        with trio.fail_after(5):
            await self.ended.wait()
        return self.result[0]

    async def refused(self) -> tuple[str, StreamEnd | None]:
        kind, value = await self.reply()
        assert kind == "refusal", (kind, value)
        end = await self.end()
        assert end is not None and end.message == value.message
        return value.code, end


@dataclass
class Daemon:
    database: Database
    registry: Registry
    manager: SessionManager
    hosts: HostAdmin
    tasks: TaskService
    nursery: trio.Nursery

    async def connect(
        self,
        host_id: str,
        credential: str | None = TOKEN,
        peer_names: frozenset[str] | None = None,
        **hello: Any,
    ) -> Stream:
        agent_end, daemon_end = memory_link_pair()
        stream = Stream(agent_end, trio.Event(), [])

        async def serve() -> None:
            stream.result.append(
                await self.manager.handle_stream(daemon_end, credential, peer_names)
            )
            await daemon_end.aclose()
            stream.ended.set()

        self.nursery.start_soon(serve)
        message = pb.Hello(host_id=host_id, agent_version="1.0", hostname="box", **hello)
        await agent_end.send(pb.AgentMessage(sent_monotonic_ns=time.monotonic_ns(), hello=message))
        return stream

    async def enrol(self, host_id: str) -> tuple[Stream, str]:
        """Approve ``host_id`` (known or not) and enrol it: its open stream and credential."""
        refused = await self.connect(host_id)
        if (await refused.reply())[0] == "welcome":
            raise AssertionError("expected a pending host")
        await self.hosts.approve(host_id)
        stream = await self.connect(host_id)
        kind, welcome = await stream.reply()
        assert kind == "welcome" and welcome.credential
        return stream, welcome.credential

    async def host(self, host_id: str) -> Host:
        return await self.database.read(Host.get_by_id, host_id)

    async def audit(self, action: str) -> list[AuditEvent]:
        return await self.database.read(
            lambda: list(AuditEvent.select().where(AuditEvent.action == action))
        )


@pytest.fixture
async def daemon(db_url: str, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    async with open_daemon(db_url, nursery) as running:
        yield running


@asynccontextmanager
async def open_daemon(
    db_url: str, nursery: trio.Nursery, *, auto_approve: bool = False, token: str | None = TOKEN
) -> AsyncIterator[Daemon]:
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    database = Database(db, read_threads=4)
    limits = ExecutionLimits(5, kill_grace_s=0.1, report_margin_s=5, max_output_bytes=1000)
    async with (
        open_acking_writer(database) as writer,
        open_engine(writer, DatabaseRecords(database), max_running_executions=10, limits=limits)
        as engine,
    ):
        manager = SessionManager(
            registry=engine.registry, writer=writer, database=database,
            authenticator=Enrollment(database, enrolment_token=token, auto_approve=auto_approve),
            hello_timeout_s=1, heartbeat_interval_s=0.2, heartbeat_ttl_s=5,
            daemon_version="test", audit=AuditLog(database),
        )  # fmt: skip
        hosts = HostAdmin(database, fleet=engine.registry, dispatcher=engine.dispatcher)
        async with trio.open_nursery() as inner:
            await inner.start(manager.serve_liveness)
            tasks = engine.task_service(database)
            yield Daemon(database, engine.registry, manager, hosts, tasks, inner)
            inner.cancel_scope.cancel()
    db.close_all()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the enrolment token --------------------------------------------------------------------


async def test_a_new_host_waits_pending_and_is_told_so(daemon: Daemon) -> None:
    stream = await daemon.connect("web-1", labels={"role": "web"})
    code, end = await stream.refused()
    assert code == "pending_approval"
    assert end == StreamEnd(
        "permission_denied", "host web-1 is enrolled and waits for an administrator's approval"
    )
    host = await daemon.host("web-1")
    assert (host.enrollment, host.status, host.credential_hash, host.labels) == (
        "pending", "offline", None, '{"role": "web"}'
    )  # fmt: skip
    assert not daemon.registry.is_connected("web-1")
    (event,) = await daemon.audit("agent.refused")
    assert (event.actor, event.outcome, event.target, event.address) == (
        "agent:web-1", "denied", "web-1", "memory:a"
    )  # fmt: skip
    assert json.loads(event.details)["code"] == "pending_approval"
    # knocking again changes nothing
    assert (await (await daemon.connect("web-1")).refused())[0] == "pending_approval"
    assert (await daemon.host("web-1")).enrollment == "pending"


async def test_approval_issues_a_credential_once_stored_as_its_hash_only(daemon: Daemon) -> None:
    stream, credential = await daemon.enrol("web-1")
    assert len(credential) == 43  # 32 random bytes, urlsafe base64 without padding
    host = await daemon.host("web-1")
    assert host.credential_hash == sha256(credential)
    assert host.status == "online" and daemon.registry.is_connected("web-1")
    (issued,) = await daemon.audit("agent.enrol")
    assert (issued.actor, issued.outcome, json.loads(issued.details)) == (
        "agent:web-1", "ok", {"auto_approved": False}
    )  # fmt: skip
    # the credential itself is nowhere in the database
    dumped = await daemon.database.read(
        lambda: json.dumps([list(m.select().tuples()) for m in models.MODELS], default=str)
    )
    assert credential not in dumped and TOKEN not in dumped


async def test_the_token_never_again_speaks_for_an_enrolled_host(daemon: Daemon) -> None:
    first, credential = await daemon.enrol("web-1")
    session = daemon.registry.current("web-1")
    impostor = await daemon.connect("web-1", TOKEN)
    code, end = await impostor.refused()
    assert code == "enrolled" and end is not None and end.status == "unauthenticated"
    # the enrolled host's own stream is untouched: not replaced, not closed
    assert daemon.registry.current("web-1") is session and not first.ended.is_set()
    assert daemon.registry.statistics().replaced == 0
    assert (await daemon.host("web-1")).credential_hash == sha256(credential)


async def test_a_credential_speaks_for_its_own_host_only(daemon: Daemon) -> None:
    _, web1 = await daemon.enrol("web-1")
    _, web2 = await daemon.enrol("web-2")
    session = daemon.registry.current("web-2")
    for credential in (web1, None, "", "x" * 43, web2 + "x", TOKEN + "x"):
        stream = await daemon.connect("web-2", credential)
        assert (await stream.refused())[0] == "unauthenticated", credential
    assert daemon.registry.current("web-2") is session
    # and its own credential does
    again = await daemon.connect("web-2", web2)
    assert (await again.reply())[0] == "welcome"
    assert daemon.registry.current("web-2") is not session  # the newer stream of the host wins


async def test_an_unknown_host_with_any_credential_is_unauthenticated(daemon: Daemon) -> None:
    _, credential = await daemon.enrol("web-1")
    stream = await daemon.connect("ghost", credential)
    code, end = await stream.refused()
    assert (code, end) == (
        "unauthenticated",
        StreamEnd(
            "unauthenticated", "the credential is missing or not the one issued to host 'ghost'"
        ),
    )
    assert await daemon.database.read(lambda: Host.get_or_none(Host.id == "ghost")) is None


async def test_racing_enrolments_issue_one_credential(daemon: Daemon) -> None:
    await (await daemon.connect("web-1")).refused()
    await daemon.hosts.approve("web-1")
    streams = [await daemon.connect("web-1") for _ in range(5)]
    replies = [await stream.reply() for stream in streams]
    welcomes = [value for kind, value in replies if kind == "welcome"]
    assert len(welcomes) == 1
    assert sorted(value.code for kind, value in replies if kind == "refusal") == ["enrolled"] * 4
    assert (await daemon.host("web-1")).credential_hash == sha256(welcomes[0].credential)
    assert len(await daemon.audit("agent.enrol")) == 1


async def test_auto_approve_admits_new_hosts_only(db_url: str, nursery: trio.Nursery) -> None:
    async with open_daemon(db_url, nursery) as daemon:
        await (await daemon.connect("kept")).refused()  # pending before auto-approve was on
        _, credential = await daemon.enrol("gone")
        await daemon.hosts.revoke("gone")
    async with open_daemon(db_url, nursery, auto_approve=True) as daemon:
        stream = await daemon.connect("fresh")
        kind, welcome = await stream.reply()
        assert kind == "welcome" and len(welcome.credential) == 43
        events = await daemon.audit("agent.enrol")
        assert [(e.target, json.loads(e.details)) for e in events] == [
            ("gone", {"auto_approved": False}), ("fresh", {"auto_approved": True})
        ]  # fmt: skip
        assert (await (await daemon.connect("kept")).refused())[0] == "pending_approval"
        assert (await (await daemon.connect("gone")).refused())[0] == "revoked"
        assert (await (await daemon.connect("gone", credential)).refused())[0] == "revoked"


async def test_insecure_mode_still_protects_enrolled_hosts(
    db_url: str, nursery: trio.Nursery
) -> None:
    async with open_daemon(db_url, nursery, auto_approve=True, token=None) as daemon:
        kind, welcome = await (await daemon.connect("web-1", None)).reply()
        assert kind == "welcome" and welcome.credential
        for credential in (None, "anything", TOKEN):
            assert (await (await daemon.connect("web-1", credential)).refused())[0] == "enrolled"
        assert (await (await daemon.connect("web-1", welcome.credential)).reply())[0] == "welcome"


# --- administration -------------------------------------------------------------------------


async def test_reject_and_the_transitions_that_do_not_apply(daemon: Daemon) -> None:
    await (await daemon.connect("web-1")).refused()
    with pytest.raises(Conflict, match="only a approved host can become revoked"):
        await daemon.hosts.revoke("web-1")
    view = await daemon.hosts.reject("web-1")
    assert view["enrollment"] == "rejected" and "connections" not in view
    with pytest.raises(Conflict, match="host 'web-1' is rejected; only a pending host"):
        await daemon.hosts.reject("web-1")
    code, end = await (await daemon.connect("web-1")).refused()
    assert (code, end) == (
        "rejected", StreamEnd("permission_denied", "host web-1 was rejected by an administrator")
    )  # fmt: skip
    with pytest.raises(NotFound):
        await daemon.hosts.approve("nobody")
    await daemon.hosts.approve("web-1")  # rejected -> approved
    with pytest.raises(Conflict, match="is approved; only a pending or rejected or revoked"):
        await daemon.hosts.approve("web-1")


async def test_revoke_closes_the_stream_at_once_and_fails_what_runs(daemon: Daemon) -> None:
    stream, credential = await daemon.enrol("web-1")
    spec = TaskSpec(name="t", commands=(CommandSpec(script="sleep 60", timeout_s=60),),
                    target_hosts=("web-1",))  # fmt: skip
    task_id = await daemon.tasks.create(spec, start=True, idempotency_key=None)
    with trio.fail_after(5):
        while True:  # the run arrives; the agent says it started, then keeps quiet
            kind, value = await stream.reply()
            if kind == "runs":
                run = value.runs[0]
                break
    started = pb.Event(command_host_id=run.command_host_id, seq=1,
                       monotonic_ns=time.monotonic_ns(), started=pb.Started(pid=7))  # fmt: skip
    await stream.link.send(pb.AgentMessage(sent_monotonic_ns=time.monotonic_ns(),
                                           events=pb.EventBatch(events=[started])))  # fmt: skip
    execution = run.command_host_id
    with trio.fail_after(5):
        while (await daemon.database.read(CommandHost.get_by_id, execution)).status != "running":  # noqa: ASYNC110
            await trio.sleep(0.01)

    began = trio.current_time()
    view, done = await daemon.hosts.revoke("web-1")
    assert done == {"stream_closed": True, "executions": 1}
    assert view["enrollment"] == "revoked"
    await stream.end()
    assert trio.current_time() - began < 1.0  # at once, not after a heartbeat TTL
    assert not daemon.registry.is_connected("web-1")
    with trio.fail_after(5):
        while (task := await daemon.database.read(Task.get_by_id, task_id)).status == "running":  # noqa: ASYNC110
            await trio.sleep(0.01)
    row = await daemon.database.read(CommandHost.get_by_id, run.command_host_id)
    assert (task.status, row.status, row.reason, row.exit_code) == (
        "failed", "failed", "host_revoked", None
    )  # fmt: skip
    host = await daemon.host("web-1")
    assert (host.enrollment, host.credential_hash, host.status) == ("revoked", None, "offline")
    # neither its credential nor the token speaks for it now
    assert (await (await daemon.connect("web-1", credential)).refused())[0] == "revoked"
    assert (await (await daemon.connect("web-1")).refused())[0] == "revoked"
    # and a retry leaves the revoked host out
    with pytest.raises(Conflict, match="no longer approved"):
        await daemon.database.read(retry_request, task_id)


async def test_approving_again_makes_the_host_enrol_anew(daemon: Daemon) -> None:
    stream, old = await daemon.enrol("web-1")
    await daemon.hosts.revoke("web-1")
    await stream.end()
    await daemon.hosts.approve("web-1")
    assert (await daemon.host("web-1")).credential_hash is None
    assert (await (await daemon.connect("web-1", old)).refused())[0] == "unauthenticated"
    kind, welcome = await (await daemon.connect("web-1")).reply()
    assert kind == "welcome" and welcome.credential not in ("", old)
    assert (await daemon.host("web-1")).credential_hash == sha256(welcome.credential)


async def test_a_stream_admitted_before_a_revocation_is_refused_at_attach() -> None:
    registry = Registry()

    class Session:
        host_id = "web-1"
        known_ids: frozenset[int] = frozenset()
        closed: str | None = None

        def close(self, reason: str) -> None:
            self.closed = reason

    live = Session()
    await registry.attach(live, generation=registry.generation("web-1"))
    admitted_at = registry.generation("web-1")  # a second stream passes admission here...
    assert registry.revoke("web-1", "revoked") is True  # ...the host is revoked meanwhile...
    assert live.closed == "revoked" and registry.current("web-1") is live  # closing; detaches
    with pytest.raises(HostRevoked):  # ...and the second stream cannot attach
        await registry.attach(Session(), generation=admitted_at)
    await registry.attach(Session(), generation=registry.generation("web-1"))  # re-admitted


async def test_only_approved_hosts_are_targets(daemon: Daemon) -> None:
    await daemon.enrol("web-1")
    await (await daemon.connect("web-2", labels={"role": "web"})).refused()  # pending
    _, _ = await daemon.enrol("web-3")
    await daemon.hosts.revoke("web-3")

    def spec(**targets: Any) -> TaskSpec:
        return TaskSpec(name="t", commands=(CommandSpec(script="true", timeout_s=5),), **targets)

    with pytest.raises(InvalidRequest) as refused:
        await daemon.tasks.create(
            spec(target_hosts=("web-1", "web-2")), start=False, idempotency_key=None
        )
    assert (refused.value.message, refused.value.field) == (
        "host 'web-2' is pending: only approved hosts can be targeted", "targets.hosts.1"
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="host 'web-3' is revoked"):
        await daemon.tasks.create(spec(target_hosts=("web-3",)), start=False, idempotency_key=None)
    with pytest.raises(InvalidRequest, match="the targets match no host"):
        await daemon.tasks.create(
            spec(target_labels={"role": "web"}), start=False, idempotency_key=None
        )
    await daemon.hosts.approve("web-2")
    task_id = await daemon.tasks.create(
        spec(target_labels={"role": "web"}), start=False, idempotency_key=None
    )
    hosts = await daemon.database.read(
        lambda: [r.host_id for r in CommandHost.select().where(CommandHost.task == task_id)]
    )
    assert hosts == ["web-2"]


# --- mutual TLS: the certificate names the host ---------------------------------------------


async def test_the_client_certificate_must_name_the_hello_host(daemon: Daemon) -> None:
    await (await daemon.connect("web-1")).refused()
    await daemon.hosts.approve("web-1")
    wrong = await daemon.connect("web-1", peer_names=frozenset({"web-2", "*.example"}))
    code, end = await wrong.refused()
    assert code == "unauthenticated" and end is not None
    assert "the client certificate does not name host 'web-1'" in end.message
    assert (await daemon.host("web-1")).credential_hash is None  # it got nothing
    right = await daemon.connect("web-1", peer_names=frozenset({"web-1"}))
    assert (await right.reply())[0] == "welcome"


async def test_a_daemon_requiring_certificates_refuses_a_stream_without_one(
    db_url: str, nursery: trio.Nursery
) -> None:
    async with open_daemon(db_url, nursery, auto_approve=True) as daemon:
        daemon.manager._authenticator._require_certificate = True  # as --tls-client-ca sets it
        stream = await daemon.connect("web-1")
        code, end = await stream.refused()
        assert (code, end) == (
            "unauthenticated",
            StreamEnd("unauthenticated", "a client certificate is required"),
        )


async def test_malformed_hellos_are_refused_and_audited(daemon: Daemon) -> None:
    stream = await daemon.connect("../etc/passwd")
    code, end = await stream.refused()
    assert code == "invalid_argument" and end is not None and end.status == "invalid_argument"
    (event,) = await daemon.audit("agent.refused")
    assert (event.actor, event.target) == ("agent:../etc/passwd", "../etc/passwd")
    assert await daemon.database.read(lambda: Host.select().count()) == 0


async def test_a_database_that_cannot_answer_decides_nothing(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(host_id: str) -> None:
        raise peewee.OperationalError("database is locked")

    monkeypatch.setattr("daemon.agents.enrollment.host_state", locked)
    stream = await daemon.connect("web-1")
    assert await stream.end() == StreamEnd(
        "unavailable", "the daemon cannot reach its database; try again"
    )
    assert not daemon.registry.is_connected("web-1")


async def test_a_credential_lost_on_the_way_is_replaced_but_never_taken_over(
    daemon: Daemon,
) -> None:
    """The token may replace a credential only if the stream that carried it ended without a
    word from the agent (its Welcome may never have arrived); never while that stream is open,
    never once the agent spoke on it or presented its credential."""
    stream, lost = await daemon.enrol("web-1")
    # while the stream that carried it is open, the token is refused (no takeover)
    assert (await (await daemon.connect("web-1")).refused())[0] == "enrolled"
    await stream.link.aclose()  # the agent gave up waiting for its Welcome: it never spoke
    await stream.end()
    kind, welcome = await (await daemon.connect("web-1")).reply()
    assert kind == "welcome" and welcome.credential not in ("", lost)
    assert (await daemon.host("web-1")).credential_hash == sha256(welcome.credential)
    assert (await (await daemon.connect("web-1", lost)).refused())[0] == "unauthenticated"
    events = await daemon.audit("agent.enrol")
    assert [json.loads(e.details) for e in events] == [
        {"auto_approved": False}, {"auto_approved": False, "reissued": True}
    ]  # fmt: skip

    # an agent that spoke after its Welcome has its credential: the token is done for it
    spoke, _ = await daemon.enrol("web-2")
    await spoke.link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
    await spoke.link.aclose()  # the heartbeat is read before the end
    await spoke.end()
    assert (await (await daemon.connect("web-2")).refused())[0] == "enrolled"
