// Hosts: every host with its state, labels, agent version and when it was last seen; filters by
// status and labels (the API's) and by name (here); hosts waiting for enrolment, to approve or
// reject.
import { get, isAbort, listAll, post } from "../api.js";
import { clear, debounce, h, messageBox, notify } from "../dom.js";
import { session } from "../session.js";
import { badge } from "../status.js";
import { cleanName, formatAgo, formatShortTime, formatTime, plural } from "../text.js";
import { VirtualTable } from "../vtable.js";

const REFRESH_MS = 15_000;

/** "role=web dc=fra1" (spaces or commas) -> ["role=web", "dc=fra1"]; throws on a bad one. */
export function parseLabels(text) {
  const selectors = text.split(/[\s,]+/).filter(Boolean);
  for (const selector of selectors) {
    const at = selector.indexOf("=");
    if (at <= 0) throw new Error(`"${cleanName(selector)}" is not a label selector: write key=value`);
  }
  return selectors;
}

export function labelChips(labels) {
  return Object.entries(labels || {}).map(([key, value]) =>
    h("span", { class: "chip", text: `${cleanName(key)}=${cleanName(value)}` }));
}

const COLUMNS = [
  {
    title: "Host", class: "c-host",
    cell: (host) => [
      h("span", { class: "mono", text: cleanName(host.id) }),
      host.hostname && host.hostname !== host.id ? h("span", { class: "muted small", text: ` ${cleanName(host.hostname)}` }) : null,
    ],
  },
  {
    title: "Status", class: "c-status",
    cell: (host) => [badge(host.status), host.enrollment !== "approved" ? badge(host.enrollment) : null],
  },
  { title: "Labels", class: "c-labels", cell: (host) => labelChips(host.labels) },
  { title: "Agent", class: "c-agent", cell: (host) => cleanName(host.agent_version) },
  { title: "Address", class: "c-address", cell: (host) => h("span", { class: "mono", text: cleanName(host.address) }) },
  {
    title: "Last seen", class: "c-since",
    cell: (host) => h("span", { title: formatTime(host.last_seen_at), text: host.status === "online" ? "now" : formatAgo(host.last_seen_at) }),
  },
  {
    title: "Connected since", class: "c-since",
    cell: (host) => (host.status === "online" ? h("span", { title: formatTime(host.connected_at), text: formatShortTime(host.connected_at) }) : ""),
  },
];

export async function render(ctx) {
  const status = h("select", { name: "status", "aria-label": "Status" },
    h("option", { value: "", text: "any status" }),
    h("option", { value: "online", text: "online" }),
    h("option", { value: "offline", text: "offline" }));
  const labels = h("input", { name: "label", placeholder: "labels: role=web dc=fra1", "aria-label": "Labels", size: "24" });
  const search = h("input", { name: "q", type: "search", placeholder: "find a host", "aria-label": "Find a host" });
  const summary = h("span", { class: "summary muted", "aria-live": "polite" });
  const error = messageBox("error");
  const table = new VirtualTable({
    columns: COLUMNS, label: "Hosts", empty: "No hosts match.",
    rowAttributes: (host) => ({ dataset: { host: host.id } }),
  });
  ctx.onCleanup(() => table.destroy());
  const newTask = h("a", { class: "button", href: "#/tasks/new", text: "New task on these hosts" });
  const pending = h("section", { class: "pending", hidden: true });

  ctx.main.append(
    h("div", { class: "page-head" }, h("h1", { text: "Hosts" }),
      h("div", { class: "actions" }, newTask, h("button", { type: "button", text: "Refresh", onclick: () => load() }))),
    pending,
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() }, status, labels, search, summary),
    error,
    table.el,
  );

  let hosts = [];
  let loading = null;
  let lastLoaded = null;
  const serverQuery = () => `${status.value}|${labels.value.trim()}`;

  function applyQuery() { // the field being typed in keeps what is typed
    for (const [input, key] of [[status, "status"], [labels, "label"], [search, "q"]]) {
      if (input !== document.activeElement) input.value = ctx.query.get(key) || "";
    }
  }

  function show() {
    const needle = search.value.trim().toLowerCase();
    const shown = needle
      ? hosts.filter((host) => host.id.toLowerCase().includes(needle) || (host.hostname || "").toLowerCase().includes(needle))
      : hosts;
    table.setItems(shown);
    const online = shown.filter((host) => host.status === "online").length;
    summary.textContent = `${plural(shown.length, "host")} (${online.toLocaleString("en")} online)${loading ? ", loading…" : ""}`;
  }

  async function load() {
    let selectors;
    try {
      selectors = parseLabels(labels.value);
    } catch (failure) {
      error.show(failure.message);
      return;
    }
    error.show("");
    if (loading) loading.abort();
    const controller = new AbortController();
    ctx.signal.addEventListener("abort", () => controller.abort());
    loading = controller;
    const query = { status: status.value, label: selectors };
    newTask.href = `#/tasks/new?${new URLSearchParams({ label: selectors.join(" ") })}`;
    try {
      lastLoaded = serverQuery();
      await listAll("/api/v1/hosts", query, {
        signal: controller.signal,
        onPage: (page, all) => {
          hosts = all; // shown as pages arrive
          show();
        },
      });
    } catch (failure) {
      if (!isAbort(failure)) error.show(failure.message);
    } finally {
      if (loading === controller) loading = null;
      show();
    }
    loadPending();
  }

  async function loadPending() {
    let waiting;
    try {
      waiting = await get("/api/v1/hosts", { enrollment: "pending", limit: 1000 }, { signal: ctx.signal });
    } catch (failure) {
      if (!isAbort(failure)) error.show(failure.message);
      return;
    }
    pending.hidden = waiting.items.length === 0;
    const blocked = session.needs("approve_host", "admin");
    clear(pending, 
      h("h2", { text: `Waiting for enrolment (${waiting.items.length})` }),
      h("p", { class: "muted", text: blocked || "These agents presented the enrolment token. Approve to let them connect and run tasks." }),
      h("ul", { class: "pending-list" }, waiting.items.map((host) => h("li", { dataset: { host: host.id } },
        h("span", { class: "mono", text: cleanName(host.id) }),
        h("span", { class: "muted", text: ` ${cleanName(host.address)} · first seen ${formatTime(host.first_seen_at)} ` }),
        labelChips(host.labels),
        h("button", { type: "button", class: "primary", text: "Approve", disabled: Boolean(blocked), title: blocked || undefined, onclick: () => decide(host.id, "approve") }),
        h("button", { type: "button", class: "danger", text: "Reject", disabled: Boolean(blocked), title: blocked || undefined, onclick: () => decide(host.id, "reject") }),
      ))),
    );
  }

  async function decide(hostId, action) {
    try {
      await post(`/api/v1/hosts/${encodeURIComponent(hostId)}/${action}`);
      notify(`Host ${cleanName(hostId)} ${action === "approve" ? "approved: its agent enrols on its next attempt" : "rejected"}.`, "info");
    } catch (failure) {
      notify(failure.message);
    }
    load();
  }

  const reflect = debounce(() => {
    ctx.navigate("/hosts", { status: status.value, label: labels.value.trim(), q: search.value.trim() }, { replace: true });
  }, 300);
  status.addEventListener("change", reflect);
  labels.addEventListener("input", reflect);
  search.addEventListener("input", () => {
    show();
    reflect();
  });
  ctx.onCleanup(() => reflect.cancel());

  const timer = setInterval(() => {
    if (document.visibilityState === "visible" && !loading) load();
  }, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));

  applyQuery();
  update.current = { load, applyQuery, show, changed: () => serverQuery() !== lastLoaded };
  ctx.onCleanup(() => { update.current = null; });
  await load();
}

/** Same page, other filters (from the address bar or the filter inputs). */
export function update() {
  const page = update.current;
  if (!page) return;
  page.applyQuery();
  if (page.changed()) page.load();
  else page.show();
}
