"""The console's own pieces, run in the browser as the page runs them (ES modules served by a real
dispatchd): cleaning names and output, the SSE parser, and merging live output with stored
output by byte offset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster
from tests.web.console import Console, in_browser, needs_chromium

pytestmark = [pytest.mark.web, needs_chromium]

CHECKS = r"""
async () => {
  const text = await import('/static/text.js');
  const sse = await import('/static/sse.js');
  const output = await import('/static/pages/output.js');
  const results = {};

  // names: escapes gone, every control character and bidi override visible
  results.name = text.cleanName('<b>\x1b[31mred\x1b[0m</b>\n\t\u202eevil\x07\x9b2J');
  // output: colours, screen clears, titles and hyperlinks gone; \r\n and \r as line ends
  results.output = text.cleanOutput(
    'a\x1b[1;31mb\x1b[0m\x1b[2J\x1b]0;title\x07\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\r\nc\rd\x00\x7f');
  // an escape sequence or a \r\n cut between chunks is held back until it completes
  const cleaner = new text.OutputCleaner();
  const pieces = ['x\x1b[3', '1my\x1b', ']0;t', 'itle\x07z\r', '\nw', '\x1b'];
  results.chunks = pieces.map((c) => cleaner.push(c));
  results.chunks.push(cleaner.flush());
  // a stray ESC followed by text is not held: it shows
  results.stray = new text.OutputCleaner().push('a\x1b\nb');

  // SSE: fields, comments, multi-line data, CRLF and CR line ends, a CRLF cut between chunks
  const seen = [];
  const parser = new sse.SseParser((type, data, id) => seen.push([type, data, id]));
  [': keepalive\n\nid: 4\nevent: progress\ndata: {"a":1}\n\n', 'id: 5\r\nevent: output\r',
   '\ndata: {"b":\r\ndata: 2}\r\n\r', '\n', 'data:no-space\n\nid: 6\n\n',
   'event: end\ndata: {}\n\n',
  ].forEach((chunk) => parser.feed(chunk));
  results.sse = seen;
  results.lastId = parser.lastEventId;

  // live output merged by offset with what was read: no byte twice, gaps marked
  const pane = new output.Pane('stdout');
  pane.write('0123456789');
  pane.next = 10;
  pane.apply({ offset: 0, bytes: 10, omitted_bytes: 0, text: '0123456789' });   // already shown
  pane.apply({ offset: 5, bytes: 10, omitted_bytes: 0, text: '56789abcde' });   // overlaps
  pane.apply({ offset: 15, bytes: 2, omitted_bytes: 0, text: 'fg' });           // next
  pane.apply({ offset: 30, bytes: 1, omitted_bytes: 0, text: 'z' });            // a gap
  results.pane = pane.pre.textContent;
  results.paneNext = pane.next;
  const wide = new output.Pane('stdout');
  wide.write('é');                       // 2 bytes
  wide.next = 2;
  wide.apply({ offset: 0, bytes: 5, omitted_bytes: 0, text: 'éàb' });  // é(2) à(2) b(1)
  results.wide = wide.pre.textContent;

  results.durations = [0, 0.0000005, 0.25, 4.5, 75, 7300].map(text.formatDuration);
  return results;
}
"""


async def test_cleaning_parsing_and_merging(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.start_daemon()

    def scenario(c: Console) -> dict:
        c.open("/signin")
        c.page.wait_for_selector("form.signin")
        return c.page.evaluate(CHECKS)

    r = await in_browser(cluster, tmp_path, scenario)
    assert r["name"] == "<b>red</b>\u240a\u2409\ufffdevil\u2407"
    assert r["output"] == "ablink\nc\nd\u2400\u2421"
    assert r["chunks"] == ["x", "y", "", "z", "\nw", "", "\u241b"]
    assert r["stray"] == "a\u241b\nb"
    assert r["sse"] == [
        ["progress", '{"a":1}', "4"],
        ["output", '{"b":\n2}', "5"],
        ["message", "no-space", "5"],
        ["end", "{}", "6"],
    ]
    assert r["lastId"] == "6"
    assert r["pane"] == "0123456789abcdefg\n[… 13 bytes not kept …]\nz"
    assert r["paneNext"] == 31
    assert r["wide"] == "éàb"
    assert r["durations"] == ["0 s", "<1 ms", "250 ms", "4.50 s", "1 m 15 s", "2 h 01 m"]
