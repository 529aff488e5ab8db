// Text from hosts and people, made safe to show, and numbers and times made readable.
//
// Output and names are shown as text (never parsed as HTML: see dom.js). On top of that, terminal
// escape sequences are removed (colours, cursor moves, window titles, hyperlinks) and every other
// control character, and the bidirectional overrides that can disguise text, is replaced by a
// visible stand-in, so what the page shows is what the bytes say.

// CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC (ESC P|X|^|_ ... ST), the C1
// forms of CSI and OSC, and the other short ESC sequences (ESC intermediates final).
const ESCAPES = new RegExp([
  "\\x1b\\[[0-?]*[ -/]*[@-~]",
  "\\x9b[0-?]*[ -/]*[@-~]",
  "(?:\\x1b\\]|\\x9d)[^\\x07\\x1b\\x9c]*(?:\\x07|\\x1b\\\\|\\x9c)",
  "(?:\\x1b[PX^_]|[\\x90\\x98\\x9e\\x9f])[^\\x1b\\x9c]*(?:\\x1b\\\\|\\x9c)",
  "\\x1b[ -/]*[0-~]",
].join("|"), "g");

// The start of an escape sequence that may finish in the next chunk of output.
const PARTIAL_ESCAPE = new RegExp("^(?:" + [
  "\\x1b(?:\\[[0-?]*[ -/]*|\\][^\\x07\\x1b\\x9c]*\\x1b?|[PX^_][^\\x1b\\x9c]*\\x1b?|[ -/]*)?",
  "\\x9b[0-?]*[ -/]*",
  "\\x9d[^\\x07\\x1b\\x9c]*\\x1b?",
  "[\\x90\\x98\\x9e\\x9f][^\\x1b\\x9c]*\\x1b?",
].join("|") + ")$");
const INTRODUCERS = ["\x1b", "\x9b", "\x9d", "\x90", "\x98", "\x9e", "\x9f"];
const MAX_HELD = 4096;

const BIDI = /[\u202a-\u202e\u2066-\u2069]/g;
const OUTPUT_CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/g; // keeps \t and \n
const NAME_CONTROLS = /[\x00-\x1f\x7f-\x9f\u2028\u2029]/g;

function picture(ch) {
  const code = ch.charCodeAt(0);
  if (code < 0x20) return String.fromCharCode(0x2400 + code); // ␀ … ␟
  if (code === 0x7f) return "\u2421"; // ␡
  return "\ufffd";
}

/** One line of text from anyone (task and host names, labels, messages): no escapes, every
 * control character (newlines too) visible. */
export function cleanName(value) {
  if (value === null || value === undefined) return "";
  return String(value).replace(ESCAPES, "").replace(NAME_CONTROLS, picture).replace(BIDI, "\ufffd");
}

/** A whole piece of output: escapes removed, \r\n and lone \r as line ends, other controls
 * visible. */
export function cleanOutput(text) {
  return text
    .replace(ESCAPES, "")
    .replace(/\r\n?/g, "\n")
    .replace(/[\u2028\u2029]/g, "\n")
    .replace(OUTPUT_CONTROLS, picture)
    .replace(BIDI, "\ufffd");
}

/** Cleans output that arrives in chunks: an escape sequence (or a \r\n) cut between two chunks
 * is held back until the next one completes it. */
export class OutputCleaner {
  constructor() {
    this.held = "";
  }

  push(text, final = false) {
    let data = this.held + text;
    this.held = "";
    if (!final) {
      const cut = heldFrom(data);
      if (cut >= 0) {
        this.held = data.slice(cut);
        data = data.slice(0, cut);
      }
    }
    return cleanOutput(data);
  }

  flush() {
    return this.push("", true);
  }
}

function heldFrom(data) {
  const start = Math.max(...INTRODUCERS.map((ch) => data.lastIndexOf(ch)));
  if (start >= 0 && data.length - start < MAX_HELD && PARTIAL_ESCAPE.test(data.slice(start))) {
    return start;
  }
  return data.endsWith("\r") ? data.length - 1 : -1;
}

// --- numbers and times ----------------------------------------------------------------------

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** Local time, to the second ("2026-11-30 14:03:07"); "" for none. */
export function formatTime(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return cleanName(iso);
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ` +
    `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
}

/** Only the time of day when it is today, else the date and time. */
export function formatShortTime(iso) {
  const full = formatTime(iso);
  if (!full || !iso) return full;
  const today = formatTime(new Date().toISOString()).slice(0, 10);
  return full.startsWith(today) ? full.slice(11) : full;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds === 0) return "0 s";
  if (seconds < 0.001) return "<1 ms";
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const s = Math.round(seconds);
  if (s < 3600) return `${Math.floor(s / 60)} m ${pad(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} m`;
}

export function formatAgo(iso, now = Date.now()) {
  if (!iso) return "never";
  const seconds = Math.max(0, (now - new Date(iso).getTime()) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 48 * 3600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "";
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function plural(n, one, many = `${one}s`) {
  return `${n.toLocaleString("en")} ${n === 1 ? one : many}`;
}

/** A value of an <input type="datetime-local"> (local time) as RFC 3339 UTC, or "". */
export function localInputToRfc3339(value) {
  if (!value) return "";
  const t = new Date(value);
  return Number.isNaN(t.getTime()) ? "" : t.toISOString();
}

/** RFC 3339 to the value an <input type="datetime-local"> shows (local time). */
export function rfc3339ToLocalInput(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return "";
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())}T${pad(t.getHours())}:${pad(t.getMinutes())}`;
}

/** Random hex (works outside secure contexts, unlike crypto.randomUUID). */
export function randomKey(bytes = 16) {
  const data = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(data, (b) => b.toString(16).padStart(2, "0")).join("");
}
