"""dispatchctl's commands about hosts, API tokens and the audit log (most need the admin role).
Each takes the parsed arguments, a ``Client`` and a ``Printer`` and returns the exit status."""

from __future__ import annotations

import argparse

from dispatchctl.client import Client
from dispatchctl.commands import page, params_of
from dispatchctl.render import Printer, status_text, when

# ---------------------------------------------------------------- hosts


def hosts(args: argparse.Namespace, client: Client, out: Printer) -> int:
    params = params_of(args, "status", "label", "enrollment")
    return page(
        client,
        out,
        "/hosts",
        params,
        args,
        ["ID", "STATUS", "ENROLMENT", "LABELS", "AGENT", "ADDRESS", "LAST SEEN"],
        lambda h: [
            h["id"],
            status_text(h["status"]),
            h.get("enrollment"),
            ",".join(f"{k}={v}" for k, v in h["labels"].items()),
            h["agent_version"],
            h["address"],
            when(h["last_seen_at"]),
        ],
    )


def host(args: argparse.Namespace, client: Client, out: Printer) -> int:
    if args.action == "show":
        answer = client.get(f"/hosts/{args.id}")
    else:
        answer = client.post(f"/hosts/{args.id}/{args.action}")
    if out.json_mode:
        out.json(answer)
        return 0
    out.line(
        "host ",
        answer["id"],
        ": ",
        status_text(answer["status"]),
        ", enrolment ",
        answer.get("enrollment") or "-",
    )
    if args.action == "revoke":
        out.line(
            f"  stream closed: {'yes' if answer.get('stream_closed') else 'no'}, executions "
            f"failed: {answer.get('executions_failed', 0)}"
        )
    labels = ", ".join(f"{k}={v}" for k, v in answer["labels"].items())
    out.line("  labels   ", labels or "-")
    out.line("  agent    ", answer["agent_version"] or "-", " at ", answer["address"] or "-")
    out.line("  last seen ", when(answer["last_seen_at"]))
    for connection in answer.get("connections") or []:
        ended = connection["disconnected_at"]
        out.line(
            "  connected ",
            when(connection["connected_at"]),
            " from ",
            connection["address"] or "-",
            " until ",
            when(ended) if ended else "now",
            f" ({connection['close_reason']})" if connection.get("close_reason") else "",
        )
    return 0


# ---------------------------------------------------------------- tokens and audit


def tokens(args: argparse.Namespace, client: Client, out: Printer) -> int:
    if args.action == "list":
        return page(
            client,
            out,
            "/tokens",
            [],
            args,
            ["ID", "NAME", "ROLE", "CREATED", "BY", "LAST USED", "REVOKED"],
            lambda t: [
                t["id"],
                t["name"],
                t["role"],
                when(t["created_at"]),
                t["created_by"],
                when(t["last_used_at"]),
                when(t["revoked_at"]),
            ],
        )
    if args.action == "create":
        answer = client.post("/tokens", {"name": args.name, "role": args.role})
        if out.json_mode:
            out.json(answer)
        else:
            out.note(f"token {answer['id']} ({answer['role']}); it is shown this once:")
            out.stdout.write(answer["token"] + "\n")
        return 0
    answer = client.delete(f"/tokens/{args.id}")
    if out.json_mode:
        out.json(answer)
    else:
        out.line(
            "token ",
            answer["id"],
            " (",
            answer["name"],
            ") revoked at ",
            when(answer["revoked_at"]),
        )
    return 0


def audit(args: argparse.Namespace, client: Client, out: Printer) -> int:
    params = params_of(args, "actor", "action", "outcome", "since", "until")
    return page(
        client,
        out,
        "/audit",
        params,
        args,
        ["AT", "ACTOR", "ROLE", "ACTION", "TARGET", "OUTCOME", "STATUS", "ADDRESS"],
        lambda a: [
            when(a["at"]),
            a["actor"],
            a["role"],
            a["action"],
            a["target"],
            a["outcome"],
            a["status"],
            a["address"],
        ],
    )
