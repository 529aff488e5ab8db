// Task detail: status and progress that move live (the task's event stream, no polling), a
// per-host table that updates live and filters by host and status, each host's output, groups
// of identical results, and the buttons to start, cancel, retry the hosts that did not succeed,
// or run it again.
import { get, isAbort, listAll, post } from "../api.js";
import { clear, h, messageBox, notify, perFrame, throttle } from "../dom.js";
import { session } from "../session.js";
import { EventStream } from "../sse.js";
import { badge, EXEC_STATUSES, execRank, exitText, label, TASK_TERMINAL } from "../status.js";
import {
  cleanName, cleanOutput, formatBytes, formatDuration, formatShortTime, formatTime, plural,
} from "../text.js";
import { VirtualTable } from "../vtable.js";
import { Groups } from "./groups.js";
import { OutputViewer } from "./output.js";
import { progressBar, setProgress, statusCounts } from "./progress.js";

const collator = new Intl.Collator("en", { numeric: true });
const NOT_SUCCEEDED = "!succeeded";
let page = null; // the page shown, for update()

/** Executions by id, in host order; a state never moves backwards (late or replayed events). */
class Executions {
  constructor() {
    this.byId = new Map();
    this.list = [];
    this.unsorted = false;
  }

  upsert(execution) {
    const known = this.byId.get(execution.id);
    if (!known) {
      this.byId.set(execution.id, execution);
      this.list.push(execution);
      this.unsorted = true;
      return true;
    }
    if (execRank(execution.status) < execRank(known.status)) return false;
    Object.assign(known, execution);
    return true;
  }

  sorted() {
    if (this.unsorted) {
      this.list.sort((a, b) => collator.compare(a.host_id, b.host_id) || a.command_index - b.command_index);
      this.unsorted = false;
    }
    return this.list;
  }

  find(hostId, commandIndex) {
    return this.list.find((e) => e.host_id === hostId && e.command_index === commandIndex);
  }
}

function columns(many, isOpen) {
  return [
    {
      title: "Host", class: "c-host",
      cell: (e) => h("button", { type: "button", class: "link mono", text: cleanName(e.host_id), title: "show output", dataset: { open: e.id }, "aria-pressed": isOpen(e) ? "true" : "false" }),
    },
    many ? { title: "Cmd", class: "c-cmd", cell: (e) => String(e.command_index + 1) } : null,
    { title: "Status", class: "c-status", cell: (e) => badge(e.status) },
    { title: "Reason", class: "c-reason", cell: (e) => h("span", { title: cleanName(e.error || ""), text: cleanName(e.reason || "") }) },
    { title: "Exit", class: "c-exit", cell: (e) => exitText(e) },
    { title: "Duration", class: "c-duration", cell: (e) => formatDuration(e.duration_s) },
    { title: "Started", class: "c-time", cell: (e) => h("span", { title: formatTime(e.started_at), text: formatShortTime(e.started_at) }) },
    { title: "Finished", class: "c-time", cell: (e) => h("span", { title: formatTime(e.finished_at), text: formatShortTime(e.finished_at) }) },
    {
      title: "Output", class: "c-bytes",
      cell: (e) => [formatBytes((e.stdout_bytes || 0) + (e.stderr_bytes || 0)), e.output_truncated ? h("span", { class: "cut", title: "capped: the middle was not kept", text: " ✂" }) : null],
    },
  ].filter(Boolean);
}

export async function render(ctx) {
  const id = ctx.params.id;
  let task;
  try {
    task = await get(`/api/v1/tasks/${id}`, {}, { signal: ctx.signal });
  } catch (failure) {
    if (isAbort(failure)) return;
    ctx.main.append(h("div", { class: "page-head" }, h("h1", { text: `Task ${id}` })),
      h("div", { class: "message error", role: "alert", text: failure.message }),
      h("p", {}, h("a", { href: "#/tasks", text: "Back to the tasks" })));
    return;
  }
  const many = task.commands.length > 1;
  const executions = new Executions();
  const error = messageBox("error");

  // --- head: name, state, times, buttons -------------------------------------------------------
  const title = h("h1", { class: "task-name" });
  const state = h("span", { class: "task-state" });
  const liveState = h("span", { class: "stream-state muted", "aria-live": "polite" });
  const meta = h("dl", { class: "meta" });
  const actions = h("div", { class: "actions" });
  const bar = progressBar(task.progress);
  const progressText = h("span", { class: "progress-text" });
  const counts = h("div", { class: "counts" });

  // --- hosts table ---------------------------------------------------------------------------
  const hostFilter = h("input", { type: "search", name: "host", placeholder: "filter hosts", "aria-label": "Filter hosts" });
  const statusFilter = h("select", { name: "status", "aria-label": "Filter by status" },
    h("option", { value: "", text: "any status" }),
    h("option", { value: NOT_SUCCEEDED, text: "did not succeed" }),
    EXEC_STATUSES.map((s) => h("option", { value: s, text: label(s) })));
  const commandFilter = h("select", { name: "cmd", "aria-label": "Filter by command", hidden: !many },
    h("option", { value: "", text: "every command" }),
    task.commands.map((c) => h("option", { value: String(c.index), text: `command ${c.index + 1}` })));
  const shown = h("span", { class: "summary muted", "aria-live": "polite" });
  const viewer = new OutputViewer({ taskId: id, onClose: () => setQuery({ exec: "" }) });
  const table = new VirtualTable({
    columns: columns(many, (e) => e.id === viewer.openId), label: "Executions", empty: "Loading executions…",
    rowAttributes: (e) => ({ dataset: { host: e.host_id, status: e.status, id: e.id }, class: e.id === viewer.openId ? "selected" : undefined }),
  });
  table.body.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-open]");
    if (button) setQuery({ exec: button.dataset.open });
  });
  ctx.onCleanup(() => { table.destroy(); viewer.close(); });

  // --- groups --------------------------------------------------------------------------------
  const groups = new Groups({
    taskId: id, commands: task.commands,
    onOpen: (hostId, index) => {
      const e = executions.find(hostId, index);
      if (e) setQuery({ view: "", exec: e.id });
    },
  });
  ctx.onCleanup(() => groups.destroy());
  const refreshGroups = throttle(() => groups.refresh(), 2000);
  ctx.onCleanup(() => refreshGroups.cancel());
  const tabHosts = h("button", { type: "button", role: "tab", text: "Hosts", onclick: () => setQuery({ view: "" }) });
  const tabGroups = h("button", { type: "button", role: "tab", text: "Groups", onclick: () => setQuery({ view: "groups" }) });
  const hostsPanel = h("div", { role: "tabpanel", class: "hosts-panel" },
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() }, hostFilter, statusFilter, commandFilter, shown),
    table.el, viewer.el);
  const groupsPanel = h("div", { role: "tabpanel", class: "groups-panel", hidden: true }, groups.el);

  ctx.main.append(
    h("div", { class: "page-head" }, h("div", {}, title, state, liveState), actions),
    meta, error,
    h("section", { class: "progress", "aria-label": "Progress" }, bar, progressText, counts),
    h("details", { class: "commands-shown" }, h("summary", { text: `${plural(task.commands.length, "command")}` }),
      task.commands.map((c) => h("div", { class: "command-shown" },
        h("div", { class: "muted small", text: `command ${c.index + 1} · timeout ${formatDuration(c.timeout_s)}${c.args.length ? ` · args: ${c.args.map(cleanName).join(" ")}` : ""}` }),
        h("pre", { class: "out script", text: cleanOutput(c.script) })))),
    h("div", { class: "tabs", role: "tablist" }, tabHosts, tabGroups),
    hostsPanel, groupsPanel,
  );

  // --- drawing -------------------------------------------------------------------------------
  function drawHead() {
    title.textContent = cleanName(task.name) || "(no name)";
    clear(state, badge(task.status), h("span", { class: "muted", text: ` task ${task.id}` }));
    const item = (term, value) => (value ? [h("div", {}, h("dt", { text: term }), h("dd", {}, value))] : []);
    const targets = task.targets || {};
    clear(meta, 
      ...item("Created", formatTime(task.created_at)),
      ...item("Started", formatTime(task.started_at)),
      ...item("Finished", formatTime(task.finished_at)),
      ...item("Duration", formatDuration(task.duration_s)),
      ...item("Targets", [
        (targets.hosts || []).length ? `${plural(targets.hosts.length, "host")} picked` : "",
        Object.keys(targets.labels || {}).length ? `labels ${Object.entries(targets.labels).map(([k, v]) => `${cleanName(k)}=${cleanName(v)}`).join(", ")}` : "",
      ].filter(Boolean).join(" + ") + (targets.resolved !== undefined ? ` → ${plural(targets.resolved, "host")}` : "")),
      ...item("Limits", `${task.max_concurrency ? `${task.max_concurrency} at once` : "no concurrency limit"}, ${task.max_failures === null ? "any failures" : `stop after ${task.max_failures} failures`}, delivery timeout ${formatDuration(task.delivery_timeout_s) || "0 s"}`),
      ...item("Retry of", task.retry_of ? h("a", { href: `#/tasks/${encodeURIComponent(task.retry_of)}`, text: `task ${task.retry_of}` }) : null),
      ...item("Note", task.error ? cleanName(task.error) : null),
    );
    drawActions();
  }

  let confirmCancel = null;
  function drawActions() {
    const finished = TASK_TERMINAL.has(task.status);
    const by = task.progress?.by_status || {};
    const anyUnsuccessful = Object.keys(by).some((s) => s !== "succeeded");
    const unsuccessful = new Set(executions.list.filter((e) => e.status !== "succeeded").map((e) => e.host_id)).size;
    const button = (text, route, role, onclick, cls = "") => {
      const why = session.needs(route, role);
      return h("button", { type: "button", class: cls, text, disabled: Boolean(why), title: why || undefined, onclick });
    };
    clear(actions, 
      task.status === "pending" ? button("Start", "start_task", "operator", () => act("start"), "primary") : null,
      !finished ? button(confirmCancel ? "Really cancel?" : "Cancel", "cancel_task", "operator", cancel, "danger") : null,
      finished && anyUnsuccessful ? button(unsuccessful ? `Retry the ${plural(unsuccessful, "host")} that did not succeed` : "Retry the hosts that did not succeed", "retry_task", "operator", retry, "primary") : null,
      h("a", { class: "button", href: `#/tasks/new?from=${encodeURIComponent(task.id)}`, text: "Run again…" }),
    );
  }

  function cancel() {
    if (!confirmCancel) { // a second click within 5 s cancels: no modal dialog
      confirmCancel = setTimeout(() => { confirmCancel = null; drawActions(); }, 5000);
      drawActions();
      return;
    }
    clearTimeout(confirmCancel);
    confirmCancel = null;
    act("cancel");
  }
  ctx.onCleanup(() => clearTimeout(confirmCancel));

  async function act(action) {
    try {
      const answer = await post(`/api/v1/tasks/${id}/${action}`);
      Object.assign(task, answer);
      notify(action === "cancel" ? "Cancel requested: running commands are being stopped." : "Task started.", "info");
      error.show("");
    } catch (failure) {
      error.show(failure.message);
    }
    drawHead();
  }

  async function retry() {
    try {
      const created = await post(`/api/v1/tasks/${id}/retry`);
      notify(`Task ${created.id} retries the hosts of task ${id} that did not succeed.`, "info");
      ctx.navigate(`/tasks/${created.id}`);
    } catch (failure) {
      error.show(failure.message);
    }
  }

  function drawProgress() {
    const p = task.progress;
    setProgress(bar, p);
    progressText.textContent = `${p.finished.toLocaleString("en")} of ${plural(p.total, "execution")} finished (${p.percent}%)`;
    clear(counts, ...statusCounts(p, {
      active: statusFilter.value,
      onPick: (status) => setQuery({ status: statusFilter.value === status ? "" : status }),
    }));
  }

  function matches(e) {
    const needle = hostFilter.value.trim().toLowerCase();
    const status = statusFilter.value;
    if (needle && !e.host_id.toLowerCase().includes(needle)) return false;
    if (status === NOT_SUCCEEDED ? e.status === "succeeded" : status && e.status !== status) return false;
    return !(commandFilter.value && String(e.command_index) !== commandFilter.value);
  }

  const filtering = () => Boolean(hostFilter.value.trim() || statusFilter.value || commandFilter.value);
  const drawTable = perFrame(() => {
    const all = executions.sorted();
    const view = filtering() ? all.filter(matches) : all;
    table.setItems(view);
    shown.textContent = `${view.length.toLocaleString("en")} of ${plural(all.length, "execution")}${loaded ? "" : " (loading…)"}`;
  });

  // --- live ----------------------------------------------------------------------------------
  let loaded = false;
  function onEvent(type, data) {
    if (type === "task") {
      Object.assign(task, data);
      drawHead();
    } else if (type === "progress") {
      task.progress = data;
      drawProgress();
      drawActions();
      if (!groupsPanel.hidden) refreshGroups();
    } else if (type === "execution") {
      if (executions.upsert(data)) drawTable();
      if (data.id === viewer.openId) viewer.update(executions.byId.get(data.id));
    } else if (type === "end") {
      finish();
    } else if (type === "error") {
      notify(`Live updates: ${cleanName(data?.error?.message || "the stream failed")}; reconnecting.`);
    }
  }

  async function finish() {
    try { // the final record (duration, note) once the task has ended
      Object.assign(task, await get(`/api/v1/tasks/${id}`, {}, { signal: ctx.signal }));
    } catch (failure) {
      if (!isAbort(failure)) error.show(failure.message);
    }
    drawHead();
    drawProgress();
    groups.refresh();
  }

  const stream = new EventStream(`/api/v1/tasks/${id}/events`, {
    query: { output: "false" },
    onEvent,
    onStatus: (status) => {
      liveState.textContent = { connecting: " connecting…", live: " ● live", reconnecting: " reconnecting…", ended: "", stopped: "" }[status] ?? "";
      liveState.dataset.state = status;
    },
    onError: (failure) => error.show(`Live updates stopped: ${failure.message}`),
  });
  ctx.onCleanup(() => stream.close());

  function setQuery(changes) {
    ctx.navigate(`/tasks/${id}`, { ...Object.fromEntries(ctx.query), ...changes }, { replace: !("exec" in changes) });
  }

  function applyQuery() {
    const q = ctx.query;
    if (document.activeElement !== hostFilter) hostFilter.value = q.get("host") || "";
    statusFilter.value = q.get("status") || "";
    commandFilter.value = q.get("cmd") || "";
    const groupsView = q.get("view") === "groups";
    hostsPanel.hidden = groupsView;
    groupsPanel.hidden = !groupsView;
    tabHosts.setAttribute("aria-selected", String(!groupsView));
    tabGroups.setAttribute("aria-selected", String(groupsView));
    if (groupsView) groups.refresh();
    const exec = q.get("exec");
    if (!exec) viewer.close();
    else if (exec !== viewer.openId) {
      const known = executions.byId.get(exec);
      if (known) {
        viewer.open(known);
        viewer.el.scrollIntoView({ block: "nearest" });
      }
    }
    drawProgress();
    drawTable();
  }

  hostFilter.addEventListener("input", () => {
    drawTable();
    setQuery({ host: hostFilter.value.trim() });
  });
  statusFilter.addEventListener("change", () => setQuery({ status: statusFilter.value }));
  commandFilter.addEventListener("change", () => setQuery({ cmd: commandFilter.value }));

  page = { applyQuery };
  ctx.onCleanup(() => { page = null; });
  drawHead();
  applyQuery();
  stream.start();
  try {
    await listAll(`/api/v1/tasks/${id}/executions`, {}, {
      signal: ctx.signal,
      onPage: (items) => {
        for (const e of items) executions.upsert(e);
        drawTable();
      },
    });
  } catch (failure) {
    if (!isAbort(failure)) error.show(failure.message);
  }
  loaded = true;
  table.setEmptyText("No executions match these filters.");
  applyQuery();
}

export function update() {
  if (page) page.applyQuery();
}
