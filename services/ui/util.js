// Small DOM and formatting helpers shared by the pages.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const badge = (state) => el("span", { class: `badge state-${state}`, dataset: { state } }, state);

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${seconds % 60}s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours}h ${minutes % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

export const age = (iso) => (iso ? `${duration((Date.now() - Date.parse(iso)) / 1000)} ago` : "—");

export const clock = (iso) => (iso ? new Date(iso).toLocaleString(undefined, { hour12: false }) : "—");

export function number(value) {
  if (typeof value !== "number") return value ?? "—";
  if (Number.isInteger(value)) return value.toLocaleString();
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-3 || size >= 1e5) ? value.toExponential(3) : value.toFixed(4);
}

export function bytes(size) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${unit ? size.toFixed(1) : size} ${units[unit]}`;
}

export const TERMINAL = new Set(["succeeded", "failed", "failed_gate", "cancelled"]);

export function errorBox(error) {
  const items = error.fields?.length
    ? el(
        "ul",
        {},
        error.fields.map((f) => el("li", {}, el("code", {}, f.field), ": ", f.message)),
      )
    : el("p", {}, error.message);
  return el("div", { class: "alert error" }, items);
}

// The latest change the job shows: its own update, or a stage's start or end.
export function lastActivity(job) {
  const times = [job.updated_at, ...job.stages.flatMap((s) => [s.started_at, s.finished_at])].filter(Boolean);
  return times.reduce((latest, time) => (Date.parse(time) > Date.parse(latest) ? time : latest));
}
