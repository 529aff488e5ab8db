// The HTTP API (/api/v1, see /openapi.json): every call carries the signed-in token, and every
// refusal becomes an ApiError whose message is a sentence for a person.
import { cleanName } from "./text.js";

const TOKEN_KEY = "dispatch.console.token";
let unauthorizedHandler = () => {};

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Called with the ApiError of any 401 (the token is wrong, revoked or gone). */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export class ApiError extends Error {
  constructor(status, code, detail, field = null) {
    super(explain(status, code, detail, field));
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.field = field;
  }
}

function explain(status, code, detail, field) {
  const said = detail ? cleanName(detail) : "";
  const at = field ? ` (${cleanName(field)})` : "";
  switch (true) {
    case status === 0:
      return `Cannot reach dispatchd at ${location.host}: ${said || "no answer"}. Check that it is running, then try again.`;
    case status === 400:
      return `The daemon refused the request${at}: ${said || "it is malformed"}.`;
    case status === 401:
      return `Your token was not accepted${said ? ` (${said})` : ""}. Sign in again with a valid API token.`;
    case status === 403:
      return `Your token's role does not allow this: ${said || "forbidden"}.`;
    case status === 404:
      return `Not found: ${said || "there is no such thing"}.`;
    case status === 409:
      return `${said || "That conflicts with the current state"}.`;
    case status === 413:
      return `Too large: ${said || "the request body is too large"}.`;
    case status === 503 || status === 429:
      return `The daemon is busy or its database is not answering${said ? ` (${said})` : ""}. Try again in a moment.`;
    case status >= 500:
      return `The daemon failed to answer (HTTP ${status}${said ? `: ${said}` : ""}). Try again; if it persists, see its log.`;
    default:
      return `The daemon answered HTTP ${status}${said ? `: ${said}` : ""}.`;
  }
}

/** The ApiError for a response that is not 2xx: its {"error": {...}} body, or words for a body
 * that is not one (a proxy's HTML page, nothing at all). */
export async function errorFrom(response) {
  let detail = null;
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error !== null) detail = body.error;
  } catch {
    // not JSON: described by its status alone
  }
  const message = typeof detail?.message === "string" ? detail.message
    : `${response.statusText || "unexpected answer"}`;
  const error = new ApiError(response.status, detail?.code || `http_${response.status}`,
    message, typeof detail?.field === "string" ? detail.field : null);
  if (response.status === 401) unauthorizedHandler(error);
  return error;
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${getToken()}`, ...extra };
}

/** A URL of this origin with query parameters (arrays repeat the parameter; empty ones are
 * left out). */
export function apiUrl(path, query = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") url.searchParams.append(key, item);
    }
  }
  return url;
}

export async function request(method, path, { query, body, headers, signal } = {}) {
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers: authHeaders({
        Accept: "application/json",
        ...(body !== undefined ? { "Content-Type": "application/json" } : {}),
        ...headers,
      }),
      body: body !== undefined ? JSON.stringify(body) : undefined,
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", error.message);
  }
  if (!response.ok) throw await errorFrom(response);
  try {
    return await response.json();
  } catch {
    throw new ApiError(response.status, "bad_body", "the answer was not JSON");
  }
}

export const get = (path, query, options = {}) => request("GET", path, { ...options, query });
export const post = (path, body, options = {}) => request("POST", path, { ...options, body });

/** Every item of a paginated list, page by page (onPage sees each page as it arrives). */
export async function listAll(path, query = {}, { signal, onPage, limit = 1000 } = {}) {
  const items = [];
  let cursor = null;
  do {
    const page = await get(path, { ...query, limit, cursor }, { signal });
    items.push(...page.items);
    if (onPage) onPage(page.items, items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/** The raw bytes of one output stream, for saving. */
export async function fetchBlob(path, query, { signal } = {}) {
  let response;
  try {
    response = await fetch(apiUrl(path, query), { headers: authHeaders(), signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", error.message);
  }
  if (!response.ok) throw await errorFrom(response);
  return response.blob();
}

export const isAbort = (error) => error && error.name === "AbortError";
