"""Identity and access end to end: the real dispatchd and dispatch-agent over mutual TLS on
loopback (certificates made by trustme), enrolment with an administrator's approval, the
enrolment token refused for an enrolled host, a certificate that names another host refused,
revocation that closes the stream and fails what runs at once, re-admission, roles and the
audit log."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.e2e.cluster import API_TOKEN, REPO, Cluster, Program

pytestmark = pytest.mark.e2e


def write_pki(directory: Path, *clients: str) -> dict[str, str]:
    directory.mkdir(parents=True)
    ca = trustme.CA()
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem",
             "key": directory / "server.key"}  # fmt: skip
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    for name in clients:
        leaf = ca.issue_cert(name, common_name=name)
        files[f"{name}.cert"] = directory / f"{name}.pem"
        files[f"{name}.key"] = directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[f"{name}.cert"]))
        leaf.private_key_pem.write_to_path(str(files[f"{name}.key"]))
    return {name: str(path) for name, path in files.items()}


def client_args(pki: dict[str, str], cert: str) -> list[str]:
    return ["--tls-ca", pki["ca"], "--tls-cert", pki[f"{cert}.cert"],
            "--tls-key", pki[f"{cert}.key"]]  # fmt: skip


async def eventually(check: Any, timeout_s: float = 30) -> Any:
    with trio.fail_after(timeout_s):
        while not (result := await check()):  # noqa: ASYNC110 (another process: no event)
            await trio.sleep(0.05)
        return result


async def log_says(program: Program, text: str, timeout_s: float = 30) -> None:
    async def check() -> bool:
        return text in program.log_text()

    await eventually(check, timeout_s)


async def test_dispatchd_does_not_serve_agents_unencrypted_unless_told(tmp_path: Path) -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "daemon", "--db", f"sqlite:///{tmp_path / 'd.db'}",
             "--agent-token", "a" * 20, "--api-token", "b" * 20],
            capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
        )  # fmt: skip
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "--tls-cert" in message and "--tls-key" in message and "--plaintext" in message


async def test_enrolment_approval_revocation_and_readmission_over_mutual_tls(
    cluster: Cluster, tmp_path: Path
) -> None:
    pki = write_pki(tmp_path / "pki", "m1")
    cluster.daemon_security_args = ["--tls-cert", pki["cert"], "--tls-key", pki["key"],
                                    "--tls-client-ca", pki["ca"]]  # fmt: skip
    cluster.agent_security_args = client_args(pki, "m1")
    await cluster.start_daemon()
    assert "agent port listening on 127.0.0.1" in cluster.daemon_log()
    assert "(mutual TLS)" in cluster.daemon_log()
    admin = {"Authorization": "Bearer " + (await cluster.post(
        "/api/v1/tokens", {"name": "admin-1", "role": "admin"}))["token"]}  # fmt: skip
    operator = {"Authorization": "Bearer " + (await cluster.post(
        "/api/v1/tokens", {"name": "op-1", "role": "operator"}))["token"]}  # fmt: skip

    # a new agent enrols and waits for an administrator
    agent = await cluster.start_agent("m1", wait=False)

    async def pending() -> Any:
        hosts = await cluster.get("/api/v1/hosts?enrollment=pending")
        return [h["id"] for h in hosts["items"]] == ["m1"]

    await eventually(pending)
    await log_says(agent, "pending_approval")
    body = {"name": "t", "commands": [{"script": "echo hi"}], "targets": {"hosts": ["m1"]},
            "start": True}  # fmt: skip
    refused = await cluster.http.post("/api/v1/tasks", json=body, headers=operator)
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "code": "invalid_request", "field": "targets.hosts.0",
        "message": "host 'm1' is pending: only approved hosts can be targeted",
    }  # fmt: skip
    denied = await cluster.http.post("/api/v1/hosts/m1/approve", headers=operator)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"

    approved = await cluster.http.post("/api/v1/hosts/m1/approve", headers=admin)
    assert approved.status_code == 200 and approved.json()["enrollment"] == "approved"
    await cluster.wait_online(["m1"])
    credential_file = tmp_path / "agents" / "m1" / "credential"

    async def stored() -> bool:  # the agent stores it once welcomed (just after "online")
        return credential_file.exists() and credential_file.read_text().endswith("\n")

    await eventually(stored, timeout_s=10)
    first_credential = credential_file.read_text()
    assert stat.S_IMODE(credential_file.stat().st_mode) == 0o600
    task = await cluster.http.post("/api/v1/tasks", json=body, headers=operator)
    assert task.status_code == 201
    assert (await cluster.wait_task(task.json()["id"]))["status"] == "completed"

    # the enrolment token does not speak for the enrolled host, even with its certificate
    impostor = Program("impostor", cluster.agent_argv(
        "m1", "--state-dir", str(tmp_path / "impostor")), tmp_path / "impostor.log")  # fmt: skip
    cluster.agents["impostor"] = impostor
    await impostor.start()
    await log_says(impostor, "the daemon refused the connection: enrolled")
    # and a certificate for m1 does not speak for m2
    stranger = Program("stranger", cluster.agent_argv("m2"), tmp_path / "stranger.log")
    cluster.agents["stranger"] = stranger
    await stranger.start()
    await log_says(stranger, "the client certificate does not name host 'm2'")
    await impostor.kill()
    await stranger.kill()
    assert await cluster.metric("dispatch_agent_replaced_total") == 0
    assert [h["id"] for h in (await cluster.get("/api/v1/hosts"))["items"]] == ["m1"]
    assert (await cluster.get("/api/v1/hosts/m1"))["status"] == "online"

    # revoking closes the stream at once and fails what runs there
    body["commands"] = [{"script": "echo started; sleep 60", "timeout_s": 120}]
    task_id = (await cluster.http.post("/api/v1/tasks", json=body, headers=operator)).json()["id"]
    (execution,) = await cluster.wait_executions(
        task_id, lambda items: items[0]["status"] == "running"
    )
    revoked = await cluster.http.post("/api/v1/hosts/m1/revoke", headers=admin)
    assert revoked.status_code == 200
    assert {k: revoked.json()[k] for k in ("enrollment", "stream_closed", "executions_failed")} == (
        {"enrollment": "revoked", "stream_closed": True, "executions_failed": 1}
    )
    await cluster.wait_offline("m1", timeout_s=5)
    finished = await cluster.wait_task(task_id, timeout_s=10)
    detail = await cluster.execution(execution["id"])
    assert (finished["status"], detail["status"], detail["reason"], detail["exit_code"]) == (
        "failed", "failed", "host_revoked", None
    )  # fmt: skip
    await log_says(agent, "an administrator revoked this host")

    # approved again, the agent enrols anew by itself, with a new credential
    await cluster.http.post("/api/v1/hosts/m1/approve", headers=admin)
    await cluster.wait_online(["m1"])

    async def stored_anew() -> bool:
        return credential_file.read_text() != first_credential

    await eventually(stored_anew, timeout_s=10)
    body["commands"] = [{"script": "echo back"}]
    task = await cluster.http.post("/api/v1/tasks", json=body, headers=operator)
    assert (await cluster.wait_task(task.json()["id"]))["status"] == "completed"

    # the audit log tells the story
    audit = (await cluster.http.get("/api/v1/audit?limit=1000", headers=admin)).json()["items"]
    changes = [(e["actor"], e["action"], e["target"], e["outcome"]) for e in reversed(audit)
               if e["action"].startswith("host.")]  # fmt: skip
    assert changes == [  # the operator's try is an auth.denied, not a host change
        ("token:admin-1", "host.approve", "m1", "ok"),
        ("token:admin-1", "host.revoke", "m1", "ok"),
        ("token:admin-1", "host.approve", "m1", "ok"),
    ]  # fmt: skip
    refusals = {e["details"]["code"] for e in audit if e["action"] == "agent.refused"}
    assert {"pending_approval", "enrolled", "unauthenticated", "revoked"} <= refusals, [
        (e["actor"], e["action"], e["details"]) for e in audit
    ]
    assert [e["actor"] for e in audit if e["action"] == "agent.enrol"] == ["agent:m1"] * 2
    forbidden = [e for e in audit if e["action"] == "auth.denied"]
    assert [(e["actor"], e["status"]) for e in forbidden] == [("token:op-1", 403)]
    text = str(audit)
    assert API_TOKEN not in text and first_credential.strip() not in text


async def test_an_agent_that_does_not_trust_the_daemon_never_connects(
    cluster: Cluster, tmp_path: Path
) -> None:
    pki = write_pki(tmp_path / "pki")
    other = write_pki(tmp_path / "other")
    cluster.daemon_security_args = ["--tls-cert", pki["cert"], "--tls-key", pki["key"],
                                    "--auto-approve"]  # fmt: skip
    cluster.agent_security_args = ["--tls-ca", other["ca"]]
    await cluster.start_daemon()
    stranger = await cluster.start_agent("s1", wait=False)
    await log_says(stranger, "CERTIFICATE_VERIFY_FAILED")
    plain = Program("plain", cluster.agent_argv("s2", "--plaintext"), tmp_path / "plain.log")
    plain.argv = [a for a in plain.argv if a not in ("--tls-ca", other["ca"])]
    cluster.agents["plain"] = plain
    await plain.start()
    await log_says(plain, "could not connect")
    assert (await cluster.get("/api/v1/hosts"))["items"] == []
    # one that does, enrols (auto-approved) over TLS
    cluster.agent_security_args = ["--tls-ca", pki["ca"]]
    await cluster.start_agent("s3")
    assert [h["id"] for h in (await cluster.get("/api/v1/hosts"))["items"]] == ["s3"]
