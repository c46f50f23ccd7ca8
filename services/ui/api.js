// Calls to the align API with the key the user pasted. The key lives in sessionStorage and travels only in
// the Authorization header, never in a URL.

const KEY_NAME = "align.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY_NAME);

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, detail) {
    const text = Array.isArray(detail) ? detail.map((d) => `${d.field}: ${d.message}`).join("\n") : String(detail);
    super(`HTTP ${status}: ${text}`);
    this.status = status;
    this.detail = detail;
    // A 422 lists {field, message} pairs; other errors carry one message.
    this.fields = Array.isArray(detail) ? detail : [];
  }
}

function headers(extra = {}) {
  return { ...extra, Authorization: `Bearer ${apiKey() || ""}` };
}

async function errorOf(response) {
  let detail = response.statusText;
  try {
    detail = (await response.json()).detail ?? detail;
  } catch {
    // not JSON: keep the status text
  }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("align:unauthorized", { detail }));
  return new ApiError(response.status, detail);
}

export async function api(path, { method = "GET", body, extraHeaders = {}, signal } = {}) {
  const init = { method, headers: headers(extraHeaders), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function parseFrame(frame) {
  let type = "message";
  let id = null;
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = Number(value);
  }
  return data.length ? { type, id, data: JSON.parse(data.join("\n")) } : null;
}

// The job's events as {type, id, data}, from GET /jobs/{id}/events with Accept: text/event-stream.
// EventSource cannot send an Authorization header, so the stream is read with fetch and a reader.
export async function* streamEvents(jobId, { after = 0, signal } = {}) {
  const query = after ? `?after=${after}` : "";
  const response = await fetch(`/jobs/${encodeURIComponent(jobId)}/events${query}`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const frame = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const event = parseFrame(frame);
      if (event) yield event;
    }
  }
}

// Saves a response body as a file: a plain link could not carry the Authorization header.
export async function download(path, filename) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
