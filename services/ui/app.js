// The dashboard's shell: the API key form, the header, and a hash router over the pages.

import { api, apiKey, setApiKey } from "./api.js";
import { renderArtifact } from "./artifact.js";
import { renderJob } from "./job.js";
import { renderJobs } from "./jobs.js";
import { renderSubmit } from "./submit.js";
import { el } from "./util.js";

const main = document.getElementById("main");
const auth = document.getElementById("auth");
let cleanup = () => {};

const ROUTES = [
  [/^#\/jobs\/([^/]+)$/, renderJob, "jobs"],
  [/^#\/artifacts\/([^/]+)$/, renderArtifact, "jobs"],
  [/^#\/submit$/, renderSubmit, "submit"],
  [/^#\/jobs$/, renderJobs, "jobs"],
];

function route() {
  cleanup();
  cleanup = () => {};
  main.replaceChildren();
  renderAuth();
  if (!apiKey()) {
    main.append(keyForm());
    return;
  }
  const hash = location.hash || "#/jobs";
  for (const [pattern, render, nav] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const link of document.querySelectorAll("[data-nav]"))
      link.classList.toggle("active", link.dataset.nav === nav);
    let args;
    try {
      args = match.slice(1).map(decodeURIComponent);
    } catch {
      // A hand-edited address with a broken %-escape names nothing: say so rather than leave the page blank.
      main.append(el("p", { class: "alert error", id: "bad-address" }, `No page at ${hash}.`));
      return;
    }
    cleanup = render(main, ...args) || (() => {});
    return;
  }
  location.hash = "#/jobs";
}

function renderAuth() {
  auth.replaceChildren();
  const key = apiKey();
  if (!key) return;
  auth.append(
    el("span", { class: "muted", title: "kept in this tab's sessionStorage" }, "key ····", key.slice(-4)),
    el(
      "button",
      {
        class: "link",
        id: "sign-out",
        onclick: () => {
          setApiKey(null);
          route();
        },
      },
      "Forget key",
    ),
  );
}

function keyForm(message) {
  const input = el("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    placeholder: "API key",
    size: 44,
    required: true,
  });
  const note = el("p", { class: "alert error", id: "key-error", hidden: !message }, message || "");
  const form = el(
    "form",
    { class: "card narrow", id: "key-form" },
    el("h1", {}, "Sign in"),
    el(
      "p",
      {},
      "Paste an API key of your tenant. It is kept in this browser tab only (sessionStorage) and sent as ",
      el("code", {}, "Authorization: Bearer"),
      "; `align serve` writes the key it creates to ",
      el("code", {}, ".align/api_key"),
      ".",
    ),
    el("div", { class: "row" }, input, el("button", { type: "submit", id: "use-key", class: "primary" }, "Use key")),
    note,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    try {
      await api("/jobs?limit=1");
      route();
    } catch (error) {
      setApiKey(null);
      note.hidden = false;
      note.textContent = error.status === 401 ? `The service refused this key: ${error.detail}` : error.message;
    }
  });
  return form;
}

window.addEventListener("align:unauthorized", (event) => {
  setApiKey(null);
  cleanup();
  cleanup = () => {};
  main.replaceChildren(keyForm(`The service refused the key: ${event.detail}`));
  renderAuth();
});
window.addEventListener("hashchange", route);
route();
