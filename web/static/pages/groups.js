// Hosts grouped by identical result (same command, exit code and output), largest group first,
// with durations and exit codes: GET /api/v1/tasks/{id}/stats.
import { get, isAbort } from "../api.js";
import { clear, h } from "../dom.js";
import { cleanName, cleanOutput, formatDuration, plural } from "../text.js";

export class Groups {
  constructor({ taskId, commands, onOpen }) {
    this.taskId = taskId;
    this.commands = commands;
    this.onOpen = onOpen; // (hostId, commandIndex)
    this.summary = h("div", { class: "stats-summary" });
    this.list = h("ol", { class: "groups" });
    this.status = h("p", { class: "muted" });
    this.el = h("section", { class: "groups-panel", "aria-label": "Groups" }, this.summary, this.status, this.list);
    this.controller = null;
  }

  async refresh() {
    if (this.controller) this.controller.abort();
    const controller = new AbortController();
    this.controller = controller;
    let stats;
    try {
      stats = await get(`/api/v1/tasks/${this.taskId}/stats`, {}, { signal: controller.signal });
    } catch (failure) {
      if (!isAbort(failure)) this.status.textContent = failure.message;
      return;
    }
    this.show(stats);
  }

  show(stats) {
    const d = stats.duration_s;
    const codes = Object.entries(stats.by_exit_code);
    clear(this.summary, 
      h("span", { text: `Durations (${plural(d.count, "execution")}): ` }),
      h("strong", { text: d.count ? `min ${formatDuration(d.min)} · avg ${formatDuration(d.avg)} · p95 ${formatDuration(d.p95)} · max ${formatDuration(d.max)}` : "none yet" }),
      h("span", { text: " · exit codes: " }),
      h("strong", { text: codes.length ? codes.map(([code, n]) => `${code} × ${n}`).join(", ") : "none yet" }),
    );
    this.status.textContent = stats.groups.length
      ? (stats.groups_total > stats.groups.length ? `The ${stats.groups.length} largest of ${stats.groups_total} groups.` : `${plural(stats.groups_total, "group")} of identical results.`)
      : "No finished executions yet: groups appear as hosts finish.";
    const many = this.commands.length > 1;
    clear(this.list, ...stats.groups.map((group) => h("li", { class: "group card", dataset: { digest: group.output_digest } },
      h("div", { class: "group-head" },
        h("strong", { class: "n", text: plural(group.count, "host") }),
        h("span", { text: ` · ${group.exit_code === null ? "no exit code" : `exit ${group.exit_code}`}${many ? ` · command ${group.command_index + 1}` : ""}` })),
      h("div", { class: "hosts" },
        group.hosts.map((host) => h("button", {
          type: "button", class: "chip", text: cleanName(host), title: "show this host's output",
          onclick: () => this.onOpen(host, group.command_index),
        })),
        group.count > group.hosts.length ? h("span", { class: "muted", text: ` and ${group.count - group.hosts.length} more` }) : null),
      group.stdout_preview
        ? h("pre", { class: "out preview", text: cleanOutput(group.stdout_preview) })
        : h("p", { class: "muted small", text: "(no stdout)" }),
    )));
  }

  destroy() {
    if (this.controller) this.controller.abort();
  }
}
