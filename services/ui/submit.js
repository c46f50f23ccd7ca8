// The submit page: a YAML spec checked as it is typed by POST /jobs/validate, which runs every check of
// POST /jobs, so the messages shown are the API's own 422 messages.

import { ApiError, api } from "./api.js";
import { YAML11_SCHEMA, load } from "./vendor/js-yaml/js-yaml.esm.min.mjs";
import { el, errorBox } from "./util.js";

const CHECK_DELAY_MS = 400;
const TEMPLATE = `# A job spec (docs/spec.md). Paths are read by the service: use builtin: data and models,
# or locations inside its ALIGN_DATA_ROOTS / ALIGN_MODEL_ROOTS.
name: tiny-sft-dpo
base_model: builtin:tiny
adapter: {type: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
deepspeed: {zero_stage: 0, precision: auto}
resources: {num_workers: 1, cpus_per_worker: 2}
stages:
  - type: sft
    data: {path: "builtin:parity/sft", eval_path: "builtin:parity/eval"}
    epochs: 2
    lr: 1.0e-3
    batch_size: 16
    max_length: 64
  - type: dpo
    data: {path: "builtin:parity/prefs", eval_path: "builtin:parity/prefs_eval"}
    beta: 0.1
    epochs: 2
    lr: 5.0e-4
    batch_size: 16
    max_length: 64
`;

// crypto.randomUUID needs a secure context; a service on plain http at a host name is not one.
const requestKey = () =>
  [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

export function renderSubmit(main) {
  const editor = el("textarea", { id: "spec-editor", spellcheck: "false", rows: 28, class: "mono" });
  editor.value = sessionStorage.getItem("align.draftSpec") || TEMPLATE;
  const verdict = el("div", { id: "spec-verdict", class: "verdict" });
  const submit = el("button", { id: "submit-job", class: "primary", disabled: true }, "Submit job");
  main.append(
    el(
      "div",
      { class: "page-head" },
      el(
        "div",
        {},
        el("h1", {}, "Submit a job"),
        el(
          "p",
          { class: "muted" },
          "The spec is checked by the service as you type: the same checks and messages as ",
          el("code", {}, "POST /jobs"),
          ", without queuing anything.",
        ),
      ),
      el("div", { class: "actions" }, submit),
    ),
    el(
      "div",
      { class: "submit-layout" },
      el("section", { class: "card" }, editor),
      el("section", { class: "card" }, el("h2", {}, "Check"), verdict),
    ),
  );

  let timer = null;
  let generation = 0;
  let spec = null;

  const show = (kind, ...children) => {
    verdict.className = `verdict ${kind}`;
    verdict.dataset.result = kind;
    verdict.replaceChildren(...children);
  };

  const check = async () => {
    const mine = ++generation;
    spec = null;
    submit.disabled = true;
    sessionStorage.setItem("align.draftSpec", editor.value);
    let body;
    try {
      // YAML 1.1, as PyYAML reads it for `align submit` (so `1e-3` stays a string there and here).
      body = load(editor.value, { schema: YAML11_SCHEMA });
    } catch (error) {
      show("invalid", el("p", {}, el("strong", {}, "Not valid YAML: "), error.message));
      return;
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      show("invalid", el("p", {}, "The spec must be a YAML mapping (name, base_model, stages, ...)."));
      return;
    }
    show("checking", el("p", { class: "muted" }, "Checking…"));
    try {
      const result = await api("/jobs/validate", { method: "POST", body });
      if (mine !== generation) return;
      spec = body;
      submit.disabled = false;
      show(
        "valid",
        el(
          "p",
          {},
          el("strong", {}, "✓ Valid. "),
          `${result.spec.stages.length} stage(s): ${result.spec.stages.map((s) => s.type).join(" → ")}`,
        ),
        el("p", { class: "muted small mono" }, result.spec_hash),
      );
    } catch (error) {
      if (mine !== generation) return;
      const heading =
        error instanceof ApiError && error.status === 422
          ? el("p", {}, el("strong", {}, `The API would refuse this spec (${error.fields.length} problem(s)):`))
          : null;
      show("invalid", heading, errorBox(error));
    }
  };

  editor.addEventListener("input", () => {
    // What passed the last check is no longer what the editor holds: Submit waits for the next check.
    // A check still in flight answers for the old text, so it is dropped.
    generation += 1;
    spec = null;
    submit.disabled = true;
    clearTimeout(timer);
    timer = setTimeout(check, CHECK_DELAY_MS);
  });
  editor.addEventListener("keydown", (event) => {
    if (event.key !== "Tab") return;
    event.preventDefault();
    editor.setRangeText("  ", editor.selectionStart, editor.selectionEnd, "end");
    editor.dispatchEvent(new Event("input")); // setRangeText fires none: the edit is checked as typing is
  });
  submit.addEventListener("click", async () => {
    if (!spec) return;
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", body: spec, extraHeaders: { "Idempotency-Key": requestKey() } });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      show("invalid", errorBox(error));
    }
  });
  check();
  return () => clearTimeout(timer);
}
