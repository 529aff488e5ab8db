// Building the page. Text only ever enters the DOM as text nodes or textContent: nothing here
// parses HTML, so a name or a line of output can never become markup.

const PROPERTIES = new Set(["value", "checked", "disabled", "hidden", "readOnly", "selected"]);

/** h("button", {class: "x", onclick: fn, text: "Go"}, child, "text", [more]) */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) {
      if (typeof value !== "function") throw new TypeError(`${key} must be a function`);
      el.addEventListener(key.slice(2), value);
    } else if (PROPERTIES.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Calls fn at most once per animation frame, with the latest arguments. */
export function perFrame(fn) {
  let scheduled = false;
  let latest = [];
  return (...args) => {
    latest = args;
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      fn(...latest);
    });
  };
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** Calls fn at most every ms milliseconds (the last call always runs). */
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  const wrapped = () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) {
      last = Date.now();
      fn();
    } else if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        fn();
      }, wait);
    }
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

// --- notices: what went wrong (or right), in words --------------------------------------------

export function notify(message, kind = "error", { timeoutMs } = {}) {
  const area = document.getElementById("notices");
  const close = h("button", { class: "close", type: "button", "aria-label": "Dismiss", text: "×" });
  const notice = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" },
    h("span", { text: message }), close);
  close.addEventListener("click", () => notice.remove());
  // the same message twice in a row is shown once
  const previous = area.lastElementChild;
  if (previous && previous.firstChild.textContent === message) previous.remove();
  area.append(notice);
  while (area.children.length > 4) area.firstElementChild.remove();
  const ms = timeoutMs ?? (kind === "error" ? 0 : 5000);
  if (ms > 0) setTimeout(() => notice.remove(), ms);
  return notice;
}

export function clearNotices() {
  document.getElementById("notices").replaceChildren();
}

/** An inline message box inside a page (e.g. a form's error). */
export function messageBox(kind = "error") {
  const box = h("div", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", hidden: true });
  box.show = (text) => {
    box.textContent = text;
    box.hidden = !text;
  };
  return box;
}
