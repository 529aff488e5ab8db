// Sign in with an API token: checked with the daemon (GET /api/v1/whoami) before it is kept.
import { h, messageBox } from "../dom.js";
import { session, signIn } from "../session.js";
import { cleanName } from "../text.js";

export async function render(ctx) {
  const next = ctx.query.get("next") || "/tasks";
  const input = h("input", {
    id: "token", name: "token", type: "password", autocomplete: "current-password",
    required: true, spellcheck: "false", placeholder: "dsp_… or the bootstrap token",
  });
  const error = messageBox("error");
  const button = h("button", { type: "submit", class: "primary", text: "Sign in" });
  const form = h("form", { class: "signin card", onsubmit: submit },
    h("h1", { text: "Sign in" }),
    h("p", { class: "muted", text: "Paste an API token. It is kept in this tab only (sessionStorage) and sent with every request; what you can do depends on its role: viewer, operator or admin." }),
    h("label", { for: "token", text: "API token" }),
    input,
    error,
    h("div", { class: "actions" }, button),
    h("p", { class: "hint", text: "Running scripts/demo? It prints the console's address and the token (also in .run/demo/api.token)." }),
  );
  ctx.main.append(form);
  input.focus();

  async function submit(event) {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) {
      error.show("Enter a token.");
      return;
    }
    button.disabled = true;
    error.show("");
    try {
      const who = await signIn(token);
      form.replaceChildren(h("p", { text: `Signed in as ${cleanName(who.actor)} (${cleanName(who.role)}).` }));
      const target = next.startsWith("/") && !next.startsWith("/signin") ? next : "/tasks";
      const [path, search = ""] = target.split("?", 2);
      ctx.navigate(path, Object.fromEntries(new URLSearchParams(search)));
    } catch (failure) {
      error.show(failure.status === 401 ? "That token was not accepted: check it and try again." : failure.message);
      button.disabled = false;
      input.select();
    }
  }
  if (session.signedIn) error.show(`You are signed in as ${cleanName(session.who.actor)}; signing in again replaces it.`);
}
