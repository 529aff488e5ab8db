"""``dispatchctl run``: create and start a task, follow it live, then say how every host did.

The task is created with ``"start": true`` and an ``Idempotency-Key`` of this invocation, so a
creation retried after a lost answer is the same task. Its event stream is read from the
beginning (``Last-Event-ID: 0``: the daemon replays what happened before the stream opened) and
resumed from the last event id after a break, for up to ``--reconnect-s``, waiting between
attempts as ``common.retry.Backoff`` says (with jitter, so the clients of a restarted daemon do not
all come back at once); an event received starts the waits over. The summary comes from
``/tasks/{id}`` (status), ``/tasks/{id}/executions`` (a row per host and command) and
``/tasks/{id}/stats`` (groups of identical results). The exit status is 0 only if every host
succeeded (the task is ``completed``), else 1.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.retry import Backoff
from dispatchctl import commands
from dispatchctl.client import ApiError, Client, Event, Unreachable
from dispatchctl.render import Printer, seconds, status_text

EXIT_ALL_SUCCEEDED, EXIT_SOME_FAILED = 0, 1
TERMINAL_TASK = frozenset({"completed", "failed", "cancelled"})
SUMMARY_ROWS = 200  # above this many executions, the table lists only those that did not succeed
_READ_TIMEOUT_S = 45.0  # the daemon sends a keepalive every 15 s on an idle stream
# short first waits: a cut connection is usually back at once; at most 5 s, so a daemon that
# restarted is found again soon after it listens
_RECONNECT_FIRST_S, _RECONNECT_MAX_S = 0.2, 5.0


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    scripts = list(args.command or [])
    words = list(args.script or [])
    if words[:1] == ["--"]:
        words = words[1:]
    if words:
        scripts.append(" ".join(words))
    commands_ = [{"script": s, "timeout_s": args.timeout} for s in scripts]
    labels = dict(item.split("=", 1) for item in args.label or [])
    body: dict[str, Any] = {
        "name": args.name or _default_name(scripts),
        "commands": commands_,
        "targets": {"hosts": list(args.host or []), "labels": labels},
        "start": True,
    }
    for option in ("max_concurrency", "max_failures"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    if args.delivery_timeout is not None:
        body["delivery_timeout_s"] = args.delivery_timeout
    return body


def _default_name(scripts: list[str]) -> str:
    first = scripts[0].strip().splitlines()[0] if scripts and scripts[0].strip() else "dispatchctl"
    return first if len(first) <= 60 else first[:59] + "…"


class _Follower:
    """Reads the event stream, keeps the progress bar and prints ``--follow`` lines."""

    def __init__(
        self,
        out: Printer,
        task: dict[str, Any],
        *,
        follow: bool,
        bar: bool,
        lookup: Callable[[str], dict[str, Any]],
    ) -> None:
        self.out = out
        self._lookup = lookup  # an execution by id, for output that came before its state
        self.follow = follow
        self.last_id = 0
        self.status = task["status"]
        self.commands = len(task["commands"])
        self.partial: dict[tuple[str, str], str] = {}  # (execution, stream) -> unfinished line
        self.hosts: dict[str, tuple[str, int]] = {}  # execution id -> (host, command index)
        console = Console(file=out.stderr, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not bar or out.json_mode or not console.is_terminal,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        total = task["progress"]["total"]
        self.bar = self.progress.add_task(f"task {task['id']}", total=total, counts="")

    def handle(self, event: Event) -> bool:
        """Apply one event; True when the stream says the task ended."""
        if event.id is not None:
            self.last_id = max(self.last_id, event.id)
        if self.out.json_mode and self.follow:
            self.out.json_line({"event": event.kind, "id": event.id, "data": event.data})
        if event.kind == "progress":
            counts = ", ".join(f"{n} {s}" for s, n in event.data["by_status"].items())
            self.progress.update(
                self.bar, total=event.data["total"], completed=event.data["finished"], counts=counts
            )
        elif event.kind == "task":
            self.status = event.data["status"]
        elif event.kind == "execution":
            self.hosts[event.data["id"]] = (event.data["host_id"], event.data["command_index"])
            if event.data["status"] not in ("pending", "dispatched", "running"):
                self._flush(event.data["id"])
        elif event.kind == "output" and self.follow and not self.out.json_mode:
            self._output(event.data)
        elif event.kind == "end":
            self.status = event.data["status"]
            for execution_id, _stream in list(self.partial):
                self._flush(execution_id)
            return True
        return False

    def _output(self, data: dict[str, Any]) -> None:
        key = (data["execution_id"], data["stream"])
        text = self.partial.pop(key, "") + data["text"]
        *lines, rest = text.split("\n")
        for line in lines:
            self._print(data["execution_id"], data["stream"], line, host=data["host_id"])
        if rest:
            self.partial[key] = rest

    def _flush(self, execution_id: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self.partial.pop((execution_id, stream), None)
            if rest:
                self._print(execution_id, stream, rest)

    def _print(self, execution_id: str, stream: str, line: str, host: str | None = None) -> None:
        if self.commands == 1:
            label = host or self.hosts.get(execution_id, ("?", 0))[0]
        else:
            if execution_id not in self.hosts:
                found = self._lookup(execution_id)
                self.hosts[execution_id] = (found["host_id"], found["command_index"])
            known_host, index = self.hosts[execution_id]
            label = f"{known_host}#{index}"
        mark = "!" if stream == "stderr" else "|"
        text = f"{label} {mark} {self.out.remote(line)}"
        if self.progress.live.is_started and self.out.stdout_is_terminal:
            # one terminal for both: print above the bar, which lives on stderr
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.out.stdout.write(text + "\n")
            self.out.stdout.flush()


def run(args: argparse.Namespace, client: Client, out: Printer, reconnect_s: float) -> int:
    if not (args.host or args.label):
        return commands.fail("run: name the targets with --host H and/or --label K=V")
    body = request_body(args)
    if not body["commands"]:
        return commands.fail("run: give the script after --, or with -c SCRIPT")
    task = _create(client, body)
    if not out.json_mode:
        out.note(
            f"task {task['id']} started ({task['progress']['total']} executions); "
            f"dispatchctl cancel {task['id']} stops it"
        )
    follower = _Follower(
        out, task, follow=args.follow, bar=not args.no_progress,
        lookup=lambda execution_id: client.get(f"/executions/{execution_id}"),
    )  # fmt: skip
    try:
        with follower.progress:
            _follow(client, task["id"], follower, output=args.follow, reconnect_s=reconnect_s)
    except KeyboardInterrupt:
        out.note(
            f"interrupted: task {task['id']} goes on (dispatchctl cancel {task['id']} stops it)"
        )
        return 130
    return summary(client, out, task["id"], one_line=args.follow)


def _create(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    key = {"Idempotency-Key": f"dispatchctl-{uuid.uuid4()}"}
    task: dict[str, Any]
    try:
        task = client.post("/tasks", body, headers=key)
    except Unreachable:  # the answer may be what was lost: the same key gives the same task
        time.sleep(1.0)
        task = client.post("/tasks", body, headers=key)
    return task


def _follow(
    client: Client,
    task_id: str,
    follower: _Follower,
    *,
    output: bool,
    reconnect_s: float,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    backoff = backoff or Backoff(_RECONNECT_FIRST_S, _RECONNECT_MAX_S)
    broken_since: float | None = None
    while True:
        try:
            for event in client.events(
                task_id,
                last_event_id=follower.last_id,
                output=output,
                read_timeout_s=_READ_TIMEOUT_S,
            ):
                if event.kind == "error":
                    raise Unreachable(f"the event stream failed: {event.data['error']['message']}")
                # progress: the next break gets all of --reconnect-s and the shortest waits again
                broken_since = None
                backoff.reset()
                if follower.handle(event):
                    return
            reason = "the daemon closed the event stream"
        except Unreachable as exc:
            reason = str(exc)
        except ApiError as exc:
            if exc.status != 503:  # too many streams, or a daemon restarting: try again
                raise
            reason = str(exc)
        if follower.status in TERMINAL_TASK:
            return
        now = clock()
        broken_since = now if broken_since is None else broken_since
        if now - broken_since > reconnect_s:
            raise Unreachable(
                f"{reason}; gave up after {reconnect_s:g} s (task {task_id} goes "
                f"on: dispatchctl task {task_id})"
            )
        sleep(backoff.next_delay())


def summary(client: Client, out: Printer, task_id: str, *, one_line: bool = False) -> int:
    task = client.get(f"/tasks/{task_id}")
    stats = client.get(f"/tasks/{task_id}/stats")
    rows = client.pages(f"/tasks/{task_id}/executions", [("limit", "1000")], follow=True)["items"]
    code = EXIT_ALL_SUCCEEDED if task["status"] == "completed" else EXIT_SOME_FAILED
    if out.json_mode:  # after --follow's event lines, the summary is one line too
        result = {"task": task, "stats": stats, "executions": rows, "succeeded": code == 0}
        if one_line:
            out.json_line({"summary": result})
        else:
            out.json(result)
        return code
    total, ok = len(rows), sum(1 for r in rows if r["status"] == "succeeded")
    out.line(
        "task ",
        task["id"],
        ' "',
        task["name"],
        '": ',
        status_text(task["status"]),
        f" in {seconds(task['duration_s'])}: {ok}/{total} succeeded",
    )
    shown = rows if total <= SUMMARY_ROWS else [r for r in rows if r["status"] != "succeeded"]
    many_commands = len(task["commands"]) > 1
    columns = ["HOST", *(["CMD"] if many_commands else []), "STATUS", "EXIT", "DURATION", "REASON"]
    out.table(
        columns,
        (
            [
                r["host_id"],
                *([r["command_index"]] if many_commands else []),
                status_text(r["status"]),
                r["exit_code"],
                seconds(r["duration_s"]),
                _reason(r),
            ]
            for r in shown
        ),
    )
    if len(shown) < total:
        out.line(
            f"... and {total - len(shown)} more that succeeded "
            f"(dispatchctl executions --task {task_id})"
        )
    commands.show_groups(out, stats)
    return code


def _reason(row: dict[str, Any]) -> str:
    if row["status"] == "succeeded":
        return ""
    reason = row["reason"] or ""
    if row.get("signal"):
        reason += f" (signal {row['signal']})"
    if row.get("error"):
        reason += f": {row['error']}"
    return reason
