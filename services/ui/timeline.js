// The stage timeline: one row per stage with its state, attempts and progress, and a bar per attempt on a
// time axis shared by the whole job. Attempts and retry reasons come from the job's `state` events.

import { badge, clock, duration, el } from "./util.js";

// [{attempt, start, end, outcome, error}] of one stage run, from its state transitions in event order.
export function attemptsOf(stageRunId, stateEvents) {
  const attempts = [];
  for (const event of stateEvents.filter((e) => e.stage_run_id === stageRunId).sort((a, b) => a.id - b.id)) {
    const { from, to } = event.payload;
    const number = event.payload.attempt ?? event.attempt;
    if (to === "running")
      attempts.push({ attempt: number, start: Date.parse(event.time), end: null, outcome: "running" });
    else if (from === "running" && attempts.length) {
      const current = attempts[attempts.length - 1];
      current.end = Date.parse(event.time);
      current.outcome = to;
      if (event.payload.error_code || event.payload.error_message) {
        current.error = `${event.payload.error_code || "error"}: ${event.payload.error_message || ""}`;
      }
    }
  }
  return attempts;
}

function progressBar(stage) {
  const step = stage.progress.step ?? 0;
  const total = stage.progress.total_steps;
  const done = stage.state === "succeeded" ? 1 : total ? Math.min(step / total, 1) : 0;
  return el(
    "div",
    { class: "progress", title: total ? `step ${step} of ${total}` : "no steps reported" },
    el("div", { class: `fill state-${stage.state}`, style: `width: ${(done * 100).toFixed(1)}%` }),
    el("span", {}, total ? `${step}/${total}` : stage.state === "succeeded" ? "done" : "—"),
  );
}

export function renderTimeline(card, job, stateEvents) {
  const rows = job.stages.map((stage) => ({ stage, attempts: attemptsOf(stage.id, stateEvents) }));
  const start = Date.parse(job.created_at);
  const ends = rows.flatMap(({ stage, attempts }) => [
    ...attempts.map((a) => a.end ?? Date.now()),
    stage.finished_at ? Date.parse(stage.finished_at) : start,
  ]);
  const end = Math.max(start + 1000, ...ends);
  const span = end - start;
  const at = (time) => `${(((time - start) / span) * 100).toFixed(2)}%`;
  const width = (from, to) => `${Math.max(((to - from) / span) * 100, 0.6).toFixed(2)}%`;

  const table = el(
    "table",
    { class: "grid timeline" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        [
          "#",
          "Stage",
          "State",
          "Attempts",
          "Progress",
          "Started",
          "Ran",
          el("span", {}, "Timeline ", el("span", { class: "muted small" }, `(${duration(span / 1000)} since submit)`)),
        ].map((h) => el("th", {}, h)),
      ),
    ),
    el(
      "tbody",
      {},
      rows.map(({ stage, attempts }) => {
        const ran = stage.started_at
          ? ((stage.finished_at ? Date.parse(stage.finished_at) : Date.now()) - Date.parse(stage.started_at)) / 1000
          : null;
        const bars = attempts.map((a) =>
          el(
            "div",
            {
              class: `bar state-${a.outcome}`,
              style: `left: ${at(a.start)}; width: ${width(a.start, a.end ?? Date.now())}`,
              title:
                `attempt ${a.attempt}: ${a.outcome}, ${duration(((a.end ?? Date.now()) - a.start) / 1000)}` +
                (a.error ? `\n${a.error}` : ""),
            },
            `#${a.attempt}`,
          ),
        );
        const reasons = attempts
          .filter((a) => a.error)
          .map((a) =>
            el(
              "div",
              { class: `reason state-${a.outcome}` },
              el("strong", {}, `attempt ${a.attempt} ${a.outcome}: `),
              a.error,
            ),
          );
        if (stage.error && !attempts.some((a) => a.error)) {
          reasons.push(
            el(
              "div",
              { class: "reason state-failed" },
              el("strong", {}, `${stage.error.code || "error"}: `),
              stage.error.message || "",
              stage.error.field ? el("span", { class: "muted" }, ` (field ${stage.error.field})`) : "",
            ),
          );
        }
        return [
          el(
            "tr",
            { dataset: { stage: stage.name, state: stage.state } },
            el("td", { class: "muted" }, stage.index),
            el(
              "td",
              {},
              el("strong", {}, stage.name),
              el("div", { class: "muted small" }, stage.type),
              stage.gate
                ? el(
                    "div",
                    { class: `gate small state-${stage.gate.passed ? "succeeded" : "failed"}` },
                    `gate ${stage.gate.passed ? "passed" : "failed"}: ${stage.gate.reason}`,
                  )
                : "",
              stage.queued_reason
                ? el("div", { class: "gate small state-queued" }, `waiting: ${stage.queued_reason}`)
                : "",
            ),
            el("td", {}, badge(stage.state)),
            el("td", { class: "attempts" }, `${stage.attempt} / ${stage.max_attempts}`),
            el(
              "td",
              {},
              progressBar(stage),
              stage.checkpoint_step
                ? el("div", { class: "muted small" }, `checkpoint at step ${stage.checkpoint_step}`)
                : "",
            ),
            el("td", { class: "small" }, clock(stage.started_at)),
            el("td", {}, duration(ran)),
            el("td", { class: "track-cell" }, el("div", { class: "track" }, bars)),
          ),
          reasons.length ? el("tr", { class: "reasons" }, el("td"), el("td", { colspan: 7 }, reasons)) : null,
        ];
      }),
    ),
  );
  card.replaceChildren(el("h2", {}, "Stages"), table);
}
