"""``dispatchctl``: the command line of devops-dispatch (a client of dispatchd's HTTP API only).

Exit status: 0 success (for ``run``: every host succeeded); 1 ``run``: some host did not
succeed; 2 usage or configuration error; 3 the API refused (its message is printed) or could not
be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from common.settings import SettingsError
from dispatchctl import __version__, admin, commands, config
from dispatchctl.client import ApiError, Client, Unreachable
from dispatchctl.commands import key_value, moment
from dispatchctl.render import Printer
from dispatchctl.run import run

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_API, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
TASK_STATUSES = "pending,queued,running,completed,failed,cancelled"
EXEC_STATUSES = (
    "pending,dispatched,running,succeeded,failed,timed_out,cancelled,dispatch_failed,skipped"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatchctl",
        description="Run scripts on many hosts through dispatchd, and look at what happened.",
        epilog="exit status: 0 success (run: every host succeeded), 1 run: some host did not, "
        "2 usage or configuration error, 3 API error or daemon unreachable, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"dispatchctl {__version__}")
    config.add_options(parser, top=True)
    _output_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _accept_common(p)
        p.set_defaults(handler=handler)
        return p

    p = command("run", "create and start a task, follow it, summarise every host", run)
    p.add_argument("--host", action="append", metavar="H", help="target host (repeatable)")
    p.add_argument(
        "--label",
        action="append",
        type=key_value,
        metavar="K=V",
        help="target every approved host with this label (repeatable: all must match)",
    )
    p.add_argument(
        "-c",
        "--command",
        action="append",
        metavar="SCRIPT",
        help="a command of the task (repeatable, run in order; the script after -- comes last)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds each command may run before it is killed (default 600)",
    )
    p.add_argument("--max-concurrency", type=int, metavar="N", help="hosts running at once")
    p.add_argument(
        "--max-failures", type=int, metavar="N", help="stop starting new hosts after N failed"
    )
    p.add_argument(
        "--delivery-timeout",
        type=float,
        metavar="S",
        help="seconds to wait for offline targets to come online (default: none)",
    )
    p.add_argument("--name", help="the task's name (default: the script's first line)")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="print every host's output as it comes, prefixed by the host",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "script",
        nargs=argparse.REMAINDER,
        metavar="-- SCRIPT...",
        help="the script, run with /bin/sh -c (words are joined by spaces)",
    )

    p = command("tasks", "list tasks, newest first", commands.tasks)
    p.add_argument("--status", help=f"comma-separated: {TASK_STATUSES}")
    p.add_argument("--host", help="tasks that ran on this host")
    _time_and_page(p)

    p = command(
        "task", "show a task, its progress and its groups of identical results", commands.task
    )
    p.add_argument("id", metavar="ID")

    p = command("executions", "list executions (one command on one host)", commands.executions)
    p.add_argument("--task", metavar="ID", help="of this task only (default: every task)")
    p.add_argument("--host", metavar="H")
    p.add_argument("--status", help=f"comma-separated: {EXEC_STATUSES}")
    _time_and_page(p)

    p = command("output", "print an execution's stored output", commands.output)
    p.add_argument("id", metavar="EXECUTION_ID")
    p.add_argument(
        "--stream",
        choices=("stdout", "stderr", "both"),
        default="both",
        help="which stream (default both: stdout to stdout, stderr to stderr)",
    )

    for name, text in (
        ("start", "start a pending task"),
        ("cancel", "cancel a task: kill what runs, end the rest"),
        ("retry", "a new task over the hosts that did not succeed"),
    ):
        p = command(name, text, commands.change_task)
        p.add_argument("id", metavar="ID")
        if name == "retry":
            p.add_argument(
                "--failed",
                action="store_true",
                help="the hosts that did not succeed (the only mode, the default)",
            )

    p = command("hosts", "list hosts", admin.hosts)
    p.add_argument("--status", choices=("online", "offline"))
    p.add_argument(
        "--label",
        action="append",
        type=key_value,
        metavar="K=V",
        help="hosts with this label (repeatable: all must match)",
    )
    p.add_argument("--enrollment", choices=("pending", "approved", "rejected", "revoked"))
    _page_flags(p)

    p = command("host", "show a host, or approve, reject or revoke it (admin)", admin.host)
    p.add_argument("action", choices=("show", "approve", "reject", "revoke"))
    p.add_argument("id", metavar="HOST")

    p = command("tokens", "list, create or revoke API tokens (admin)", admin.tokens)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _accept_common(actions.add_parser("list", help="every token (never the secrets)"))
    _page_flags(listing)
    create = _accept_common(actions.add_parser("create", help="a new token, printed once"))
    create.add_argument("name")
    create.add_argument("--role", choices=("viewer", "operator", "admin"), required=True)
    revoke = _accept_common(actions.add_parser("revoke", help="refuse a token from now on"))
    revoke.add_argument("id")

    p = command("audit", "the audit log, newest first (admin)", admin.audit)
    p.add_argument("--actor", help="e.g. token:ci-deploy, agent:web-1, bootstrap")
    p.add_argument("--action", help="e.g. task.create, host.revoke, auth.denied")
    p.add_argument("--outcome", choices=("attempted", "ok", "denied", "failed"))
    _time_and_page(p)
    return parser


def _accept_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The top level's options, accepted after a command too (help shown at the top only)."""
    config.add_options(parser, top=False)
    _output_flags(parser, top=False)
    return parser


def _output_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    hide = (lambda text: text) if top else (lambda _text: argparse.SUPPRESS)
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help=hide("print machine-readable JSON only"),
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        default=argparse.SUPPRESS,
        help=hide(
            "print remote output as it is, even to a terminal (by "
            "default terminal control sequences are removed)"
        ),
    )


def _page_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="per page (default 50)")
    parser.add_argument("--cursor", help="the next page, as the previous one said")
    parser.add_argument("--all", action="store_true", help="every page")


def _time_and_page(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", type=moment, metavar="T", help="RFC 3339 time or an age (30m, 6h, 7d)"
    )
    parser.add_argument("--until", type=moment, metavar="T")
    _page_flags(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 here
    try:
        settings = config.load(args, os.environ)
        token = settings.resolved_token()
    except SettingsError as exc:
        print(f"dispatchctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Printer(json_mode=getattr(args, "json", False), raw=getattr(args, "raw", False))
    client = Client(settings, token)
    handler: Callable[..., int] = args.handler
    try:
        if handler is run:  # the one command that needs a setting beyond the client's
            return run(args, client, out, settings.reconnect_s)
        return handler(args, client, out)
    except (ApiError, Unreachable) as exc:
        print(f"dispatchctl: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dispatchctl ... | head`
        sys.stderr.close()
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
