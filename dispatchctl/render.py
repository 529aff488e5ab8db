"""What dispatchctl prints: JSON for scripts, tables and lines for people, and remote text made
safe for a terminal.

Text from the daemon (output, names, errors) is the remote hosts' and other users' text: before
it reaches a terminal, terminal escape sequences are removed and other control characters shown
as visible symbols (``␛``, ``␇``, ...), as the web console does, so output cannot move the cursor,
retitle the window, rewrite the screen or hide lines. ``--raw`` (or output that is not a
terminal) leaves the bytes as they are. Nothing from the daemon is ever read as rich markup.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

# ESC-introduced sequences: CSI, OSC/DCS/SOS/PM/APC strings (ended by BEL or ST), two-byte ones;
# and the 8-bit CSI/OSC/DCS forms.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x90\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # ␀ .. ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"  # C1 controls and bidirectional overrides


def clean(text: str) -> str:
    """``text`` safe for a terminal: escapes removed, other controls visible; newlines and tabs
    kept (a CR-LF pair becomes a newline)."""
    text = _ESCAPES.sub("", text.replace("\r\n", "\n"))
    return _CONTROLS.sub(_visible, text)


class Printer:
    """Where results go: ``stdout`` (and ``stderr`` for notes), JSON or text."""

    def __init__(
        self,
        *,
        json_mode: bool,
        raw: bool,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.json_mode = json_mode
        self.raw = raw
        # to a pipe or a file, lines and tables are never folded at an imagined width
        wide = None if self.stdout.isatty() else 4096
        self.console = Console(file=self.stdout, highlight=False, width=wide)
        self.err_console = Console(file=self.stderr, highlight=False, soft_wrap=True)

    @property
    def stdout_is_terminal(self) -> bool:
        return self.stdout.isatty()

    def remote(self, text: str) -> str:
        """Remote output as it should be written to stdout."""
        return text if self.raw or not self.stdout_is_terminal else clean(text)

    def json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        self.stdout.flush()

    def json_line(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.stdout.flush()

    def line(self, *parts: str | Text) -> None:
        """One line of text; plain strings are the daemon's and are cleaned."""
        self.console.print(Text.assemble(*(_text(p) for p in parts)), markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.err_console.print(Text(clean(message), style="dim"), markup=False)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for column in columns:
            narrow = column in NARROW_COLUMNS
            table.add_column(
                column,
                overflow="ellipsis" if narrow else "fold",
                no_wrap=narrow,
                max_width=40 if narrow else None,
            )
        for row in rows:
            table.add_row(*(_text(cell, one_line=True) for cell in row))
        self.console.print(table, markup=False)


NARROW_COLUMNS = frozenset({"NAME", "REASON", "TARGET"})  # free text: one line, cut at 40


def _text(value: Any, *, one_line: bool = False) -> Text:
    if isinstance(value, Text):
        return value
    if value is None:
        return Text("-", style="dim")
    text = clean(str(value))
    return Text(text.replace("\n", " ") if one_line else text)


STATUS_STYLE = {
    "succeeded": "green",
    "completed": "green",
    "failed": "red",
    "timed_out": "red",
    "dispatch_failed": "red",
    "cancelled": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "dispatched": "cyan",
    "queued": "blue",
    "pending": "blue",
}


def status_text(status: str | None) -> Text:
    return Text(clean(status or "-"), style=STATUS_STYLE.get(status or "", ""))


def when(moment: str | None) -> str:
    """An RFC 3339 time from the API, shortened for a table (local time)."""
    if not moment:
        return "-"
    try:
        parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return moment
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f} s"
    minutes, rest = divmod(value, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"
