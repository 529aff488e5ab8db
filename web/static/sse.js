// A task's live events (GET /api/v1/tasks/{id}/events, text/event-stream) read with fetch, since
// EventSource cannot send the Authorization header. The stream is parsed as the SSE spec says
// (id:, event:, data:, comments), reconnects after a drop with Last-Event-ID (the daemon then
// replays every change after it, so nothing is missed), and stops for good at the `end` event.
import { ApiError, apiUrl, authHeaders, errorFrom } from "./api.js";

const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;
const SILENCE_MS = 45_000; // the daemon sends a keepalive every 15 s: longer means a dead link

export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent; // (type, data text, lastEventId)
    this.buffer = "";
    this.lastEventId = null;
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
  }

  feed(text) {
    this.buffer += text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.buffer)) !== null) {
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break; // maybe \r\n
      this.line(this.buffer.slice(start, match.index));
      start = lineEnd.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(text) {
    if (text === "") {
      if (this.data.length) this.onEvent(this.type || "message", this.data.join("\n"), this.lastEventId);
      this.reset();
      return;
    }
    if (text.startsWith(":")) return; // a comment: keepalive
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }
}

/**
 * new EventStream(`/api/v1/tasks/7/events`, {query, onEvent, onStatus, onError}).start()
 * onEvent(type, data object, id); onStatus("connecting" | "live" | "reconnecting" | "ended" |
 * "stopped"); onError(ApiError) for a refusal that makes it stop (401, 403, 404).
 */
export class EventStream {
  constructor(path, { query = {}, onEvent, onStatus = () => {}, onError = () => {} }) {
    this.path = path;
    this.query = query;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.onError = onError;
    this.lastEventId = null;
    this.closed = false;
    this.controller = null;
    this.status = "";
  }

  start() {
    this.run();
    return this;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
    this.setStatus(this.status === "ended" ? "ended" : "stopped");
  }

  setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this.onStatus(status);
  }

  async run() {
    let delay = FIRST_RETRY_MS;
    this.setStatus("connecting");
    while (!this.closed) {
      const received = await this.connect();
      if (this.closed) return;
      if (received) delay = FIRST_RETRY_MS;
      this.setStatus("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay * (0.5 + Math.random() / 2)));
      delay = Math.min(delay * 2, MAX_RETRY_MS);
    }
  }

  /** One connection: true if it delivered anything. Ends the stream for good on `end` and on
   * refusals that a retry cannot fix. */
  async connect() {
    const controller = new AbortController();
    this.controller = controller;
    let received = false;
    let silence = null;
    const watch = () => {
      clearTimeout(silence);
      silence = setTimeout(() => controller.abort(), SILENCE_MS);
    };
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
      watch();
      const response = await fetch(apiUrl(this.path, this.query), {
        headers, signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) {
        const error = await errorFrom(response);
        if ([401, 403, 404, 400].includes(response.status)) {
          this.closed = true;
          this.setStatus("stopped");
          this.onError(error);
        }
        return false;
      }
      this.setStatus("live");
      const parser = new SseParser((type, data, id) => {
        received = true;
        if (id !== null) this.lastEventId = id;
        this.dispatch(type, data);
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      while (!this.closed) {
        const { value, done } = await reader.read();
        if (done) break;
        watch();
        parser.feed(value);
      }
      reader.cancel().catch(() => {});
    } catch (error) {
      if (error.name !== "AbortError" && !(error instanceof TypeError) && !(error instanceof ApiError)) {
        throw error;
      }
    } finally {
      clearTimeout(silence);
    }
    return received;
  }

  dispatch(type, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return; // not ours to show
    }
    if (type === "end") {
      this.closed = true;
      if (this.controller) this.controller.abort();
      this.setStatus("ended");
    }
    this.onEvent(type, data);
  }
}
