// The console's shell: sign-in gate, navigation, and the router (#/hosts, #/tasks, #/tasks/new,
// #/tasks/{id}). Each page is a module whose render(ctx) fills ctx.main; ctx.signal aborts its
// requests and ctx.onCleanup closes its streams when the person leaves the page.
import { onUnauthorized } from "./api.js";
import { clear, clearNotices, h, notify } from "./dom.js";
import { resume, session, signOut } from "./session.js";
import { cleanName } from "./text.js";
import * as hostsPage from "./pages/hosts.js";
import * as newTaskPage from "./pages/new_task.js";
import * as signInPage from "./pages/signin.js";
import * as taskPage from "./pages/task.js";
import * as tasksPage from "./pages/tasks.js";

const ROUTES = [
  { pattern: /^\/signin$/, page: signInPage, nav: "", open: true },
  { pattern: /^\/hosts$/, page: hostsPage, nav: "hosts" },
  { pattern: /^\/tasks\/new$/, page: newTaskPage, nav: "new" },
  { pattern: /^\/tasks$/, page: tasksPage, nav: "tasks" },
  { pattern: /^\/tasks\/([0-9]{1,19})$/, page: taskPage, nav: "tasks", params: ["id"] },
];

const main = document.getElementById("main");
let current = null; // {key, route, ctx}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/tasks";
  const [path, search = ""] = raw.split("?", 2);
  return { path, query: new URLSearchParams(search) };
}

/** Go to a page: navigate("/tasks/7", {exec: "12"}); replace keeps history clean for filters. */
export function navigate(path, query = {}, { replace = false } = {}) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const hash = `#${path}${search.toString() ? `?${search}` : ""}`;
  if (hash === location.hash) return;
  if (replace) {
    history.replaceState(null, "", hash);
    route();
  } else {
    location.hash = hash;
  }
}

function leave() {
  if (!current) return;
  current.ctx.controller.abort();
  for (const cleanup of current.ctx.cleanups.splice(0)) {
    try {
      cleanup();
    } catch (error) {
      console.error(error);
    }
  }
  current = null;
}

async function route() {
  const { path, query } = parseHash();
  const found = ROUTES.find((r) => r.pattern.test(path));
  if (!found) {
    navigate("/tasks", {}, { replace: true });
    return;
  }
  if (!found.open && !session.signedIn) {
    navigate("/signin", { next: location.hash.replace(/^#/, "") }, { replace: true });
    return;
  }
  const match = path.match(found.pattern);
  const params = Object.fromEntries((found.params || []).map((name, i) => [name, match[i + 1]]));
  // the same page with other query parameters: let it update in place (filters, open output)
  if (current && current.key === path && current.route.page.update) {
    current.ctx.query = query;
    current.route.page.update(current.ctx);
    return;
  }
  leave();
  clearNotices();
  const controller = new AbortController();
  const ctx = {
    main, params, query, controller, signal: controller.signal, cleanups: [], navigate,
    onCleanup(fn) { this.cleanups.push(fn); },
  };
  current = { key: path, route: found, ctx };
  showNav(found.nav);
  clear(main);
  try {
    await found.page.render(ctx);
  } catch (error) {
    if (error.name === "AbortError") return;
    console.error(error);
    clear(main, h("div", { class: "message error", role: "alert", text: error.message || String(error) }));
  }
}

function showNav(active) {
  const nav = document.getElementById("nav");
  nav.hidden = !session.signedIn;
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("active", link.dataset.nav === active);
    if (link.dataset.nav === active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const who = document.getElementById("who");
  if (!session.signedIn) {
    clear(who);
    return;
  }
  clear(who,
    h("span", { class: "actor", title: session.roleWords(), text: cleanName(session.who.actor) }),
    h("span", { class: `role r-${session.who.role}`, title: session.roleWords(), text: cleanName(session.who.role) }),
    h("button", {
      type: "button", class: "link", text: "Sign out",
      onclick: () => {
        signOut();
        leave();
        navigate("/signin");
      },
    }));
}

onUnauthorized((error) => {
  if (!session.signedIn) return;
  signOut();
  leave();
  navigate("/signin", { next: location.hash.replace(/^#/, "") }, { replace: true });
  notify(error.message);
});

window.addEventListener("hashchange", route);
window.addEventListener("error", (event) => {
  notify(`The page hit an unexpected problem: ${event.message}. Reloading may help.`);
});
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  if (reason && reason.name === "AbortError") return;
  notify(reason && reason.message ? reason.message : `Unexpected problem: ${String(reason)}`);
});

async function boot() {
  try {
    await resume();
  } catch (error) {
    if (error.status !== 401) notify(error.message);
  }
  document.getElementById("booting")?.remove();
  route();
}

boot();
