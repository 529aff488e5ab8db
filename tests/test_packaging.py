"""The systemd units in packaging/systemd: each ExecStart line, run as written (only the paths
moved into a scratch directory: the install prefix to this venv, /etc/dispatch and /var/lib to
temporary ones, and the example listen addresses and server through DISPATCH_* variables, as
an operator's drop-in could; the agent's reconnect backoff is shortened the same way, so its
approval is noticed at once), starts a working program: dispatchd says READY=1 on the
NOTIFY_SOCKET given to it and answers /healthz, the agent enrols with the sample configuration
and connects; both stop cleanly on SIGTERM, dispatchd saying STOPPING=1."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from tests.e2e.cluster import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "packaging" / "systemd"
SAMPLES = ROOT / "packaging" / "etc" / "dispatch"
PREFIX = "/opt/devops-dispatch/bin/"


def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def mover(tmp: Path) -> dict[str, str]:
    return {
        PREFIX: f"{Path(sys.executable).parent}/",
        "/etc/dispatch/": f"{tmp}/etc/dispatch/",
        "/var/lib/": f"{tmp}/var/lib/",
    }


def moved(text: str, paths: dict[str, str]) -> str:
    for old, new in paths.items():
        text = text.replace(old, new)
    return text


def test_the_units_carry_the_settings_the_readme_promises() -> None:
    daemon = service_section(UNITS / "dispatchd.service")
    agent = service_section(UNITS / "dispatch-agent.service")
    assert (daemon["Type"], daemon["Restart"], daemon["LimitNOFILE"]) == (
        ["notify"],
        ["on-failure"],
        ["65536"],
    )
    for hardening in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictAddressFamilies",
    ):
        assert hardening in daemon, hardening
    assert (agent["Delegate"], agent["KillMode"], agent["Restart"]) == (
        ["yes"],
        ["process"],
        ["always"],
    )
    for sandbox in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "SystemCallFilter",
        "CapabilityBoundingSet",
    ):
        assert sandbox not in agent, f"the agent runs operators' commands: no {sandbox}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("name", ["dispatchd.service", "dispatch-agent.service"])
def test_systemd_analyze_verify_finds_nothing_to_say(name: str, tmp_path: Path) -> None:
    unit = tmp_path / name
    unit.write_text((UNITS / name).read_text().replace(PREFIX, f"{Path(sys.executable).parent}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")


def pki(etc: Path) -> None:
    ca = trustme.CA()
    (etc / "tls").mkdir(parents=True)
    ca.cert_pem.write_to_path(str(etc / "ca.pem"))
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(str(etc / "tls" / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(etc / "tls" / "server.pem"))


async def test_each_units_exec_start_runs_as_written(tmp_path: Path) -> None:
    paths = mover(tmp_path)
    etc = tmp_path / "etc" / "dispatch"
    pki(etc)
    (etc / "enrol.token").write_text("unit-enrol-token-0123456789\n")
    api_token = "unit-api-token-0123456789"
    (etc / "api.token").write_text(api_token + "\n")
    for sample in ("dispatchd.toml", "dispatch-agent.toml"):
        (etc / sample).write_text(moved((SAMPLES / sample).read_text(), paths))
    grpc_port, http_port = free_port(), free_port()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}

    daemon_unit = service_section(UNITS / "dispatchd.service")
    workdir = Path(moved(daemon_unit["WorkingDirectory"][0], paths))
    await trio.Path(workdir).mkdir(parents=True)  # systemd makes StateDirectory= before start
    notify_path = str(tmp_path / "notify")
    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    daemon_env = {
        **clean_env,
        "NOTIFY_SOCKET": notify_path,
        "DISPATCH_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "DISPATCH_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }
    argv = shlex.split(moved(daemon_unit["ExecStart"][0], paths))
    daemon_log = (tmp_path / "dispatchd.log").open("wb")
    daemon = await trio.lowlevel.open_process(
        argv, env=daemon_env, cwd=workdir, stdout=daemon_log, stderr=subprocess.STDOUT
    )
    agent_unit = service_section(UNITS / "dispatch-agent.service")
    agent_argv = shlex.split(moved(agent_unit["ExecStart"][0], paths))
    agent_env = {
        **clean_env,
        "DISPATCH_AGENT_SERVER": f"127.0.0.1:{grpc_port}",
        "DISPATCH_AGENT_HOST_ID": "unit-agent",
        # it asks again every --reconnect-max-s while pending: not 30 s in a test
        "DISPATCH_AGENT_RECONNECT_MAX_S": "0.5",
    }
    agent = None
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{http_port}",
        timeout=10,
        headers={"Authorization": f"Bearer {api_token}"},
    )
    try:
        with trio.fail_after(60):
            ready = await notify.recv(4096)
            assert ready.startswith(b"READY=1\nSTATUS=agents on 127.0.0.1:"), ready
            health = await http.get("/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            assert (await http.get("/metrics")).status_code == 200

            agent = await trio.lowlevel.open_process(
                agent_argv,
                env=agent_env,
                cwd=moved(agent_unit["WorkingDirectory"][0], paths),
                stdout=(tmp_path / "agent.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            # the sample keeps new hosts pending: an administrator approves this one
            while (await http.get("/api/v1/hosts/unit-agent")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
            approved = await http.post("/api/v1/hosts/unit-agent/approve")
            assert approved.status_code == 200, approved.text
            while True:
                host = (await http.get("/api/v1/hosts/unit-agent")).json()
                if host["status"] == "online":
                    break
                await trio.sleep(0.1)
            assert host["labels"] == {"role": "web", "dc": "fra1"}  # from the sample TOML
            # The host is online once the daemon recorded the stream; the agent writes its
            # credential a moment later, when the welcome that carries it arrives (bounded by
            # the fail_after above: a credential that never appears fails the test).
            credential = tmp_path / "var/lib/dispatch-agent/credential"
            while not credential.exists():  # noqa: ASYNC110
                await trio.sleep(0.05)

            agent.send_signal(signal.SIGTERM)
            assert await agent.wait() == 0
            daemon.send_signal(signal.SIGTERM)
            assert (await notify.recv(4096)).startswith(b"STOPPING=1\n")
            assert await daemon.wait() == 0
        assert (tmp_path / "var/lib/dispatch/dispatch.db").exists()  # where the sample puts it
    except BaseException:
        print((tmp_path / "dispatchd.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        with trio.CancelScope(shield=True):
            for process in (agent, daemon):
                if process is not None and process.returncode is None:
                    process.kill()
                    await process.wait()
            await http.aclose()
            notify.close()
            daemon_log.close()
