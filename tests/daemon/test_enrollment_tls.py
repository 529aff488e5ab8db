"""TLS on the agent port over real sockets: the daemon's gRPC bridge and session manager, the
agent's gRPC bridge, certificates made on the fly (trustme). Mutual TLS binds the hello's host
id to the client certificate; the options refuse to start without TLS or an explicit
--plaintext."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
import trustme

from agent.grpc_bridge import open_stream
from common import tls
from common.settings import SettingsError
from daemon.agents import grpc_bridge
from daemon.agents.admission import SessionManager
from daemon.agents.enrollment import Enrollment
from daemon.agents.registry import Registry
from daemon.config import DaemonConfig, load_config
from daemon.store import models
from daemon.store.database import Database
from proto.dispatch import v1 as pb
from tests.daemon.core_testing import open_acking_writer

TOKEN = "enrolment-token-0123456789"


@pytest.fixture
def db_url(sqlite_only: str) -> str:
    return sqlite_only  # the transport is under test here, not the database


@pytest.fixture
async def aio_loop() -> AsyncIterator[Any]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    directory: Path
    authority: trustme.CA

    def client(self, name: str, *sans: str) -> tuple[Path, Path]:
        """A client certificate with subject CN ``name`` and DNS SANs ``sans``."""
        leaf = self.authority.issue_cert(*(sans or (name,)), common_name=name)
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    paths = [directory / name for name in ("ca.pem", "server.pem", "server.key")]
    authority.cert_pem.write_to_path(str(paths[0]))
    server.cert_chain_pems[0].write_to_path(str(paths[1]))
    server.private_key_pem.write_to_path(str(paths[2]))
    return Pki(*paths, directory, authority)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@dataclass
class Port:
    address: str
    registry: Registry
    seen: list[frozenset[str] | None]


async def serve_port(
    nursery: trio.Nursery, db_url: str, context: Any, *, require_certificate: bool
) -> Port:
    db = models.open_database(db_url)
    models.bind(db)
    models.create_schema(db)
    database = Database(db, read_threads=2)
    writer = await nursery.start(_writer, database)
    registry = Registry()
    manager = SessionManager(
        registry=registry, writer=writer, database=database,
        authenticator=Enrollment(database, enrolment_token=TOKEN, auto_approve=True,
                                 require_certificate=require_certificate),
        hello_timeout_s=2, heartbeat_interval_s=0.5, heartbeat_ttl_s=5, daemon_version="test",
    )  # fmt: skip
    await nursery.start(manager.serve_liveness)
    seen: list[frozenset[str] | None] = []

    async def handle(link: Any, credential: str | None, names: frozenset[str] | None) -> Any:
        seen.append(names)
        return await manager.handle_stream(link, credential, names)

    host, port = await nursery.start(
        functools.partial(grpc_bridge.serve_grpc, handle, host="127.0.0.1", port=0, backlog=16,
                          max_message_bytes=1 << 20, close_timeout_s=2, tls=context)
    )  # fmt: skip
    return Port(f"127.0.0.1:{port}", registry, seen)


async def _writer(database: Database, *, task_status: Any) -> None:
    async with open_acking_writer(database, close_timeout_s=2) as writer:
        task_status.started(writer)
        await trio.sleep_forever()


def hello(host_id: str) -> pb.AgentMessage:
    return pb.AgentMessage(
        sent_monotonic_ns=time.monotonic_ns(), hello=pb.Hello(host_id=host_id, agent_version="t")
    )


async def say_hello(address: str, host_id: str, context: Any) -> tuple[str, Any]:
    """Open a stream, say hello, return the daemon's first answer."""
    async with open_stream(
        address, TOKEN, max_message_bytes=1 << 20, connect_timeout_s=5, tls=context
    ) as link:
        await link.send(hello(host_id))
        message = await link.receive()
        kind = "welcome" if message.welcome is not None else "refusal"
        value = message.welcome if message.welcome is not None else message.refusal
        if kind == "refusal":  # then the stream ends (with a gRPC status, or reset after it)
            with pytest.raises((trio.BrokenResourceError, trio.EndOfChannel)):
                await link.receive()
        return kind, value


async def test_mutual_tls_binds_the_host_to_its_certificate(
    aio_loop: Any, nursery: trio.Nursery, db_url: str, pki: Pki
) -> None:
    server = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    with trio.fail_after(20):
        port = await serve_port(nursery, db_url, server, require_certificate=True)
        web1 = tls.client_context(pki.ca, *pki.client("web-1"))
        kind, welcome = await say_hello(port.address, "web-1", web1)
        assert kind == "welcome" and welcome.host_id == "web-1" and welcome.credential
        assert port.seen[-1] == frozenset({"web-1"})

        # a certificate of the same CA does not speak for another host
        kind, refusal = await say_hello(port.address, "web-2", web1)
        assert (kind, refusal.code) == ("refusal", "unauthenticated")
        assert "does not name host 'web-2'" in refusal.message
        assert not port.registry.is_connected("web-2")

        # a DNS SAN names the host as well as the CN does
        other = tls.client_context(pki.ca, *pki.client("db-cert", "db-1"))
        kind, _ = await say_hello(port.address, "db-1", other)
        assert kind == "welcome" and port.seen[-1] == frozenset({"db-cert", "db-1"})


async def test_mutual_tls_refuses_clients_without_a_good_certificate(
    aio_loop: Any, nursery: trio.Nursery, db_url: str, pki: Pki, tmp_path: Path
) -> None:
    server = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    stranger = make_pki(tmp_path / "other")
    with trio.fail_after(30):
        port = await serve_port(nursery, db_url, server, require_certificate=True)
        for context in (
            tls.client_context(pki.ca),  # no client certificate
            tls.client_context(pki.ca, *stranger.client("web-1")),  # another CA's
            None,  # plaintext
        ):
            with pytest.raises(trio.BrokenResourceError):
                await say_hello(port.address, "web-1", context)
        # an agent that does not trust the daemon's CA does not talk to it
        with pytest.raises(trio.BrokenResourceError, match="CERTIFICATE_VERIFY_FAILED"):
            await say_hello(port.address, "web-1", tls.client_context(stranger.ca))
        assert port.seen == [] and port.registry.statistics().arrivals == 0


async def test_tls_without_client_certificates(
    aio_loop: Any, nursery: trio.Nursery, db_url: str, pki: Pki
) -> None:
    server = tls.server_context(pki.server_cert, pki.server_key)
    with trio.fail_after(20):
        port = await serve_port(nursery, db_url, server, require_certificate=False)
        kind, welcome = await say_hello(port.address, "web-1", tls.client_context(pki.ca))
        assert kind == "welcome" and welcome.credential
        assert port.seen == [None]
        with pytest.raises(trio.BrokenResourceError):
            await say_hello(port.address, "web-2", None)  # plaintext to a TLS port


def test_peer_names_reads_cn_and_dns_sans_only() -> None:
    cert = {
        "subject": ((("organizationName", "x"),), (("commonName", "web-1"),)),
        "subjectAltName": (
            ("DNS", "web-1.example"),
            ("IP Address", "10.0.0.1"),
            ("URI", "spiffe://web-2"),
        ),  # fmt: skip
    }
    assert tls.peer_names(cert) == frozenset({"web-1", "web-1.example"})
    assert tls.peer_names({}) is None and tls.peer_names(None) is None


def test_tls_files_that_are_not_usable_stop_start_up(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(tls.TlsConfigError, match="--tls-key: cannot read"):
        tls.server_context(pki.server_cert, tmp_path / "missing.key")
    with pytest.raises(tls.TlsConfigError, match="--tls-cert: .* are not a PEM certificate"):
        tls.server_context(junk, pki.server_key)
    with pytest.raises(tls.TlsConfigError, match="--tls-client-ca: .* holds no PEM CA"):
        tls.server_context(pki.server_cert, pki.server_key, junk)
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    assert context.minimum_version.name == "TLSv1_2" and context.verify_mode.name == "CERT_REQUIRED"


@pytest.mark.parametrize(
    ("argv", "option", "message"),
    [
        ([], "--tls-cert", "the agent port needs TLS: give --tls-cert FILE and --tls-key FILE"),
        (["--tls-cert", "c.pem"], "--tls-key", "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem", "--plaintext"], "--tls-client-ca", "needs --tls-cert"),
        (["--tls-cert", "c", "--tls-key", "k", "--plaintext"], "--plaintext", "not both"),
    ],
)
def test_dispatchd_refuses_to_start_without_tls_or_plaintext(
    argv: list[str], option: str, message: str
) -> None:
    tokens = ["--agent-token", TOKEN, "--api-token", TOKEN]
    with pytest.raises(SettingsError) as refused:
        load_config([*tokens, *argv], {})
    assert refused.value.option == option and message in str(refused.value)
    if not argv:
        assert "--plaintext" in str(refused.value)


def test_dispatchd_options_for_identity() -> None:
    tokens = ["--agent-token", TOKEN, "--api-token", TOKEN]
    plain = load_config([*tokens, "--plaintext"], {})
    assert (plain.plaintext, plain.auto_approve, plain.tls_cert) == (True, False, None)
    config = load_config(
        [*tokens, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
         "--auto-approve"], {},
    )  # fmt: skip
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.auto_approve) == (
        Path("c.pem"), Path("k.pem"), Path("ca.pem"), True
    )  # fmt: skip
    assert DaemonConfig().auto_approve is False and DaemonConfig().plaintext is False
