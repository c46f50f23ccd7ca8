// Live metric curves drawn with uPlot (vendored from npm): one chart per group, one series per stage and key.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { el } from "./util.js";

export const GROUPS = [
  {
    id: "loss",
    title: "Loss",
    keys: (k) => ["loss", "eval_loss", "policy_loss", "value_loss"].includes(k),
    empty: "no loss reported yet",
  },
  {
    id: "reward",
    title: "Reward",
    keys: (k) => /^(eval_)?(reward_mean|rewards_margin|margin|rewards_accuracy)$/.test(k),
    empty: "no reward yet: DPO, reward-model and online stages report one",
  },
  {
    id: "kl",
    title: "KL",
    keys: (k) => k === "kl" || k === "eval_kl",
    empty: "no KL yet: PPO, GRPO and RLOO stages report it",
  },
  { id: "throughput", title: "Tokens/s", keys: (k) => k === "tokens_per_s", empty: "no throughput reported yet" },
  {
    id: "eval",
    title: "Eval metrics",
    keys: (k) => k.startsWith("eval_") && !/loss|reward|kl|margin/.test(k),
    empty: "no eval metrics yet: stages report them at their eval steps",
  },
];
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

export class MetricCharts {
  constructor(container) {
    this.container = container;
    this.series = new Map(); // "stage · key" -> Map(step -> value)
    this.charts = new Map(); // group id -> {plot, names, figure}
    this.pending = false;
    this.onResize = () => this.resize();
    window.addEventListener("resize", this.onResize);
    this.figures = new Map(
      GROUPS.map((group) => {
        const figure = el(
          "figure",
          { class: "chart", dataset: { chart: group.id, points: "0" } },
          el("figcaption", {}, group.title),
          el("div", { class: "plot" }, el("p", { class: "muted small empty-chart" }, group.empty)),
        );
        container.append(figure);
        return [group.id, figure];
      }),
    );
  }

  // One metrics record of a stage; a retried attempt's record for the same step replaces the older one.
  add(stage, record) {
    if (typeof record.step !== "number") return;
    for (const [key, value] of Object.entries(record)) {
      if (typeof value !== "number" || key === "step" || key === "attempt") continue;
      const name = `${stage} · ${key}`;
      if (!this.series.has(name)) this.series.set(name, new Map());
      this.series.get(name).set(record.step, value);
    }
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  draw() {
    for (const group of GROUPS) {
      const names = [...this.series.keys()].filter((name) => group.keys(name.split(" · ")[1])).sort();
      const figure = this.figures.get(group.id);
      const points = names.reduce((sum, name) => sum + this.series.get(name).size, 0);
      figure.dataset.points = String(points);
      figure.classList.toggle("has-data", points > 0);
      if (!names.length) continue;
      const steps = [...new Set(names.flatMap((name) => [...this.series.get(name).keys()]))].sort((a, b) => a - b);
      const data = [steps, ...names.map((name) => steps.map((step) => this.series.get(name).get(step) ?? null))];
      const current = this.charts.get(group.id);
      if (current && current.names.join("|") === names.join("|")) {
        current.plot.setData(data);
        continue;
      }
      current?.plot.destroy();
      const target = figure.querySelector(".plot");
      target.replaceChildren();
      const plot = new uPlot(
        {
          width: this.width(),
          height: 200,
          scales: { x: { time: false } },
          axes: [{ label: "step", size: 36 }, { size: 56 }],
          series: [
            { label: "step" },
            ...names.map((name, i) => ({
              label: name,
              stroke: PALETTE[i % PALETTE.length],
              width: 1.6,
              spanGaps: true,
              points: { show: steps.length < 60, size: 4 },
            })),
          ],
          legend: { live: true },
        },
        data,
        target,
      );
      this.charts.set(group.id, { plot, names, figure });
    }
  }

  width() {
    return Math.max(280, (this.figures.values().next().value?.clientWidth || 420) - 24);
  }

  resize() {
    for (const { plot } of this.charts.values()) plot.setSize({ width: this.width(), height: 200 });
  }

  destroy() {
    window.removeEventListener("resize", this.onResize);
    for (const { plot } of this.charts.values()) plot.destroy();
  }
}
