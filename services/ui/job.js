// One job: header with cancel and download, the stage timeline with attempts and retry reasons, live metric
// curves from the job's event stream, sampled completions, artifacts with their lineage, and the event log.

import { api, download, streamEvents } from "./api.js";
import { MetricCharts } from "./charts.js";
import { lineageGraph, withAncestors } from "./lineage.js";
import { renderTimeline } from "./timeline.js";
import { TERMINAL, age, badge, clock, el, errorBox, lastActivity } from "./util.js";

const RECONNECT_MS = 2000;
const MAX_RECONNECT_MS = 30_000;
const REFRESH_MS = 3000;
const RETRY_REFRESH_MS = 10_000;
const MAX_LOG = 300;
const MAX_SAMPLES = 40;

export function renderJob(main, jobId) {
  const controller = new AbortController();
  const path = `/jobs/${encodeURIComponent(jobId)}`;
  const head = el("div", { class: "page-head" }, el("h1", {}, "Job ", el("span", { class: "mono" }, jobId)));
  const stagesCard = el("section", { class: "card", id: "stages" });
  const chartGrid = el("div", { class: "chart-grid", id: "charts" });
  const streamState = el("span", { class: "muted small", id: "stream-state" }, "connecting…");
  const samplesBody = el("div", { id: "samples" });
  const artifactsCard = el("section", { class: "card", id: "artifacts" });
  const log = el("ol", { class: "log", id: "event-log" });
  // A failed download says why here rather than nowhere.
  const notice = el("div", { id: "download-error" });
  const problem = el("div", { id: "refresh-error" }); // the last failed read of the job, until one succeeds
  const save = (url, filename) =>
    download(url, filename).then(
      () => notice.replaceChildren(),
      (error) => notice.replaceChildren(errorBox(error)),
    );
  main.append(
    head,
    problem,
    notice,
    stagesCard,
    el(
      "section",
      { class: "card" },
      el("div", { class: "card-head" }, el("h2", {}, "Metrics"), streamState),
      chartGrid,
    ),
    el("section", { class: "card" }, el("h2", {}, "Sampled completions"), samplesBody),
    artifactsCard,
    el("section", { class: "card" }, el("h2", {}, "Events"), log),
  );

  const charts = new MetricCharts(chartGrid);
  const stateEvents = [];
  const samples = [];
  let job = null;
  let lastEventId = 0;
  let refreshTimer = null;
  let artifactKey = null;

  const stageName = (stageRunId) => job?.stages.find((s) => s.id === stageRunId)?.name ?? "job";

  const drawHead = () => {
    const cancel = el(
      "button",
      {
        id: "cancel-job",
        class: "danger",
        disabled: TERMINAL.has(job.status),
        onclick: async () => {
          if (!confirm(`Cancel job ${job.name}? Running stages are stopped and later stages never start.`)) return;
          try {
            job = await api(`${path}/cancel`, { method: "POST" });
            drawAll();
          } catch (error) {
            head.append(errorBox(error));
          }
        },
      },
      "Cancel job",
    );
    const spec = el(
      "button",
      { id: "download-spec", onclick: () => save(path, `${job.id}.json`) },
      "Download job JSON",
    );
    head.replaceChildren(
      el(
        "div",
        {},
        el("div", { class: "crumbs" }, el("a", { href: "#/jobs" }, "Jobs"), " / ", job.name),
        el("h1", {}, job.name, " ", el("span", { id: "job-state" }, badge(job.status))),
        el(
          "div",
          { class: "meta" },
          el("span", { class: "mono" }, job.id),
          el("span", {}, `tenant ${job.tenant}`),
          el("span", { title: clock(job.created_at) }, `created ${age(job.created_at)}`),
          el("span", { title: clock(lastActivity(job)) }, `updated ${age(lastActivity(job))}`),
          el("span", { class: "mono" }, job.spec_hash.slice(0, 19)),
        ),
      ),
      el("div", { class: "actions" }, spec, cancel),
    );
  };

  const drawArtifacts = async () => {
    const ids = job.stages.map((s) => s.artifact_id).filter(Boolean);
    if (ids.join() === artifactKey) return;
    artifactKey = ids.join();
    const artifacts = await withAncestors(ids);
    const rows = job.stages
      .filter((s) => s.artifact_id)
      .map((stage) => {
        const artifact = artifacts.get(stage.artifact_id);
        return el(
          "tr",
          { dataset: { artifactId: stage.artifact_id } },
          el("td", {}, stage.name),
          el(
            "td",
            {},
            el(
              "a",
              { href: `#/artifacts/${encodeURIComponent(stage.artifact_id)}`, class: "mono artifact-link" },
              stage.artifact_id,
            ),
          ),
          el("td", {}, artifact ? `${artifact.lineage} v${artifact.version}` : "—"),
          el("td", {}, artifact?.kind ?? "—"),
          el(
            "td",
            {},
            artifact?.parents.length ? artifact.parents.map((p) => el("div", { class: "mono small" }, p)) : "—",
          ),
          el(
            "td",
            {},
            el(
              "button",
              {
                class: "small",
                onclick: () =>
                  save(
                    `/artifacts/${encodeURIComponent(stage.artifact_id)}/files/manifest.json`,
                    `${stage.artifact_id}-manifest.json`,
                  ),
              },
              "manifest.json",
            ),
          ),
        );
      });
    artifactsCard.replaceChildren(el("h2", {}, "Artifacts"));
    if (!rows.length) {
      artifactsCard.append(el("p", { class: "muted" }, "No artifact yet: each stage publishes one when it succeeds."));
      return;
    }
    artifactsCard.append(
      el(
        "table",
        { class: "grid" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ["Stage", "Artifact", "Lineage", "Kind", "Parents", "Download"].map((h) => el("th", {}, h)),
          ),
        ),
        el("tbody", {}, rows),
      ),
      el("h3", {}, "Lineage"),
      lineageGraph(artifacts),
    );
  };

  const drawSamples = () => {
    if (!samples.length) {
      const online = job?.stages.some((s) => ["ppo", "grpo", "rloo"].includes(s.type));
      samplesBody.replaceChildren(
        el(
          "p",
          { class: "muted" },
          online
            ? "No completions sampled yet: online stages report some at their logged steps."
            : "This job has no online stage (PPO, GRPO, RLOO); only those sample completions.",
        ),
      );
      return;
    }
    samplesBody.replaceChildren(
      el(
        "table",
        { class: "grid samples" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ["Stage", "Step", "Prompt", "Completion", "Score"].map((h) => el("th", {}, h)),
          ),
        ),
        el(
          "tbody",
          {},
          samples
            .slice(-MAX_SAMPLES)
            .reverse()
            .map((s) =>
              el(
                "tr",
                {},
                el("td", {}, s.stage),
                el("td", {}, s.step),
                el("td", { class: "text" }, s.prompt),
                el("td", { class: "text" }, s.completion),
                el("td", {}, typeof s.score === "number" ? s.score.toFixed(3) : "—"),
              ),
            ),
        ),
      ),
    );
  };

  const drawAll = () => {
    drawHead();
    renderTimeline(stagesCard, job, stateEvents);
    drawSamples();
    drawArtifacts().catch((error) => artifactsCard.append(errorBox(error)));
  };

  let started = false;
  const refresh = async () => {
    clearTimeout(refreshTimer);
    try {
      job = await api(path, { signal: controller.signal });
    } catch (error) {
      if (controller.signal.aborted) return;
      problem.replaceChildren(errorBox(error));
      // A missing job stays missing; anything else (the service restarting, a proxy's 502) is read again.
      if (error.status !== 404 && error.status !== 401) refreshTimer = setTimeout(refresh, RETRY_REFRESH_MS);
      return;
    }
    problem.replaceChildren();
    drawAll();
    if (!started) {
      started = true;
      start();
    }
    // Progress (steps) is not an event: re-read the job while it runs.
    if (!TERMINAL.has(job.status)) refreshTimer = setTimeout(refresh, REFRESH_MS);
  };

  const onEvent = (event) => {
    const data = event.data;
    if (event.id) lastEventId = Math.max(lastEventId, event.id);
    const stage = stageName(data.stage_run_id);
    if (event.type === "metrics") {
      charts.add(stage, data.payload);
      streamState.dataset.metricsEvents = String(Number(streamState.dataset.metricsEvents || 0) + 1);
    } else if (event.type === "samples") {
      for (const s of data.payload.samples || []) samples.push({ stage, ...s });
      drawSamples();
    } else if (event.type === "state") {
      stateEvents.push(data);
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(refresh, 300); // one read of the job for a burst of transitions
    }
    if (event.type === "state" || event.type === "message") {
      const { from, to, attempt, error_code: code, error_message: message } = data.payload;
      const text =
        event.type === "state"
          ? `${stage}: ${from ?? "created"} → ${to} (attempt ${attempt ?? data.attempt})` +
            (message ? `: ${code} ${message}` : "")
          : `${stage}: ${data.payload.text}`;
      log.prepend(el("li", { class: `level-${data.level}` }, el("time", {}, clock(data.time)), el("span", {}, text)));
      while (log.children.length > MAX_LOG) log.lastChild.remove();
    }
  };

  const follow = async () => {
    let delay = RECONNECT_MS;
    while (!controller.signal.aborted) {
      try {
        streamState.textContent = "live";
        streamState.className = "live small";
        for await (const event of streamEvents(jobId, { after: lastEventId, signal: controller.signal })) {
          delay = RECONNECT_MS; // the stream works: a later drop is retried soon
          if (event.type === "end") {
            streamState.textContent = "job ended: stream closed";
            streamState.className = "muted small";
            await refresh();
            return;
          }
          onEvent(event);
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error.status === 404 || error.status === 401) return;
      }
      // A stream that keeps failing is tried less and less often, up to every MAX_RECONNECT_MS.
      streamState.textContent = `reconnecting in ${Math.round(delay / 1000)}s…`;
      streamState.className = "warn small";
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, MAX_RECONNECT_MS);
    }
  };

  // Once the job has been read: its metrics so far, then its live events.
  const start = async () => {
    try {
      for (const stage of await api(`${path}/metrics`, { signal: controller.signal })) {
        for (const record of stage.records) charts.add(stage.name, record);
      }
    } catch (error) {
      if (!controller.signal.aborted) chartGrid.before(errorBox(error));
    }
    follow();
  };

  refresh();

  return () => {
    controller.abort();
    clearTimeout(refreshTimer);
    charts.destroy();
  };
}
