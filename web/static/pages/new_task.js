// New task: a name, commands, targets (hosts picked and/or labels, with a live count of the hosts
// they match), limits; create it, or create and start it.
import { get, isAbort, listAll, post } from "../api.js";
import { clear, debounce, h, messageBox, notify } from "../dom.js";
import { session } from "../session.js";
import { cleanName, plural, randomKey } from "../text.js";
import { labelChips } from "./hosts.js";

const SHOWN_MATCHES = 100;
const SHOWN_PICKED = 60;

function field(labelText, input, hint = "") {
  return h("label", { class: "field" }, h("span", { class: "label", text: labelText }), input,
    hint ? h("span", { class: "hint", text: hint }) : null);
}

export async function render(ctx) {
  const blocked = session.needs("create_task", "operator");
  const error = messageBox("error");
  const name = h("input", { name: "name", required: true, maxlength: "200", dataset: { field: "name" }, placeholder: "restart nginx" });
  const commandList = h("div", { class: "commands" });
  const commands = [];
  const picked = new Set();
  let approved = new Map(); // id -> host, the approved hosts (the picker's choices)
  let idempotencyKey = null; // kept while the form is unchanged: a double submit makes one task

  // --- commands ---------------------------------------------------------------------------
  function addCommand(values = {}) {
    const script = h("textarea", { class: "mono", rows: "4", required: true, spellcheck: "false", placeholder: "systemctl restart nginx" });
    const args = h("textarea", { class: "mono", rows: "2", spellcheck: "false", placeholder: "one per line: $1, $2, …" });
    const timeout = h("input", { type: "number", min: "0.1", step: "any", value: String(values.timeout_s ?? 600) });
    script.value = values.script || "";
    args.value = (values.args || []).join("\n");
    const remove = h("button", { type: "button", class: "link", text: "Remove" });
    const title = h("h3");
    const card = h("div", { class: "command card" },
      h("div", { class: "row-head" }, title, remove),
      field("Script (run with /bin/sh -c)", script),
      h("div", { class: "row" }, field("Arguments", args), field("Timeout (seconds)", timeout, "killed after this")));
    const command = { card, script, args, timeout, title };
    remove.addEventListener("click", () => {
      commands.splice(commands.indexOf(command), 1);
      card.remove();
      renumber();
    });
    commands.push(command);
    commandList.append(card);
    renumber();
  }

  function renumber() {
    commands.forEach((command, i) => {
      command.title.textContent = `Command ${i + 1}`;
      command.script.dataset.field = `commands.${i}.script`;
      command.args.dataset.field = `commands.${i}.args`;
      command.timeout.dataset.field = `commands.${i}.timeout_s`;
      command.card.querySelector(".row-head button").hidden = commands.length === 1;
    });
  }

  // --- targets: hosts picked ---------------------------------------------------------------
  const search = h("input", { type: "search", placeholder: "find hosts by name or label", "aria-label": "Find hosts" });
  const matches = h("ul", { class: "picker", "aria-label": "Matching hosts" });
  const matchNote = h("p", { class: "hint" });
  const pickedList = h("div", { class: "picked", "aria-label": "Picked hosts" });

  function hostText(host) {
    return `${host.id} ${host.hostname} ${Object.entries(host.labels).map(([k, v]) => `${k}=${v}`).join(" ")}`.toLowerCase();
  }

  function showMatches() {
    const needle = search.value.trim().toLowerCase();
    const found = [...approved.values()].filter((host) => !needle || hostText(host).includes(needle));
    clear(matches, ...found.slice(0, SHOWN_MATCHES).map((host) => {
      const box = h("input", { type: "checkbox", checked: picked.has(host.id), value: host.id });
      box.addEventListener("change", () => {
        if (box.checked) picked.add(host.id);
        else picked.delete(host.id);
        changed();
      });
      return h("li", { dataset: { host: host.id } }, h("label", {}, box,
        h("span", { class: `dot ${host.status}`, title: host.status }),
        h("span", { class: "mono", text: cleanName(host.id) }), " ", labelChips(host.labels)));
    }));
    matchNote.textContent = found.length > SHOWN_MATCHES
      ? `Showing ${SHOWN_MATCHES} of ${found.length} matches; refine the search.`
      : `${plural(found.length, "approved host")} match.`;
    selectShown.disabled = found.length === 0;
    selectShown.onclick = () => {
      for (const host of found) picked.add(host.id);
      showMatches();
      changed();
    };
  }

  function showPicked() {
    const ids = [...picked];
    clear(pickedList, 
      ids.length ? null : h("span", { class: "muted", text: "No hosts picked." }),
      ids.slice(0, SHOWN_PICKED).map((id) => h("span", { class: "chip removable", dataset: { host: id } }, cleanName(id),
        h("button", {
          type: "button", "aria-label": `Remove ${cleanName(id)}`, text: "×",
          onclick: () => { picked.delete(id); showMatches(); changed(); },
        }))),
      ids.length > SHOWN_PICKED ? h("span", { class: "muted", text: ` and ${ids.length - SHOWN_PICKED} more` }) : null,
    );
  }

  const selectShown = h("button", { type: "button", class: "small", text: "Pick all matches" });
  const clearPicked = h("button", { type: "button", class: "small", text: "Clear", onclick: () => { picked.clear(); showMatches(); changed(); } });

  // --- targets: labels ---------------------------------------------------------------------
  const labelRows = h("div", { class: "label-rows", dataset: { field: "targets.labels" } });
  function addLabel(key = "", value = "") {
    const k = h("input", { placeholder: "key", "aria-label": "Label key", value: key, size: "10" });
    const v = h("input", { placeholder: "value", "aria-label": "Label value", value, size: "10" });
    const row = h("div", { class: "label-row" }, k, h("span", { text: "=" }), v,
      h("button", { type: "button", class: "link", text: "Remove", onclick: () => { row.remove(); changed(); } }));
    row.pair = () => [k.value.trim(), v.value];
    labelRows.append(row);
  }
  function labelSelectors() {
    return [...labelRows.children].map((row) => row.pair()).filter(([key]) => key);
  }

  // --- the live count ----------------------------------------------------------------------
  const count = h("div", { class: "target-count", "aria-live": "polite", dataset: { field: "targets" } });
  let counting = null;
  const recount = debounce(async () => {
    if (counting) counting.abort();
    const controller = new AbortController();
    counting = controller;
    const selectors = labelSelectors();
    try {
      const byLabels = selectors.length
        ? await listAll("/api/v1/hosts", { enrollment: "approved", label: selectors.map(([k, v]) => `${k}=${v}`) }, { signal: controller.signal })
        : [];
      const all = new Map(byLabels.map((host) => [host.id, host]));
      for (const id of picked) if (!all.has(id)) all.set(id, approved.get(id) || { id, status: "unknown" });
      const hosts = [...all.values()];
      const online = hosts.filter((host) => host.status === "online").length;
      const offline = hosts.length - online;
      clear(count, 
        h("strong", { class: "n", text: plural(hosts.length, "host") }),
        ` matched: ${picked.size.toLocaleString("en")} picked, ${byLabels.length.toLocaleString("en")} by labels${selectors.length ? "" : " (none given)"}; `,
        h("span", { text: `${online.toLocaleString("en")} online` }),
        offline ? h("span", { class: "warn", text: `, ${offline} offline (they fail as agent_offline unless the delivery timeout lets them come back)` }) : null,
      );
      count.dataset.count = String(hosts.length);
    } catch (failure) {
      if (!isAbort(failure)) clear(count, h("span", { class: "warn", text: failure.message }));
    }
  }, 250);
  ctx.onCleanup(() => { recount.cancel(); counting?.abort(); });

  function changed() {
    idempotencyKey = null;
    showPicked();
    recount();
  }

  // --- limits and buttons ------------------------------------------------------------------
  const concurrency = h("input", { type: "number", min: "1", step: "1", placeholder: "no limit", dataset: { field: "max_concurrency" } });
  const failures = h("input", { type: "number", min: "0", step: "1", placeholder: "any", dataset: { field: "max_failures" } });
  const delivery = h("input", { type: "number", min: "0", step: "any", value: "0", dataset: { field: "delivery_timeout_s" } });
  const create = h("button", { type: "submit", value: "create", text: "Create", disabled: Boolean(blocked), title: blocked || undefined });
  const createStart = h("button", { type: "submit", value: "start", class: "primary", text: "Create and start", disabled: Boolean(blocked), title: blocked || undefined });

  const form = h("form", { class: "new-task", novalidate: true },
    h("div", { class: "page-head" }, h("h1", { text: "New task" })),
    blocked ? h("div", { class: "message info", text: `${blocked} You can fill the form, but not create the task.` }) : null,
    field("Name", name),
    h("h2", { text: "Commands" }), h("p", { class: "hint", text: "Run in order on every host; a host whose command fails skips the rest." }),
    commandList,
    h("button", { type: "button", text: "Add a command", onclick: () => { addCommand(); changed(); } }),
    h("h2", { text: "Targets" }),
    h("div", { class: "targets" },
      h("div", { class: "card" }, h("h3", { text: "Pick hosts" }), search, h("div", { class: "row" }, selectShown, clearPicked), matchNote, matches, pickedList),
      h("div", { class: "card" }, h("h3", { text: "…and/or every approved host with these labels" }), labelRows,
        h("button", { type: "button", class: "small", text: "Add a label", onclick: () => addLabel() }))),
    count,
    h("h2", { text: "Limits" }),
    h("div", { class: "row limits" },
      field("Max concurrency", concurrency, "hosts at once; empty: no limit"),
      field("Failure threshold", failures, "failed hosts tolerated before the rest is cancelled; empty: any"),
      field("Delivery timeout (s)", delivery, "wait this long for an offline target; 0: fail at once")),
    error,
    h("div", { class: "actions submit" }, create, createStart),
  );
  form.addEventListener("input", changed);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(event.submitter?.value === "start");
  });
  search.addEventListener("input", showMatches);
  ctx.main.append(form);

  function body(start) {
    const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
    return {
      name: name.value,
      commands: commands.map((c) => ({
        script: c.script.value,
        args: c.args.value.split("\n").filter((line, i, lines) => line !== "" || i < lines.length - 1),
        timeout_s: Number(c.timeout.value),
      })),
      targets: { hosts: [...picked], labels: Object.fromEntries(labelSelectors()) },
      max_concurrency: number(concurrency),
      max_failures: number(failures),
      delivery_timeout_s: number(delivery) ?? 0,
      start,
    };
  }

  function markField(path) {
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
    const parts = (path || "").split(".");
    while (parts.length) {
      const el = form.querySelector(`[data-field="${CSS.escape(parts.join("."))}"]`);
      if (el) {
        el.classList.add("invalid");
        el.scrollIntoView({ block: "center" });
        if (el.focus) el.focus();
        return;
      }
      parts.pop();
    }
  }

  function check(payload) {
    if (!payload.name.trim()) return ["name", "Give the task a name."];
    const empty = payload.commands.findIndex((c) => !c.script.trim());
    if (empty >= 0) return [`commands.${empty}.script`, `Command ${empty + 1} has no script.`];
    const badTimeout = payload.commands.findIndex((c) => !(c.timeout_s > 0));
    if (badTimeout >= 0) return [`commands.${badTimeout}.timeout_s`, `Command ${badTimeout + 1} needs a timeout above 0 seconds.`];
    if (!payload.targets.hosts.length && !Object.keys(payload.targets.labels).length) {
      return ["targets", "Pick at least one host or give a label."];
    }
    for (const key of ["max_concurrency", "max_failures", "delivery_timeout_s"]) {
      if (payload[key] !== null && Number.isNaN(payload[key])) return [key, "That is not a number."];
    }
    return null;
  }

  async function submit(start) {
    const payload = body(start);
    const problem = check(payload);
    if (problem) {
      error.show(problem[1]);
      markField(problem[0]);
      return;
    }
    error.show("");
    idempotencyKey ??= randomKey();
    create.disabled = createStart.disabled = true;
    try {
      const task = await post("/api/v1/tasks", payload, { headers: { "Idempotency-Key": idempotencyKey } });
      notify(`Task ${task.id} created${start ? " and started" : ""}.`, "info");
      ctx.navigate(`/tasks/${task.id}`);
    } catch (failure) {
      error.show(failure.message);
      markField(failure.field);
      create.disabled = createStart.disabled = Boolean(blocked);
    }
  }

  // --- start: a copy of another task, or hosts/labels from the hosts page ----------------------
  const from = ctx.query.get("from");
  let copy = null;
  if (from) {
    try {
      copy = await get(`/api/v1/tasks/${encodeURIComponent(from)}`, {}, { signal: ctx.signal });
    } catch (failure) {
      if (isAbort(failure)) return;
      error.show(`Could not copy task ${cleanName(from)}: ${failure.message}`);
    }
  }
  if (copy) {
    name.value = copy.name;
    copy.commands.forEach((c) => addCommand(c));
    for (const id of copy.targets.hosts || []) picked.add(id);
    for (const [k, v] of Object.entries(copy.targets.labels || {})) addLabel(k, v);
    if (copy.max_concurrency !== null) concurrency.value = String(copy.max_concurrency);
    if (copy.max_failures !== null) failures.value = String(copy.max_failures);
    delivery.value = String(copy.delivery_timeout_s);
  } else {
    addCommand();
    for (const id of (ctx.query.get("hosts") || "").split(",").filter(Boolean)) picked.add(id);
    for (const selector of (ctx.query.get("label") || "").split(/[\s,]+/).filter(Boolean)) {
      const at = selector.indexOf("=");
      if (at > 0) addLabel(selector.slice(0, at), selector.slice(at + 1));
    }
  }
  if (!labelRows.children.length) addLabel();
  showPicked();
  recount();
  try {
    const hosts = await listAll("/api/v1/hosts", { enrollment: "approved" }, { signal: ctx.signal });
    approved = new Map(hosts.map((host) => [host.id, host]));
  } catch (failure) {
    if (isAbort(failure)) return;
    matchNote.textContent = failure.message;
  }
  showMatches();
  recount();
  name.focus();
}
