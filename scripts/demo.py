"""Start devops-dispatch for real on this machine: dispatchd on an embedded SQLite file, three
local agents, one sample task; then print where to look, and keep running until Ctrl-C.

Run through ``scripts/demo`` (which prepares .venv first). Everything it writes lives in
``.run/demo/``: the database, the tokens, the logs and the agents' state directories.
Ports: DEMO_GRPC_PORT (default 7443) and DEMO_HTTP_PORT (default 8080).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run" / "demo"
BIN = Path(sys.executable).parent
GRPC_PORT = int(os.environ.get("DEMO_GRPC_PORT", "7443"))
HTTP_PORT = int(os.environ.get("DEMO_HTTP_PORT", "8080"))
URL = f"http://127.0.0.1:{HTTP_PORT}"
HOSTS = ("demo-1", "demo-2", "demo-3")


def token(name: str) -> Path:
    path = RUN / f"{name}.token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path


def api(method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        URL + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": f"Bearer {API_TOKEN}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for(what: str, check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    print(f"demo: {what} did not happen within {timeout_s:g} s; see the logs in {RUN}",
          file=sys.stderr)  # fmt: skip
    stop(status=1)  # never leave the programs it started running


def start(argv: list[str], log: str) -> subprocess.Popen[bytes]:
    with open(RUN / log, "ab") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)


RUN.mkdir(parents=True, exist_ok=True)
API_TOKEN = token("api").read_text().strip()
processes: list[subprocess.Popen[bytes]] = []


def stop(*_: object, status: int = 0) -> None:
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    sys.exit(status)


signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)

processes.append(start([
    str(BIN / "dispatchd"), "--db", f"sqlite:///{RUN / 'dispatch.db'}",
    "--grpc-listen", f"127.0.0.1:{GRPC_PORT}", "--http-listen", f"127.0.0.1:{HTTP_PORT}",
    "--agent-token-file", str(token("agent")), "--api-token-file", str(token("api")),
    # loopback only: no TLS, and the demo's own agents are admitted as they enrol
    "--plaintext", "--auto-approve",
], "dispatchd.log"))  # fmt: skip
wait_for("dispatchd answering on " + URL, lambda: api("GET", "/healthz")["status"] == "ok")
for host in HOSTS:
    processes.append(start([
        str(BIN / "dispatch-agent"), "--server", f"127.0.0.1:{GRPC_PORT}",
        "--token-file", str(token("agent")), "--host-id", host, "--label", "role=demo",
        "--state-dir", str(RUN / "agents" / host), "--plaintext",
    ], f"agent-{host}.log"))  # fmt: skip
wait_for(
    "three agents online",
    lambda: len(api("GET", "/api/v1/hosts?status=online&label=role=demo")["items"]) == 3,
)

task = api("POST", "/api/v1/tasks", {
    "name": "hello from the demo",
    "commands": [
        {"script": 'echo "hello from $(hostname), pid $$"; uname -sr; sleep 1', "timeout_s": 30},
        {"script": "df -h / | tail -n 1", "timeout_s": 30},
    ],
    "targets": {"labels": {"role": "demo"}},
    "start": True,
})  # fmt: skip
task_id = task["id"]


def task_if_finished() -> Any:
    current = api("GET", f"/api/v1/tasks/{task_id}")
    return current if current["status"] in ("completed", "failed", "cancelled") else None


finished = wait_for("the sample task finishing", task_if_finished)

print(
    f"\nTask {task_id} ({finished['name']}): {finished['status']} in {finished['duration_s']:.2f} s"
)
print(f"{'host':10} {'cmd':>3}  {'status':10} {'exit':>4} {'seconds':>7}  first line of stdout")
for execution in api("GET", f"/api/v1/tasks/{task_id}/executions")["items"]:
    detail = api("GET", f"/api/v1/executions/{execution['id']}")
    first_line = (detail["stdout"].splitlines() or [""])[0][:60]
    print(
        f"{execution['host_id']:10} {execution['command_index']:>3}  {execution['status']:10} "
        f"{execution['exit_code']!s:>4} {execution['duration_s'] or 0:7.3f}  {first_line}"
    )

CURL = 'curl -H "Authorization: Bearer $DISPATCH_TOKEN"'
print(f"""
dispatchd is running with 3 agents. Where to look next:
  web console      {URL}/   sign in with the API token: {API_TOKEN}
  API token        export DISPATCH_TOKEN=$(cat {RUN / "api.token"}) DISPATCH_URL={URL}
  command line     .venv/bin/dispatchctl task {task_id}
                   .venv/bin/dispatchctl run --label role=demo -- 'uptime'
  the task         {URL}/#/tasks/{task_id}
                   {CURL} {URL}/api/v1/tasks/{task_id}
  its executions   {CURL} {URL}/api/v1/tasks/{task_id}/executions
  live events      {CURL} -N {URL}/api/v1/tasks/{task_id}/events
  hosts            {CURL} {URL}/api/v1/hosts
  API description  {URL}/openapi.json      metrics: {URL}/metrics
  logs             {RUN}/*.log
  database         {RUN / "dispatch.db"} (SQLite)
Press Ctrl-C to stop everything.""")
signal.pause()
