// Who is signed in: the API token (kept in sessionStorage, so it ends with the tab) and what its
// role allows, as GET /api/v1/whoami says.
import { get, getToken, setToken } from "./api.js";

const ROLE_WORDS = {
  viewer: "may read hosts, tasks, executions and output",
  operator: "may read everything, and create, start, cancel and retry tasks",
  admin: "may do everything: tasks, approving and rejecting hosts, tokens, the audit log",
};

export const session = {
  who: null, // {actor, role, may: [route names]}

  get signedIn() {
    return this.who !== null;
  },

  /** The route (by the API's name, e.g. "create_task") is open to this token's role. */
  may(route) {
    return this.who !== null && this.who.may.includes(route);
  },

  roleWords() {
    return this.who ? ROLE_WORDS[this.who.role] || "" : "";
  },

  /** Why a button is disabled for this role, or "" when it is not. */
  needs(route, role) {
    return this.may(route) ? "" : `Needs an ${role} token; ${this.who?.actor || "this token"} is ${this.who?.role || "not signed in"}.`;
  },
};

/** Checks a token with the daemon; keeps it only if it is accepted (throws ApiError if not). */
export async function signIn(token) {
  session.who = null; // a 401 now is this form's answer, not a session that ended
  setToken(token);
  try {
    session.who = await get("/api/v1/whoami");
  } catch (error) {
    if (error.status === 401 || error.status === 403) setToken(""); // kept across a network error
    session.who = null;
    throw error;
  }
  return session.who;
}

/** Restores the session of this tab, if it has a token the daemon still accepts. */
export async function resume() {
  if (!getToken()) return null;
  return signIn(getToken());
}

export function signOut() {
  setToken("");
  session.who = null;
}
