"""dispatchctl's commands other than ``run``: listing and showing, and the few changes (start,
cancel, retry, host enrolment, tokens). Each takes the parsed arguments, a ``Client`` and a
``Printer`` and returns the exit status; ``--json`` prints the API's answer as it is."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatchctl.client import Client, Params
from dispatchctl.render import Printer, clean, seconds, status_text, when

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def moment(text: str) -> str:
    """``--since``/``--until``: RFC 3339, or an age like ``30m``, ``6h``, ``7d`` (ago)."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        ago = float(relative.group(1)) * _UNIT_S[relative.group(2)]
        at = datetime.now(UTC) - timedelta(seconds=ago)
        return at.isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time (2026-01-31T12:00:00Z) or an age (30m, 6h, 7d), "
            f"got {text!r}"
        ) from None
    return text


def key_value(text: str) -> str:
    key, sep, _value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def params_of(args: argparse.Namespace, *names: str) -> Params:
    """Query parameters from the arguments of these names that were given."""
    params: Params = []
    for name in names:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        for item in value if isinstance(value, list) else [value]:
            params.append((name, str(item)))
    return params


def page(
    client: Client,
    out: Printer,
    path: str,
    params: Params,
    args: argparse.Namespace,
    columns: list[str],
    row: Any,
) -> int:
    params = [*params, ("limit", str(args.limit))]
    if args.cursor:
        params.append(("cursor", args.cursor))
    page = client.pages(path, params, follow=args.all)
    if out.json_mode:
        out.json(page)
        return 0
    if page["items"]:
        out.table(columns, (row(item) for item in page["items"]))
    else:
        out.note("nothing matches")
    if page["next_cursor"]:
        out.note(f"more: add --cursor {page['next_cursor']} (or --all)")
    return 0


# ---------------------------------------------------------------- tasks and executions


def tasks(args: argparse.Namespace, client: Client, out: Printer) -> int:
    params = params_of(args, "status", "host", "since", "until")
    return page(
        client,
        out,
        "/tasks",
        params,
        args,
        ["ID", "NAME", "STATUS", "CREATED", "DURATION", "PROGRESS"],
        lambda t: [
            t["id"],
            t["name"],
            status_text(t["status"]),
            when(t["created_at"]),
            seconds(t["duration_s"]),
            _progress(t.get("progress")),
        ],
    )


def _progress(progress: dict[str, Any] | None) -> str:
    if not progress:
        return "-"
    counts = ", ".join(f"{n} {s}" for s, n in progress["by_status"].items())
    return f"{progress['finished']}/{progress['total']} ({counts})" if counts else "0/0"


def task(args: argparse.Namespace, client: Client, out: Printer) -> int:
    found = client.get(f"/tasks/{args.id}")
    stats = client.get(f"/tasks/{args.id}/stats")
    if out.json_mode:
        out.json({"task": found, "stats": stats})
        return 0
    show_task(out, found)
    show_groups(out, stats)
    return 0


def show_task(out: Printer, t: dict[str, Any]) -> None:
    out.line("task ", t["id"], ' "', t["name"], '": ', status_text(t["status"]))
    for label, value in (
        ("created", when(t["created_at"])),
        ("started", when(t["started_at"])),
        ("finished", when(t["finished_at"])),
        ("duration", seconds(t["duration_s"])),
        ("progress", _progress(t.get("progress"))),
        ("targets", _targets(t["targets"])),
        (
            "limits",
            f"max_concurrency {_or_none(t.get('max_concurrency'))}, "
            f"max_failures {_or_none(t.get('max_failures'))}",
        ),
    ):
        out.line(f"  {label:<9}", value)
    if t.get("retry_of"):
        out.line("  retry of ", t["retry_of"])
    if t.get("error"):
        out.line("  error    ", t["error"])
    for command in t["commands"]:
        args = " ".join(command["args"])
        out.line(
            f"  command {command['index']}: ",
            command["script"],
            f"  {args}" if args else "",
            f"  (timeout {command['timeout_s']:g} s)",
        )


def _or_none(value: Any) -> str:
    return "none" if value is None else str(value)


def _targets(targets: dict[str, Any]) -> str:
    hosts = ", ".join(targets.get("hosts") or [])
    labels = ", ".join(f"{k}={v}" for k, v in (targets.get("labels") or {}).items())
    return (
        "; ".join(
            part for part in (hosts and f"hosts {hosts}", labels and f"labels {labels}") if part
        )
        or "-"
    )


def show_groups(out: Printer, stats: dict[str, Any], preview_lines: int = 5) -> None:
    """Hosts with identical results (same command, exit code and output), largest first."""
    groups = stats.get("groups") or []
    if not groups:
        return
    out.line(
        f"identical results ({len(groups)} of {stats.get('groups_total', len(groups))} groups):"
    )
    for group in groups:
        shown, count = group["hosts"], group["count"]
        more = f" and {count - len(shown)} more" if count > len(shown) else ""
        out.line(
            f"  {count} host{'s' if count != 1 else ''}, command {group['command_index']}, "
            f"exit {group['exit_code']}: ",
            ", ".join(shown),
            more,
        )
        preview = clean(group.get("stdout_preview") or "").splitlines()
        for text in preview[:preview_lines]:
            out.line("    | ", text)
        if len(preview) > preview_lines:
            out.line("    | …")


def executions(args: argparse.Namespace, client: Client, out: Printer) -> int:
    path = f"/tasks/{args.task}/executions" if args.task else "/executions"
    params = params_of(args, "host", "status", "since", "until")
    return page(
        client,
        out,
        path,
        params,
        args,
        ["ID", "TASK", "CMD", "HOST", "STATUS", "REASON", "EXIT", "STARTED", "DURATION"],
        lambda e: [
            e["id"],
            e["task_id"],
            e["command_index"],
            e["host_id"],
            status_text(e["status"]),
            e["reason"],
            e["exit_code"],
            when(e["started_at"]),
            seconds(e["duration_s"]),
        ],
    )


def output(args: argparse.Namespace, client: Client, out: Printer) -> int:
    streams = ("stdout", "stderr") if args.stream == "both" else (args.stream,)
    answers = {}
    for stream in streams:
        response = client.request(
            "GET", f"/executions/{args.id}/output", params=[("stream", stream)]
        )
        answers[stream] = response
    if out.json_mode:
        out.json({stream: _output_json(response) for stream, response in answers.items()})
        return 0
    for stream, response in answers.items():
        to_stderr = stream == "stderr" and args.stream == "both"
        target = out.stderr if to_stderr else out.stdout
        omitted = int(response.headers.get("X-Output-Omitted-Bytes", "0"))
        if out.raw or not target.isatty():  # the stored bytes, exactly
            target.flush()
            binary = getattr(target, "buffer", None)
            if binary is not None:
                binary.write(response.content)
                binary.flush()
            else:
                target.write(response.content.decode("utf-8", "replace"))
            if omitted:
                out.note(f"{omitted} bytes of {stream} were not stored (--max-output-bytes)")
            continue
        target.write(clean(_with_gaps(response)))
        target.flush()
    return 0


def _with_gaps(response: Any) -> str:
    """The stored bytes as text, with a marker where the daemon dropped the middle."""
    data, ranges = response.content, response.headers.get("X-Output-Ranges", "")
    pieces, position, offset = [], 0, 0
    for span in filter(None, ranges.split(",")):
        start, end = (int(x) for x in span.split("-"))
        if start > offset:
            pieces.append(f"\n[... {start - offset} bytes omitted ...]\n")
        pieces.append(data[position : position + end - start].decode("utf-8", "replace"))
        position, offset = position + end - start, end
    total = int(response.headers.get("X-Output-Total-Bytes", offset))
    if total > offset:
        pieces.append(f"\n[... {total - offset} bytes omitted ...]\n")
    return "".join(pieces) if ranges else data.decode("utf-8", "replace")


def _output_json(response: Any) -> dict[str, Any]:
    return {
        "text": response.content.decode("utf-8", "replace"),
        "total_bytes": int(response.headers.get("X-Output-Total-Bytes", "0")),
        "omitted_bytes": int(response.headers.get("X-Output-Omitted-Bytes", "0")),
        "ranges": response.headers.get("X-Output-Ranges", ""),
    }


def change_task(args: argparse.Namespace, client: Client, out: Printer) -> int:
    """start, cancel, retry."""
    params = [("only", "failed")] if args.command == "retry" else None
    answer = client.post(f"/tasks/{args.id}/{args.command}", params=params)
    if out.json_mode:
        out.json(answer)
    elif args.command == "retry":
        out.line(
            f"task {args.id} retried as task ",
            answer["id"],
            ": ",
            status_text(answer["status"]),
            f" ({answer['progress']['total']} executions)",
        )
    else:
        out.line("task ", answer["id"], ": ", status_text(answer["status"]))
    return 0


def fail(message: str) -> int:
    print(f"dispatchctl: {message}", file=sys.stderr)
    return 2
