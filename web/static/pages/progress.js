// A task's progress: one bar with a segment per execution status, and the counts by status.
import { h } from "../dom.js";
import { BAR_ORDER, label } from "../status.js";

export function progressBar(progress, { compact = false } = {}) {
  const bar = h("div", { class: `bar${compact ? " compact" : ""}`, role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
  setProgress(bar, progress);
  return bar;
}

/** Updates a bar in place (its segments are reused, so a live update is cheap). */
export function setProgress(bar, progress) {
  const total = progress?.total || 0;
  const by = progress?.by_status || {};
  const percent = progress?.percent ?? 0;
  bar.setAttribute("aria-valuenow", String(percent));
  bar.setAttribute("aria-valuetext", `${progress?.finished ?? 0} of ${total} finished (${percent}%)`);
  bar.title = BAR_ORDER.filter((s) => by[s]).map((s) => `${label(s)}: ${by[s]}`).join(", ") || "nothing yet";
  for (const status of BAR_ORDER) {
    let segment = bar.querySelector(`[data-status="${status}"]`);
    const count = by[status] || 0;
    if (!count) {
      if (segment) segment.remove();
      continue;
    }
    if (!segment) {
      segment = h("span", { class: `seg s-${status}`, dataset: { status } });
      // keep the order of BAR_ORDER
      const after = BAR_ORDER.slice(BAR_ORDER.indexOf(status) + 1)
        .map((s) => bar.querySelector(`[data-status="${s}"]`)).find(Boolean);
      bar.insertBefore(segment, after || null);
    }
    segment.style.width = `${total ? (100 * count) / total : 0}%`;
  }
}

/** Chips "succeeded 140", "failed 6", ...; onPick(status) when one is clicked. */
export function statusCounts(progress, { onPick, active = "" } = {}) {
  const by = progress?.by_status || {};
  return BAR_ORDER.filter((status) => by[status]).map((status) => h("button", {
    type: "button",
    class: `count s-${status}${active === status ? " active" : ""}`,
    dataset: { status },
    "aria-pressed": active === status ? "true" : "false",
    title: `show only ${label(status)}`,
    onclick: onPick ? () => onPick(status) : undefined,
  }, h("span", { class: "dot" }), `${label(status)} `, h("strong", { text: by[status].toLocaleString("en") })));
}
