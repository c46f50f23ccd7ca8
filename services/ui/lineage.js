// The lineage graph of artifacts: each artifact with its parents (GET /artifacts/{id}), drawn as an SVG
// with one column per generation, parents on the left.

import { api } from "./api.js";
import { el } from "./util.js";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 210;
const NODE_H = 50;
const GAP_X = 70;
const GAP_Y = 18;
const MAX_ARTIFACTS = 60;

// The artifacts with these ids and all their ancestors, as a Map id -> artifact (null when unreadable).
export async function withAncestors(ids, known = new Map()) {
  const queue = [...ids];
  while (queue.length && known.size < MAX_ARTIFACTS) {
    const id = queue.shift();
    if (known.has(id)) continue;
    try {
      const artifact = await api(`/artifacts/${encodeURIComponent(id)}`);
      known.set(id, artifact);
      queue.push(...artifact.parents);
    } catch {
      known.set(id, null);
    }
  }
  return known;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

export function lineageGraph(artifacts, { current } = {}) {
  const depth = new Map();
  const depthOf = (id, seen = new Set()) => {
    if (depth.has(id)) return depth.get(id);
    const artifact = artifacts.get(id);
    const parents = (artifact?.parents || []).filter((p) => artifacts.has(p) && !seen.has(p));
    seen.add(id);
    const value = parents.length ? 1 + Math.max(...parents.map((p) => depthOf(p, seen))) : 0;
    depth.set(id, value);
    return value;
  };
  const columns = [];
  for (const id of artifacts.keys()) (columns[depthOf(id)] ||= []).push(id);
  const position = new Map();
  columns.forEach((ids, column) =>
    ids.forEach((id, row) =>
      position.set(id, {
        x: 8 + column * (NODE_W + GAP_X),
        y: 8 + row * (NODE_H + GAP_Y),
      }),
    ),
  );
  const width = 16 + columns.length * NODE_W + (columns.length - 1) * GAP_X;
  const height = 16 + Math.max(...columns.map((c) => c.length)) * (NODE_H + GAP_Y) - GAP_Y;
  const root = svg(
    "svg",
    { class: "lineage", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" },
    svg(
      "defs",
      {},
      svg(
        "marker",
        {
          id: "arrow",
          viewBox: "0 0 10 10",
          refX: 10,
          refY: 5,
          markerWidth: 7,
          markerHeight: 7,
          orient: "auto-start-reverse",
        },
        svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#94a3b8" }),
      ),
    ),
  );
  for (const [id, artifact] of artifacts) {
    for (const parent of artifact?.parents || []) {
      if (!position.has(parent)) continue;
      const from = position.get(parent);
      const to = position.get(id);
      const [x1, y1, x2, y2] = [from.x + NODE_W, from.y + NODE_H / 2, to.x, to.y + NODE_H / 2];
      root.append(
        svg("path", {
          class: "edge",
          d: `M ${x1} ${y1} C ${x1 + GAP_X / 2} ${y1}, ${x2 - GAP_X / 2} ${y2}, ${x2} ${y2}`,
          "marker-end": "url(#arrow)",
        }),
      );
    }
  }
  for (const [id, artifact] of artifacts) {
    const { x, y } = position.get(id);
    const title = artifact ? `${artifact.lineage} v${artifact.version}` : "(not readable)";
    const node = svg(
      "a",
      { href: `#/artifacts/${encodeURIComponent(id)}`, class: "node-link", "data-artifact-id": id },
      svg("rect", {
        x,
        y,
        width: NODE_W,
        height: NODE_H,
        rx: 6,
        class: `node kind-${artifact?.kind || "unknown"}${id === current ? " current" : ""}`,
      }),
      svg("text", { x: x + 10, y: y + 20, class: "node-title" }, title),
      svg("text", { x: x + 10, y: y + 38, class: "node-sub" }, `${artifact?.kind || "?"} · ${id.slice(0, 18)}`),
    );
    root.append(node);
  }
  return el("div", { class: "lineage-wrap" }, root);
}
