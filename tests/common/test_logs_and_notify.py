"""JSON log lines carry the ids their message names; sd_notify reaches a datagram socket."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from common import sd_notify
from common.logs import JsonFormatter


def formatted(message: str, *args: object, fields: dict[str, str] | None = None,
              **extra: object) -> dict[str, object]:  # fmt: skip
    record = logging.LogRecord("daemon.x", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return json.loads(JsonFormatter(fields).format(record))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("message", "args", "ids"),
    [
        ("task %s completed (%d/%d succeeded)", (12, 3, 3), {"task_id": "12"}),
        ("host %s connected from %s", ("web-1.fra", "10.0.0.1:5"), {"host_id": "web-1.fra"}),
        ("stream from %s (host %r) refused", ("1.2.3.4", "db:7"), {"host_id": "db:7"}),
        ("host %s: %d executions in flight settled failed", ("a", 2), {"host_id": "a"}),
        ("execution %s: %s not recorded", (345, "x"), {"execution_id": "345"}),
        ("command_host %d: started, pid %d", (77, 100), {"execution_id": "77"}),
        ("host %s execution %s: event seq 3 refused", ("w2", 9), {"host_id": "w2",
                                                                   "execution_id": "9"}),
        ("%d hosts were online when the daemon last stopped", (3,), {}),
    ],
)  # fmt: skip
def test_json_lines_carry_the_ids_the_message_names(
    message: str, args: tuple[object, ...], ids: dict[str, str]
) -> None:
    entry = formatted(message, *args)
    assert entry["message"] == message % args
    assert {k: entry[k] for k in ("task_id", "host_id", "execution_id") if k in entry} == ids
    assert set(entry) - set(ids) == {"time", "level", "logger", "message"}


def test_extra_ids_and_constant_fields_win_over_the_text() -> None:
    entry = formatted("task %s queued", 5, fields={"host_id": "agent-1"}, task_id=6)
    assert (entry["task_id"], entry["host_id"]) == ("6", "agent-1")


def test_notify_sends_one_datagram_and_is_silent_outside_systemd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        environ = {"NOTIFY_SOCKET": path, "HOME": "/"}
        notifier = sd_notify.from_environ(environ)
        assert environ == {"HOME": "/"}  # not inherited by what the program starts
        assert notifier.ready("listening")
        assert server.recv(4096) == b"READY=1\nSTATUS=listening"
        assert notifier.stopping("bye")
        assert server.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    assert not sd_notify.from_environ({}).ready("x")


def test_notify_to_an_abstract_socket_and_to_nothing(caplog: pytest.LogCaptureFixture,
                                                     tmp_path: Path) -> None:  # fmt: skip
    name = f"dispatch-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        assert sd_notify.Notifier("@" + name).notify("READY=1")
        assert server.recv(64) == b"READY=1"
    with caplog.at_level(logging.WARNING):
        assert not sd_notify.Notifier(str(tmp_path / "absent")).ready("x")
    assert "cannot notify systemd" in caplog.text
