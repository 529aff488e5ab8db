// Tasks: the history, newest first, filtered by status, host and time range (the API's own
// filters), a page at a time through the API's cursors.
import { get, isAbort } from "../api.js";
import { clear, debounce, h, messageBox } from "../dom.js";
import { badge, TASK_STATUSES, TASK_TERMINAL } from "../status.js";
import {
  cleanName, formatDuration, formatShortTime, formatTime, localInputToRfc3339, plural,
  rfc3339ToLocalInput,
} from "../text.js";
import { progressBar } from "./progress.js";

const PAGE_SIZES = ["25", "50", "100"];
const REFRESH_MS = 10_000;
const UNFINISHED = "pending,queued,running";
let previousCursors = []; // the cursors of the pages before this one, for "Newer"

function row(task) {
  const progress = task.progress;
  return h("tr", { dataset: { task: task.id } },
    h("td", { class: "c-id mono", text: task.id }),
    h("td", { class: "c-name" }, h("a", { href: `#/tasks/${encodeURIComponent(task.id)}`, text: cleanName(task.name) || "(no name)" })),
    h("td", { class: "c-status" }, badge(task.status)),
    h("td", { class: "c-progress" }, progressBar(progress, { compact: true }),
      h("span", { class: "small muted", text: ` ${progress.finished}/${progress.total}` })),
    h("td", { class: "c-time", title: formatTime(task.created_at), text: formatShortTime(task.created_at) }),
    h("td", { class: "c-duration", text: formatDuration(task.duration_s) }),
  );
}

export async function render(ctx) {
  const status = h("select", { name: "status", "aria-label": "Status" },
    h("option", { value: "", text: "any status" }),
    h("option", { value: UNFINISHED, text: "unfinished" }),
    TASK_STATUSES.map((s) => h("option", { value: s, text: s })));
  const host = h("input", { name: "host", placeholder: "on host…", "aria-label": "Host", size: "14" });
  const since = h("input", { name: "since", type: "datetime-local", "aria-label": "Created from" });
  const until = h("input", { name: "until", type: "datetime-local", "aria-label": "Created before" });
  const size = h("select", { name: "limit", "aria-label": "Tasks per page" },
    PAGE_SIZES.map((n) => h("option", { value: n, text: `${n} per page` })));
  const quick = (label, hours) => h("button", {
    type: "button", class: "small", text: label,
    onclick: () => {
      since.value = hours ? rfc3339ToLocalInput(new Date(Date.now() - hours * 3600e3).toISOString()) : "";
      until.value = "";
      apply();
    },
  });
  const error = messageBox("error");
  const body = h("tbody");
  const summary = h("span", { class: "muted summary" });
  const newer = h("button", { type: "button", text: "← Newer", onclick: () => turn(-1) });
  const older = h("button", { type: "button", text: "Older →", onclick: () => turn(1) });
  const first = h("button", { type: "button", text: "Newest", onclick: () => turn(0) });

  ctx.main.append(
    h("div", { class: "page-head" }, h("h1", { text: "Tasks" }),
      h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/tasks/new", text: "New task" }))),
    h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); apply(); } },
      status, host, h("label", { class: "inline", text: "from" }, since), h("label", { class: "inline", text: "before" }, until),
      quick("1 h", 1), quick("24 h", 24), quick("7 days", 168), quick("all time", 0), size),
    error,
    h("table", { class: "grid tasks" },
      h("thead", {}, h("tr", {}, ["#", "Name", "Status", "Progress", "Created", "Duration"].map((t) => h("th", { scope: "col", text: t })))),
      body),
    h("div", { class: "pager" }, first, newer, older, summary),
  );

  let current = null; // the page shown: {items, next_cursor}

  function fromQuery() {
    const q = ctx.query;
    status.value = q.get("status") || "";
    host.value = q.get("host") || "";
    since.value = rfc3339ToLocalInput(q.get("since"));
    until.value = rfc3339ToLocalInput(q.get("until"));
    size.value = PAGE_SIZES.includes(q.get("limit")) ? q.get("limit") : "50";
  }

  function filters() {
    return {
      status: status.value, host: host.value.trim(), since: localInputToRfc3339(since.value),
      until: localInputToRfc3339(until.value), limit: size.value,
    };
  }

  /** New filters: back to the newest page. */
  function apply() {
    previousCursors = [];
    ctx.navigate("/tasks", filters(), { replace: true });
  }

  function turn(direction) {
    const query = Object.fromEntries(ctx.query);
    if (direction === 0) {
      previousCursors = [];
      delete query.cursor;
    } else if (direction > 0 && current?.next_cursor) {
      previousCursors.push(query.cursor || "");
      query.cursor = current.next_cursor;
    } else if (direction < 0) {
      query.cursor = previousCursors.pop() || "";
    }
    ctx.navigate("/tasks", query);
  }

  async function load() {
    const query = Object.fromEntries(ctx.query);
    query.limit = PAGE_SIZES.includes(query.limit) ? query.limit : "50";
    try {
      current = await get("/api/v1/tasks", query, { signal: ctx.signal });
      error.show("");
    } catch (failure) {
      if (isAbort(failure)) return;
      error.show(failure.message);
      current = { items: [], next_cursor: null };
    }
    clear(body, ...current.items.map(row));
    if (!current.items.length) {
      body.append(h("tr", {}, h("td", { colspan: "6", class: "empty muted", text: "No tasks match these filters." })));
    }
    const onFirst = !query.cursor;
    newer.disabled = onFirst;
    first.disabled = onFirst;
    older.disabled = !current.next_cursor;
    summary.textContent = `${plural(current.items.length, "task")} on this page${onFirst ? "" : " (older ones)"}`;
  }

  const reflectHost = debounce(apply, 500);
  host.addEventListener("input", reflectHost);
  for (const input of [status, since, until, size]) input.addEventListener("change", apply);
  ctx.onCleanup(() => reflectHost.cancel());

  // tasks still running move on their own: refresh this page while it shows any
  const timer = setInterval(() => {
    if (document.visibilityState === "visible" && current?.items.some((t) => !TASK_TERMINAL.has(t.status))) load();
  }, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));

  update.current = { fromQuery, load };
  ctx.onCleanup(() => { update.current = null; });
  fromQuery();
  await load();
}

export function update() {
  if (!update.current) return;
  if (document.activeElement?.name !== "host") update.current.fromQuery();
  update.current.load();
}
