// One execution's stdout and stderr. A finished one is read once (GET /executions/{id}); a
// running one also follows the task's event stream with output, merged by byte offset with what
// was read, so nothing is shown twice or missed. Output is cleaned (text.js) and only ever
// inserted as text; where the daemon dropped bytes (the capped middle of a large output) the gap
// is marked, and the panel says how much was written and how much kept.
import { fetchBlob, get, isAbort } from "../api.js";
import { clear, h, notify } from "../dom.js";
import { EventStream } from "../sse.js";
import { badge, EXEC_TERMINAL, exitText } from "../status.js";
import { cleanName, formatBytes, formatDuration, formatTime, OutputCleaner } from "../text.js";

const STREAMS = ["stdout", "stderr"];
const MAX_CHARS = 3_000_000; // per pane: older text leaves the page (the store keeps it)
const OMITTED = /\[\.\.\. (\d+) bytes omitted \.\.\.\]/g; // the daemon's gap marker
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8");

export class Pane {
  constructor(stream) {
    this.stream = stream;
    this.pre = h("pre", { class: `out ${stream}`, tabindex: "0", "aria-label": stream });
    this.note = h("p", { class: "hint", hidden: true });
    this.size = h("span", { class: "muted small" });
    this.save = h("button", { type: "button", class: "small", text: "Save raw" });
    this.el = h("div", { class: "pane" },
      h("div", { class: "pane-head" }, h("strong", { text: stream }), this.size, this.save), this.note, this.pre);
    this.reset();
  }

  /** What the process wrote and what the daemon did not keep (live, what arrived counts). */
  setSize(written, omitted) {
    this.written = written;
    this.omitted = omitted;
    this.showSize();
  }

  showSize() {
    const written = Math.max(this.written || 0, this.next);
    this.size.textContent = ` ${formatBytes(written)} written${this.omitted ? `, ${formatBytes(this.omitted)} not kept` : ""}`;
    this.save.disabled = written === 0;
  }

  reset() {
    this.cleaner = new OutputCleaner();
    this.next = 0; // bytes of the stream shown so far
    this.chars = 0;
    this.dropped = 0;
    this.pre.replaceChildren();
    this.note.hidden = true;
  }

  write(text, final = false) {
    const clean = this.cleaner.push(text, final);
    if (!clean) return;
    const follow = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 4;
    let at = 0;
    for (const match of clean.matchAll(OMITTED)) {
      if (match.index > at) this.pre.append(clean.slice(at, match.index));
      this.pre.append(h("span", { class: "omitted", text: `[… ${Number(match[1]).toLocaleString("en")} bytes not kept …]` }));
      at = match.index + match[0].length;
    }
    if (at < clean.length) this.pre.append(clean.slice(at));
    this.chars += clean.length;
    while (this.chars > MAX_CHARS && this.pre.firstChild) {
      const gone = this.pre.firstChild.textContent.length;
      this.pre.firstChild.remove();
      this.chars -= gone;
      this.dropped += gone;
    }
    if (this.dropped) {
      this.note.hidden = false;
      this.note.textContent = `The first ${this.dropped.toLocaleString("en")} characters are no longer shown here; "Save raw" has everything stored.`;
    }
    if (follow) this.pre.scrollTop = this.pre.scrollHeight;
  }

  /** A live `output` event: only the bytes after what is shown. */
  apply(event) {
    const start = event.offset;
    const end = event.offset + event.bytes;
    if (event.bytes === 0) { // the end of a character held by the daemon's decoder
      if (start >= this.next && event.text) this.write(event.text);
      return;
    }
    if (end <= this.next) return;
    let text = event.text;
    if (start < this.next) { // overlaps what was read: keep the new bytes only
      text = text.replace(/^\n?\[\.\.\. \d+ bytes omitted \.\.\.\]\n/, "");
      text = decoder.decode(encoder.encode(text).slice(this.next - start));
    } else if (start > this.next && !event.omitted_bytes) {
      text = `\n[... ${start - this.next} bytes omitted ...]\n${text}`;
    }
    this.next = end;
    this.write(text);
    this.showSize();
  }

  empty() {
    return this.chars === 0;
  }
}

export class OutputViewer {
  constructor({ taskId, onClose }) {
    this.taskId = taskId;
    this.onClose = onClose;
    this.title = h("h2");
    this.meta = h("dl", { class: "meta" });
    this.banner = h("p", { class: "message info truncated", hidden: true });
    this.live = h("span", { class: "live-dot", hidden: true, text: "live" });
    this.panes = Object.fromEntries(STREAMS.map((s) => [s, new Pane(s)]));
    for (const pane of Object.values(this.panes)) pane.save.addEventListener("click", () => this.saveRaw(pane.stream));
    this.el = h("section", { class: "output card", hidden: true, "aria-label": "Output" },
      h("div", { class: "row-head" }, this.title, this.live,
        h("button", { type: "button", class: "link", text: "Close", onclick: () => this.onClose() })),
      this.meta, this.banner, h("div", { class: "panes" }, this.panes.stdout.el, this.panes.stderr.el));
    this.execution = null;
  }

  get openId() {
    return this.execution ? this.execution.id : null;
  }

  async open(execution) {
    this.close();
    this.execution = execution;
    this.controller = new AbortController();
    this.finished = EXEC_TERMINAL.has(execution.status);
    this.el.hidden = false;
    this.title.textContent = `Output of ${cleanName(execution.host_id)} · command ${execution.command_index + 1}`;
    for (const pane of Object.values(this.panes)) pane.reset();
    this.showMeta(execution);
    if (this.finished) {
      await this.read();
      return;
    }
    // running: subscribe first, then read what is stored, then apply what arrived meanwhile
    this.buffer = [];
    let subscribed;
    const ready = new Promise((resolve) => { subscribed = resolve; });
    this.stream = new EventStream(`/api/v1/tasks/${this.taskId}/events`, {
      onEvent: (type, data) => {
        subscribed();
        this.onStreamEvent(type, data);
      },
      onStatus: (status) => {
        this.live.hidden = status !== "live";
        if (status === "ended") subscribed();
      },
      onError: (error) => notify(error.message),
    }).start();
    await Promise.race([ready, new Promise((resolve) => setTimeout(resolve, 3000))]);
    if (this.execution !== execution) return;
    await this.read();
    const waiting = this.buffer;
    this.buffer = null;
    for (const event of waiting || []) this.panes[event.stream]?.apply(event);
  }

  onStreamEvent(type, data) {
    if (!this.execution) return;
    if (type === "output" && String(data.execution_id) === this.execution.id) {
      if (this.buffer) this.buffer.push(data);
      else this.panes[data.stream]?.apply(data);
    } else if (type === "execution" && data.id === this.execution.id) {
      this.update(data);
    }
  }

  /** A newer state of the execution shown (from either stream). */
  update(execution) {
    if (!this.execution || execution.id !== this.execution.id) return;
    this.execution = execution;
    this.showMeta(execution);
    if (!this.finished && EXEC_TERMINAL.has(execution.status)) {
      this.finished = true; // the stored output is the record: show it as stored
      this.stopStream();
      this.read();
    }
  }

  async read() {
    const execution = this.execution;
    let detail;
    try {
      detail = await get(`/api/v1/executions/${encodeURIComponent(execution.id)}`, {}, { signal: this.controller.signal });
    } catch (failure) {
      if (!isAbort(failure)) {
        this.banner.hidden = false;
        this.banner.textContent = failure.message;
      }
      return;
    }
    if (this.execution?.id !== execution.id) return;
    for (const stream of STREAMS) {
      const pane = this.panes[stream];
      pane.reset();
      pane.write(detail[stream] || "", this.finished);
      pane.next = detail[`${stream}_bytes`] || 0;
    }
    this.detail = detail;
    this.showMeta({ ...this.execution, ...detail });
  }

  showMeta(e) {
    const item = (term, ...value) => [h("div", {}, h("dt", { text: term }), h("dd", {}, ...value))];
    clear(this.meta, 
      ...item("Status", badge(e.status), e.reason ? ` ${cleanName(e.reason)}` : ""),
      ...item("Exit", exitText(e) || "—"),
      ...item("Duration", formatDuration(e.duration_s) || "—"),
      ...item("Started", formatTime(e.started_at) || "—"),
      ...item("Finished", formatTime(e.finished_at) || "—"),
      ...(e.error ? item("Error", h("span", { class: "error-text", text: cleanName(e.error) })) : []),
    );
    for (const stream of STREAMS) {
      this.panes[stream].setSize(e[`${stream}_bytes`] || 0, e[`${stream}_omitted_bytes`] || 0);
    }
    const omitted = STREAMS.filter((s) => e[`${s}_omitted_bytes`]);
    if (e.output_truncated || omitted.length) {
      this.banner.hidden = false;
      this.banner.textContent = omitted.length
        ? `Output was capped: the daemon keeps the first and last part of each stream; ${omitted.map((s) => `${formatBytes(e[`${s}_omitted_bytes`])} of ${s}`).join(" and ")} in the middle were not kept (marked below).`
        : "Output was capped: the daemon keeps the first and last part of each stream; the middle was not kept.";
    } else {
      this.banner.hidden = true;
    }
  }

  async saveRaw(stream) {
    const e = this.execution;
    try {
      const blob = await fetchBlob(`/api/v1/executions/${encodeURIComponent(e.id)}/output`, { stream });
      const url = URL.createObjectURL(blob);
      const safe = e.host_id.replace(/[^A-Za-z0-9._-]/g, "_");
      const link = h("a", { href: url, download: `task-${this.taskId}-${safe}-cmd${e.command_index + 1}.${stream}` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (failure) {
      notify(failure.message);
    }
  }

  stopStream() {
    if (this.stream) this.stream.close();
    this.stream = null;
    this.buffer = null;
    this.live.hidden = true;
  }

  close() {
    this.stopStream();
    if (this.controller) this.controller.abort();
    this.execution = null;
    this.el.hidden = true;
  }
}
