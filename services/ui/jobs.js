// The jobs list: state, stages, age and owner tenant, filtered by state on the server and by text here.

import { api } from "./api.js";
import { age, badge, el, errorBox, lastActivity } from "./util.js";

const STATES = ["", "queued", "running", "succeeded", "failed", "failed_gate", "cancelled"];
const REFRESH_MS = 5000;

function stageChips(job) {
  return el(
    "div",
    { class: "chips" },
    job.stages.map((stage) => {
      const step = stage.progress.step ?? 0;
      const total = stage.progress.total_steps;
      const progress = stage.state === "running" && total ? ` ${step}/${total}` : "";
      return el(
        "span",
        { class: `chip state-${stage.state}`, title: `${stage.name}: ${stage.state}, attempt ${stage.attempt}` },
        stage.name,
        progress,
      );
    }),
  );
}

function jobRow(job) {
  const href = `#/jobs/${encodeURIComponent(job.id)}`;
  return el(
    "tr",
    { dataset: { jobId: job.id, state: job.status } },
    el("td", {}, el("a", { href, class: "job-link" }, job.name), el("div", { class: "mono muted small" }, job.id)),
    el("td", {}, badge(job.status)),
    el("td", {}, stageChips(job)),
    el("td", {}, job.tenant),
    el("td", { title: job.created_at }, age(job.created_at)),
    el("td", { title: lastActivity(job) }, age(lastActivity(job))),
  );
}

export function renderJobs(main) {
  const params = new URLSearchParams(sessionStorage.getItem("align.jobFilter") || "");
  const stateSelect = el(
    "select",
    { id: "state-filter" },
    STATES.map((s) => el("option", { value: s, selected: s === (params.get("state") || "") }, s || "all states")),
  );
  const textFilter = el("input", {
    id: "text-filter",
    type: "search",
    placeholder: "filter by name, id, stage or tenant",
    value: params.get("q") || "",
  });
  const body = el("tbody");
  const status = el("p", { class: "muted small" });
  const more = el("button", { id: "load-more", hidden: true }, "Load more");
  const table = el(
    "table",
    { class: "grid", id: "jobs-table" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ["Job", "State", "Stages", "Tenant", "Age", "Updated"].map((h) => el("th", {}, h)),
      ),
    ),
    body,
  );
  main.append(
    el(
      "div",
      { class: "page-head" },
      el("h1", {}, "Jobs"),
      el("a", { href: "#/submit", class: "button primary" }, "New job"),
    ),
    el("div", { class: "card" }, el("div", { class: "toolbar" }, stateSelect, textFilter, status), table, more),
  );

  let jobs = [];
  let cursor = null;
  let timer = null;

  const matches = (job) => {
    const text = textFilter.value.trim().toLowerCase();
    if (!text) return true;
    const haystack = [job.name, job.id, job.tenant, ...job.stages.map((s) => `${s.name} ${s.type}`)].join(" ");
    return haystack.toLowerCase().includes(text);
  };

  const draw = () => {
    const shown = jobs.filter(matches);
    body.replaceChildren(...shown.map(jobRow));
    if (!shown.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No jobs match.")));
    status.textContent = `${shown.length} of ${jobs.length} loaded · refreshed ${new Date().toLocaleTimeString()}`;
    more.hidden = !cursor;
  };

  const load = async (append = false) => {
    const query = new URLSearchParams({ limit: "50" });
    if (stateSelect.value) query.set("state", stateSelect.value);
    if (append && cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/jobs?${query}`);
      jobs = append ? [...jobs, ...page.data] : page.data;
      cursor = page.next_cursor;
      draw();
    } catch (error) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 6 }, errorBox(error))));
    }
  };

  const remember = () =>
    sessionStorage.setItem(
      "align.jobFilter",
      new URLSearchParams({ state: stateSelect.value, q: textFilter.value }).toString(),
    );
  stateSelect.addEventListener("change", () => {
    remember();
    load();
  });
  textFilter.addEventListener("input", () => {
    remember();
    draw();
  });
  more.addEventListener("click", () => load(true));

  const refresh = async () => {
    if (!cursor || jobs.length <= 50) await load();
    timer = setTimeout(refresh, REFRESH_MS);
  };
  refresh();
  return () => clearTimeout(timer);
}
