// A table that stays fast with any number of rows: only the rows in view (and a few around
// them) exist in the DOM; two spacer rows stand for the rest. Rows have one fixed height (the
// CSS variable --row-h) so positions are arithmetic.
import { h, perFrame } from "./dom.js";

const OVERSCAN = 8;

export class VirtualTable {
  /**
   * columns: [{title, class, cell(item) -> Node | string}]
   * rowAttributes(item) -> {dataset, class, ...} for the <tr>
   */
  constructor({ columns, rowAttributes = () => ({}), empty = "Nothing to show.", label = "" }) {
    this.columns = columns;
    this.rowAttributes = rowAttributes;
    this.items = [];
    this.emptyText = empty;
    this.head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class, scope: "col", text: c.title }))));
    this.body = h("tbody");
    this.table = h("table", { class: "grid" }, this.head, this.body);
    this.empty = h("p", { class: "empty muted", text: empty, hidden: true });
    this.el = h("div", { class: "vtable", tabindex: "0", role: "region", "aria-label": label || "table" },
      this.table, this.empty);
    this.rowHeight = 0;
    this.render = perFrame(() => this.draw());
    this.el.addEventListener("scroll", () => this.render(), { passive: true });
    this.resizeObserver = new ResizeObserver(() => this.render());
    this.resizeObserver.observe(this.el);
  }

  setItems(items) {
    this.items = items;
    this.render();
  }

  setEmptyText(text) {
    this.empty.textContent = text;
  }

  /** Redraw the visible rows (items changed in place). */
  refresh() {
    this.render();
  }

  destroy() {
    this.resizeObserver.disconnect();
  }

  measure() {
    if (!this.rowHeight) {
      const value = parseFloat(getComputedStyle(this.el).getPropertyValue("--row-h"));
      this.rowHeight = Number.isFinite(value) && value > 0 ? value : 32;
    }
    return this.rowHeight;
  }

  draw() {
    const rowHeight = this.measure();
    const count = this.items.length;
    this.empty.hidden = count > 0;
    const headHeight = this.head.offsetHeight;
    const top = Math.max(0, this.el.scrollTop - headHeight);
    const viewport = this.el.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / rowHeight) - OVERSCAN);
    const last = Math.min(count, Math.ceil((top + viewport) / rowHeight) + OVERSCAN);
    const rows = [];
    if (first > 0) rows.push(this.spacer(first * rowHeight));
    for (let index = first; index < last; index += 1) rows.push(this.row(this.items[index], index));
    if (last < count) rows.push(this.spacer((count - last) * rowHeight));
    this.body.replaceChildren(...rows);
  }

  spacer(height) {
    const row = h("tr", { class: "spacer", "aria-hidden": "true" }, h("td", { colspan: String(this.columns.length) }));
    row.style.height = `${height}px`;
    return row;
  }

  row(item, index) {
    const attributes = this.rowAttributes(item, index) || {};
    return h("tr", { ...attributes, "aria-rowindex": String(index + 2) },
      this.columns.map((column) => h("td", { class: column.class }, column.cell(item))));
  }

  scrollToIndex(index) {
    this.el.scrollTop = index * this.measure();
  }
}
