// The states tasks, executions and hosts are in, as README.md's table describes them.
import { h } from "./dom.js";
import { cleanName } from "./text.js";

export const EXEC_STATUSES = [
  "pending", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled",
  "dispatch_failed", "skipped",
];
export const EXEC_TERMINAL = new Set([
  "succeeded", "failed", "timed_out", "cancelled", "dispatch_failed", "skipped",
]);
export const TASK_STATUSES = ["pending", "queued", "running", "completed", "failed", "cancelled"];
export const TASK_TERMINAL = new Set(["completed", "failed", "cancelled"]);

// the order a status may move in (daemon/states.py EXEC_RANK): never backwards
export function execRank(status) {
  if (EXEC_TERMINAL.has(status)) return 3;
  return { pending: 0, dispatched: 1, running: 2 }[status] ?? 0;
}

// the progress bar's segments, finished ones first
export const BAR_ORDER = [
  "succeeded", "failed", "timed_out", "dispatch_failed", "cancelled", "skipped", "running",
  "dispatched", "pending",
];

const MEANING = {
  pending: "waiting for its turn",
  dispatched: "sent to the agent, not yet started",
  running: "the agent started the process",
  succeeded: "exited 0",
  failed: "exited non-zero, was killed, could not start, or its agent was lost",
  timed_out: "ran past its timeout; its process group was killed",
  cancelled: "stopped by a cancel, or never started",
  dispatch_failed: "never reached an agent",
  skipped: "an earlier command on the same host did not succeed",
  queued: "started, waiting for a slot",
  completed: "every execution succeeded",
  online: "its agent is connected",
  offline: "its agent is not connected",
  approved: "may connect and be targeted",
  rejected: "refused by an administrator: it cannot connect",
  revoked: "its credential was revoked: it cannot connect until approved again",
};

export function label(status) {
  return cleanName(status).replace(/_/g, " ");
}

export function badge(status) {
  const known = MEANING[status] !== undefined;
  return h("span", {
    class: `badge s-${known ? status : "unknown"}`,
    title: known ? MEANING[status] : undefined,
    text: label(status),
  });
}

const SIGNALS = {
  1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE",
  9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM",
};

/** "0", "3", "SIGKILL" or "" (exit_code is only set when a process really exited). */
export function exitText(execution) {
  if (execution.exit_code !== null && execution.exit_code !== undefined) {
    return String(execution.exit_code);
  }
  if (execution.signal) return SIGNALS[execution.signal] || `signal ${execution.signal}`;
  return "";
}
