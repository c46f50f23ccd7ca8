// One artifact: what produced it, its parents and lineage graph, its metrics and its files (downloadable).

import { api, download } from "./api.js";
import { lineageGraph, withAncestors } from "./lineage.js";
import { bytes, clock, el, errorBox, number } from "./util.js";

export function renderArtifact(main, artifactId) {
  const path = `/artifacts/${encodeURIComponent(artifactId)}`;
  // A failed download (a file the store no longer holds, say) says why here rather than nowhere.
  const notice = el("div", { id: "download-error" });
  const save = (url, filename) =>
    download(url, filename).then(
      () => notice.replaceChildren(),
      (error) => notice.replaceChildren(errorBox(error)),
    );
  main.append(el("p", { class: "muted" }, "Loading artifact…"));
  (async () => {
    let artifact;
    try {
      artifact = await api(path);
    } catch (error) {
      main.replaceChildren(errorBox(error));
      return;
    }
    const artifacts = await withAncestors([artifactId]);
    const parents = artifact.parents.map((id) => {
      const parent = artifacts.get(id);
      return el(
        "li",
        { class: "parent", dataset: { artifactId: id } },
        el("a", { href: `#/artifacts/${encodeURIComponent(id)}`, class: "mono" }, id),
        parent ? ` · ${parent.lineage} v${parent.version} (${parent.kind})` : " · not readable",
      );
    });
    const files = Object.entries(artifact.manifest?.files || {}).sort(([a], [b]) => a.localeCompare(b));
    const name = (file) => `${artifact.lineage}-v${artifact.version}-${file.replaceAll("/", "_")}`;
    main.replaceChildren(
      el(
        "div",
        { class: "page-head" },
        el(
          "div",
          {},
          el(
            "div",
            { class: "crumbs" },
            el("a", { href: "#/jobs" }, "Jobs"),
            " / ",
            artifact.job_id ? el("a", { href: `#/jobs/${encodeURIComponent(artifact.job_id)}` }, artifact.job_id) : "—",
            " / artifact",
          ),
          el(
            "h1",
            { id: "artifact-title" },
            `${artifact.lineage} v${artifact.version}`,
            " ",
            el("span", { class: "badge kind" }, artifact.kind),
          ),
          el(
            "div",
            { class: "meta" },
            el("span", { class: "mono" }, artifact.id),
            el("span", {}, clock(artifact.created_at)),
            el("span", { class: "mono" }, artifact.manifest_hash.slice(0, 23)),
          ),
        ),
        el(
          "div",
          { class: "actions" },
          el(
            "button",
            { id: "download-manifest", onclick: () => save(`${path}/files/manifest.json`, name("manifest.json")) },
            "Download manifest",
          ),
        ),
      ),
      notice,
      el(
        "div",
        { class: "two-col" },
        el(
          "section",
          { class: "card" },
          el("h2", {}, "Produced by"),
          el(
            "dl",
            { class: "facts" },
            el("dt", {}, "job"),
            el(
              "dd",
              {},
              artifact.job_id
                ? el("a", { href: `#/jobs/${encodeURIComponent(artifact.job_id)}`, class: "mono" }, artifact.job_id)
                : "—",
            ),
            el("dt", {}, "stage run"),
            el("dd", { class: "mono" }, artifact.stage_run_id ?? "—"),
            el("dt", {}, "attempt"),
            el("dd", {}, artifact.attempt ?? "—"),
            el("dt", {}, "uri"),
            el("dd", { class: "mono small" }, artifact.uri),
          ),
          el("h3", {}, "Parents"),
          parents.length
            ? el("ul", { id: "parents", class: "plain" }, parents)
            : el("p", { id: "parents", class: "muted" }, "None: trained from the base model."),
        ),
        el(
          "section",
          { class: "card" },
          el("h2", {}, "Metrics"),
          el(
            "table",
            { class: "grid compact", id: "metrics" },
            el(
              "tbody",
              {},
              Object.entries(artifact.metrics).map(([key, value]) =>
                el("tr", {}, el("th", {}, key), el("td", { class: "num" }, number(value))),
              ),
            ),
          ),
        ),
      ),
      el("section", { class: "card" }, el("h2", {}, "Lineage"), lineageGraph(artifacts, { current: artifactId })),
      el(
        "section",
        { class: "card" },
        el("h2", {}, "Files"),
        el(
          "table",
          { class: "grid", id: "files" },
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              ["Path", "Size", "sha256", ""].map((h) => el("th", {}, h)),
            ),
          ),
          el(
            "tbody",
            {},
            files.map(([file, info]) =>
              el(
                "tr",
                {},
                el("td", { class: "mono" }, file),
                el("td", { class: "num" }, bytes(info.size)),
                el("td", { class: "mono small", title: info.sha256 }, info.sha256.slice(0, 16)),
                el(
                  "td",
                  {},
                  el(
                    "button",
                    {
                      class: "small",
                      onclick: () =>
                        save(`${path}/files/${file.split("/").map(encodeURIComponent).join("/")}`, name(file)),
                    },
                    "Download",
                  ),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  })();
}
