"""The agent's side of enrolment: it keeps the credential a Welcome carries (0600, atomically),
presents it instead of the enrolment token from then on, falls back to the token when the
daemon refuses the credential (a re-admitted host enrols again by itself), and says in its log
what a refusal means. Real grpclib streams where what is presented matters."""

from __future__ import annotations

import logging
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.config import AgentConfig, load_config
from agent.connection import open_agent
from common.settings import SettingsError
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import FakeDaemon, FakeRunner, serving

MakeConfig = Callable[..., AgentConfig]
TOKEN = "enrol-token-0123456789"


async def next_stream(server: Any) -> tuple[Any, str, pb.Hello]:
    """The next stream the agent opens: (accepted, what it presented, its hello)."""
    accepted = await server.accepted.receive()
    hello = (await accepted.link.receive()).hello
    return accepted, accepted.metadata.get("authorization", ""), hello


async def welcome(accepted: Any, credential: str = "") -> None:
    await accepted.link.send(
        pb.ServerMessage(welcome=pb.Welcome(host_id="host-a", credential=credential))
    )


async def refuse(accepted: Any, code: str) -> None:
    await accepted.link.send(pb.ServerMessage(refusal=pb.Refusal(code=code, message="no")))
    accepted.done.set()


async def test_the_issued_credential_is_kept_and_presented_instead_of_the_token(
    aio_loop: object, make_config: MakeConfig, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(20):
        async with serving() as server:
            config = make_config(server=server.address, token=TOKEN, state_dir=state)
            async with open_agent(config, runner=FakeRunner(), rng=random.Random(1)) as agent:
                first, presented, hello = await next_stream(server)
                assert (presented, hello.host_id) == (f"Bearer {TOKEN}", "host-a")
                await welcome(first, "cred-one")
                await agent.wait_connected()
                credential = state / "credential"
                assert credential.read_text() == "cred-one\n"
                assert stat.S_IMODE(credential.stat().st_mode) == 0o600
                assert sorted(p.name for p in state.iterdir() if "credential" in p.name) == [
                    "credential"
                ]  # no temporary file left
                first.done.set()  # the stream ends; the agent dials again with its credential
                second, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-one"
                await welcome(second)  # no credential: nothing changes
                await agent.wait_connected()
                assert credential.read_text() == "cred-one\n"
                second.done.set()
                third, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-one"
                third.done.set()
        async with serving() as server:  # a restarted agent starts from the stored credential
            config = make_config(server=server.address, token=TOKEN, state_dir=state)
            async with open_agent(config, runner=FakeRunner(), rng=random.Random(1)):
                accepted, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-one"
                accepted.done.set()


async def test_a_refused_credential_makes_the_agent_enrol_again(
    aio_loop: object, make_config: MakeConfig, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "credential").write_text("cred-old\n")
    (state / "credential").chmod(0o600)
    with trio.fail_after(20):
        async with serving() as server:
            config = make_config(server=server.address, token=TOKEN, state_dir=state)
            async with open_agent(config, runner=FakeRunner(), rng=random.Random(1)) as agent:
                accepted, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-old"
                await refuse(accepted, "revoked")  # revoked: the token is tried next...
                accepted, presented, _ = await next_stream(server)
                assert presented == f"Bearer {TOKEN}"
                await refuse(accepted, "revoked")  # ...then the credential again
                accepted, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-old"
                await refuse(accepted, "unauthenticated")  # approved again: it lost its credential
                accepted, presented, _ = await next_stream(server)
                assert presented == f"Bearer {TOKEN}"
                await welcome(accepted, "cred-new")  # enrolled anew
                await agent.wait_connected()
                assert (state / "credential").read_text() == "cred-new\n"
                accepted.done.set()
                accepted, presented, _ = await next_stream(server)
                assert presented == "Bearer cred-new"
                accepted.done.set()


@pytest.mark.parametrize(
    ("code", "level", "advice"),
    [
        ("pending_approval", "WARNING",
         "an administrator has to approve this host (POST /api/v1/hosts/host-a/approve)"),
        ("enrolled", "ERROR",
         "this agent has no credential of its own (was its state directory lost?); an "
         "administrator must re-admit the host: revoke it, then approve it"),
        ("revoked", "ERROR",
         "an administrator revoked this host; it is refused until one approves it again"),
        ("rejected", "ERROR",
         "an administrator rejected this host; it is refused until one approves it"),
    ],
)  # fmt: skip
async def test_refusals_say_what_to_do_and_wait_the_longest_backoff(
    make_config: MakeConfig,
    fake_daemon: FakeDaemon,
    caplog: pytest.LogCaptureFixture,
    code: str,
    level: str,
    advice: str,
) -> None:
    config = make_config(reconnect_max_s=0.4, token=TOKEN)
    with trio.fail_after(10):
        async with open_agent(config, runner=FakeRunner(), connect=fake_daemon.connect,
                              rng=random.Random(1)):  # fmt: skip
            side = await fake_daemon.accept()
            refusal = pb.Refusal(code=code, message="the daemon's words")
            await side.link.send(pb.ServerMessage(refusal=refusal))
            start = trio.current_time()
            await fake_daemon.accept()
            elapsed = trio.current_time() - start
    assert 0.4 <= elapsed < 1.0
    said = [r for r in caplog.records if r.name == "agent.credential"]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (level, f"host host-a: the daemon refused the connection: {code}: the daemon's words "
                f"({advice})"),
    ]  # fmt: skip


async def test_a_credential_file_that_is_not_one_is_ignored(
    make_config: MakeConfig, fake_daemon: FakeDaemon, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    state = tmp_path / "state"
    state.mkdir()
    (state / "credential").write_text("two words\n")
    config = make_config(token=TOKEN, state_dir=state)
    with trio.fail_after(10):
        async with open_agent(config, runner=FakeRunner(), connect=fake_daemon.connect) as agent:
            assert agent.credentials.to_present() == TOKEN
    assert f"{state / 'credential'} does not hold a credential; ignoring it" in caplog.text


async def test_a_credential_that_cannot_be_stored_still_serves_this_run(
    make_config: MakeConfig, fake_daemon: FakeDaemon, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    state = tmp_path / "state"
    (state / "credential").mkdir(parents=True)  # a directory where the file should go
    config = make_config(token=TOKEN, state_dir=state)
    with trio.fail_after(10):
        async with open_agent(config, runner=FakeRunner(), connect=fake_daemon.connect) as agent:
            side = await fake_daemon.accept()
            await side.link.send(pb.ServerMessage(welcome=pb.Welcome(credential="cred-mem")))
            await agent.wait_connected()
            assert agent.credentials.to_present() == "cred-mem"
    assert "enrolled, but its credential cannot be stored" in caplog.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "cred-mem" not in " ".join(r.getMessage() for r in errors)  # never logged


def test_tls_options_of_the_agent(tmp_path: Path) -> None:
    base = ["--server", "dispatch.example:7443"]
    config = load_config([*base, "--plaintext"], {})
    assert (config.plaintext, config.tls_ca) == (True, None)
    assert load_config(base, {}).plaintext is False  # TLS with the system's CAs by default
    for argv, option, message in (
        (["--plaintext", "--tls-ca", "ca.pem"], "--plaintext", "not both"),
        (["--tls-cert", "c.pem"], "--tls-key", "go together"),
        (["--tls-ca", str(tmp_path / "missing.pem")], "--tls-ca", "cannot read"),
    ):
        with pytest.raises(SettingsError) as refused:
            load_config([*base, *argv], {})
        assert refused.value.option == option and message in str(refused.value), argv
