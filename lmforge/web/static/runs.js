/* The runs browser of `lmforge ui`: a single page with hash routes
 *   #/                      the runs under RUNS_DIR
 *   #/run/<path>            one run's report card
 *   #/compare/<p1>,<p2>...  several runs' curves on one plot and their config differences
 * (each path encodeURIComponent-ed). Everything shown comes from files in the run folders, so
 * it only ever reaches the page as textContent (or through LmMarkdown, which does the same).
 */
(function () {
  "use strict";

  const KEY = "lmforge-runs-key";
  const view = document.getElementById("view");
  const fmt = window.LmPlot.format;
  const CURVES = [
    { title: "loss", keys: ["loss", "val_loss"] },
    { title: "learning rate", keys: ["lr"] },
    { title: "throughput (tokens/s)", keys: ["tok_per_s"] },
  ];
  const IMAGE = /\.(png|jpe?g|gif|webp)$/i;
  const VERDICT = /acc|match|correct|pass/i;
  let current = 0; // the route being shown: answers for an older one are dropped

  class NeedKey extends Error {}

  // --- DOM ---------------------------------------------------------------------------------

  // h("a", {text, class, testid, href, ...}, ...children): properties are assigned, never parsed.
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k === "testid") node.dataset.testid = v;
      else if (k === "data") Object.assign(node.dataset, v);
      else if (k === "on") for (const [e, f] of Object.entries(v)) node.addEventListener(e, f);
      else node[k] = v;
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) node.append(c);
    }
    return node;
  }

  function show(...nodes) {
    view.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined));
  }

  function value(v) {
    return typeof v === "number" ? fmt(v) : v === null || v === undefined ? "—" : String(v);
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
  }

  function option(v) {
    return h("option", { value: v, text: v });
  }

  function configValue(v) {
    if (v === null || v === undefined) return "—";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  // The runs folder itself may be a run (`lmforge ui runs/demo`): its path is ".".
  function label(run) {
    return run.path === "." ? run.name : run.path;
  }

  function runHref(path) {
    return "#/run/" + encodeURIComponent(path);
  }

  function badge(text, kind, testid) {
    return h("span", { class: "badge" + (kind ? " badge-" + kind : ""), text, testid });
  }

  // `where` is the stage's folder within the run ("" for the run's own).
  function fileBadge(where, f) {
    const note = f.note ? ": " + f.note : "";
    return h("span", {
      class: "badge badge-" + f.state,
      text: `${where ? where + "/" : ""}${f.name} ${f.state}${note}`,
      testid: "file-state",
      data: { state: f.state, file: f.name },
    });
  }

  function collapsible(title, open, ...content) {
    return h("details", { open }, h("summary", { text: title }), ...content);
  }

  function table(head, rows, testid) {
    return h(
      "table",
      { class: "grid", testid },
      h("thead", {}, h("tr", {}, head.map((c) => h("th", { text: c })))),
      h("tbody", {}, rows),
    );
  }

  // --- API ---------------------------------------------------------------------------------

  async function api(path, params) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      for (const item of Array.isArray(v) ? v : [v]) url.searchParams.append(k, item);
    }
    const key = sessionStorage.getItem(KEY);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    const response = await fetch(url, { headers });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (response.status === 401) throw new NeedKey(body.error);
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // The server was started with --api-key: ask for it once per browser tab.
  function askKey(message) {
    const input = h("input", {
      type: "password",
      autocomplete: "off",
      placeholder: "API key",
      testid: "key-input",
    });
    const form = h(
      "form",
      {
        class: "key-form",
        testid: "key-form",
        on: {
          submit: (e) => {
            e.preventDefault();
            sessionStorage.setItem(KEY, input.value.trim());
            route();
          },
        },
      },
      h("p", { text: "This runs browser needs its API key." }),
      sessionStorage.getItem(KEY) ? h("p", { class: "error", text: message }) : null,
      input,
      h("button", { type: "submit", class: "primary", text: "Open" }),
    );
    show(form);
    input.focus();
  }

  function failed(error, where) {
    if (error instanceof NeedKey) return askKey(error.message);
    where.replaceChildren(h("p", { class: "error", testid: "error", text: error.message }));
  }

  // --- The list ----------------------------------------------------------------------------

  async function showList(token) {
    document.title = "lmforge runs";
    const data = await api("/api/runs");
    if (token !== current) return;
    const filter = h("input", {
      type: "search",
      placeholder: "filter by name, kind, stage, tag",
      testid: "filter",
    });
    const compare = h("button", {
      type: "button",
      class: "primary",
      text: "Compare selected",
      disabled: true,
      testid: "compare-button",
    });
    const rows = data.runs.map((run) => listRow(run));
    const selected = () => rows.filter((r) => r.querySelector("input").checked);
    for (const r of rows) {
      r.querySelector("input").addEventListener("change", () => {
        compare.disabled = selected().length < 2;
      });
    }
    compare.addEventListener("click", () => {
      const paths = selected().map((r) => encodeURIComponent(r.dataset.path));
      location.hash = "#/compare/" + paths.join(",");
    });
    filter.addEventListener("input", () => {
      const q = filter.value.trim().toLowerCase();
      for (const r of rows) r.hidden = q !== "" && !r.dataset.search.includes(q);
    });
    const head = ["", "run", "kind", "stages", "steps", "val_loss", "loss", "results", "modified"];
    show(
      h("h1", { text: `Runs in ${data.root}` }),
      h("div", { class: "toolbar" }, filter, compare),
      data.runs.length
        ? table(head, rows, "runs-table")
        : h("p", { class: "muted", testid: "no-runs", text: "No runs found in this folder." }),
    );
  }

  function listRow(run) {
    const numbers = new Map(run.headline);
    const rest = run.headline.filter(([k]) => k !== "val_loss" && k !== "loss");
    const problems = run.problems.length + (run.error ? 1 : 0);
    const search = [run.path, run.kind, ...run.stages.map((s) => s.name), ...run.tags];
    return h(
      "tr",
      { testid: "run-row", data: { path: run.path, search: search.join(" ").toLowerCase() } },
      h("td", {}, h("input", { type: "checkbox", testid: "run-select", title: "compare" })),
      h(
        "td",
        {},
        h("a", { href: runHref(run.path), text: label(run), testid: "run-link" }),
        run.tags.map((t) => badge(t, "tag")),
        problems ? badge(`${problems} problem${problems > 1 ? "s" : ""}`, "unreadable") : null,
      ),
      h("td", { text: run.kind || "—" }),
      h("td", {}, run.stages.map((s) => badge(s.name, "stage"))),
      h("td", { class: "num", text: run.steps ? run.steps.toLocaleString() : "—" }),
      h("td", { class: "num", text: value(numbers.get("val_loss")) }),
      h("td", { class: "num", text: value(numbers.get("loss")) }),
      h("td", { class: "results" }, rest.map(([k, v]) => h("div", { text: `${k} ${value(v)}` }))),
      h("td", { text: when(run.modified) }),
    );
  }

  // --- One run -----------------------------------------------------------------------------

  async function showRun(token, path) {
    const run = await api("/api/run", { path });
    if (token !== current) return;
    document.title = `lmforge runs: ${label(run)}`;
    const within = (s) =>
      s.path === run.path ? "" : run.path === "." ? s.path : s.path.slice(run.path.length + 1);
    const problems = run.stages.flatMap((s) =>
      s.files.filter((f) => f.state !== "ok").map((f) => fileBadge(within(s), f)),
    );
    const head = h(
      "header",
      { class: "run-head" },
      h("p", {}, h("a", { href: "#/", text: "← all runs" })),
      h("h1", { text: label(run), testid: "run-title" }),
      h(
        "p",
        { class: "muted" },
        `${run.kind || "run"} · ${run.status}`,
        run.steps ? ` · ${run.steps.toLocaleString()} steps` : "",
        ` · modified ${when(run.modified)}`,
        run.parent ? ` · started from ${run.parent}` : "",
      ),
      run.tags.map((t) => badge(t, "tag")),
      run.error ? h("p", { class: "error", testid: "run-error", text: run.error }) : null,
      problems.length ? h("div", { class: "problems", testid: "problems" }, problems) : null,
    );
    const headline = run.headline.length
      ? h(
          "dl",
          { class: "headline", testid: "headline" },
          run.headline.map(([k, v]) =>
            h("div", {}, h("dt", { text: k }), h("dd", { text: value(v) })),
          ),
        )
      : null;
    const report = run.stages.find((s) => s.report);
    const nav = h(
      "nav",
      { class: "stage-nav" },
      run.stages.map((s) => h("a", { href: "#", text: s.name, on: { click: jump(s.name) } })),
      report ? h("a", { href: "#", text: "report.md", on: { click: jump("report.md") } }) : null,
    );
    show(
      head,
      headline,
      nav,
      run.stages.map((s) => stageSection(s)),
      report ? reportSection(report) : null,
    );
  }

  // Stage links scroll instead of changing the hash (which is the route).
  function jump(name) {
    return (e) => {
      e.preventDefault();
      const sections = [...view.querySelectorAll("section.stage")];
      const target = sections.find((s) => s.dataset.stage === name);
      if (target) target.scrollIntoView({ behavior: "smooth" });
    };
  }

  function reportSection(stage) {
    const body = h("div", { class: "report-body", testid: "report" });
    const text = stage.report.text;
    if (window.LmMarkdown) {
      body.append(window.LmMarkdown.render(text, { resolve: (url) => fileUrl(stage.path, url) }));
      loadImages(body);
    } else {
      body.append(h("pre", { class: "wrap", text }));
    }
    if (stage.report.truncated) body.append(h("p", { class: "muted", text: "(cut at 1 MB)" }));
    const section = h("section", { class: "stage report", data: { stage: "report.md" } });
    section.append(collapsible("report.md", true, body));
    return section;
  }

  // A relative image of report.md is a file of the run, fetched through the API (the key is
  // sent as a header, which an <img src> cannot do); any other relative link leads nowhere
  // here, so it stays as its Markdown text.
  function fileUrl(stagePath, url) {
    if (!IMAGE.test(url.split(/[?#]/)[0])) return "about:blank";
    const joined = stagePath === "." ? url : `${stagePath}/${url}`;
    return "/api/file?path=" + encodeURIComponent(joined.replace(/^\.\//, ""));
  }

  function loadImages(body) {
    for (const link of body.querySelectorAll("a.md-image-link")) {
      const url = new URL(link.href);
      if (url.origin !== location.origin || url.pathname !== "/api/file") continue;
      const img = h("img", { alt: link.textContent, class: "report-image" });
      link.replaceWith(img);
      const key = sessionStorage.getItem(KEY);
      fetch(url, { headers: key ? { Authorization: "Bearer " + key } : {} })
        .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
        .then((blob) => {
          // The page allows data: images only (no blob:), so the bytes become a data URL.
          const reader = new FileReader();
          reader.onload = () => (img.src = reader.result);
          reader.readAsDataURL(blob);
        })
        .catch(() => img.replaceWith(h("span", { class: "muted", text: `[image ${img.alt}]` })));
    }
  }

  function stageSection(stage) {
    const section = h(
      "section",
      { class: "stage", testid: "stage", data: { stage: stage.name } },
      h(
        "h2",
        {},
        stage.name,
        h("span", { class: "muted", text: ` ${stage.kind} · ${stage.path}` }),
      ),
    );
    if (stage.metrics) {
      const loading = h("p", { class: "muted", text: "loading curves…" });
      const box = h("div", { class: "curves", testid: "curves" }, loading);
      section.append(box);
      loadCurves(stage, box);
    }
    if (stage.eval) section.append(evalSection(stage));
    else if (stage.samples) {
      // Generations of SFT and alignment: fetched when opened, to keep the page short.
      const box = collapsible("samples", false);
      box.addEventListener("toggle", () => {
        if (box.open && box.children.length === 1) box.append(samplesViewer(stage.path, null));
      });
      section.append(box);
    }
    if (stage.data) section.append(dataSection(stage.data));
    for (const s of stage.summary || []) {
      const rows = s.values.map(([k, v]) =>
        h("tr", {}, h("td", { text: k }), h("td", { text: value(v) })),
      );
      section.append(collapsible(`numbers: ${s.name}`, false, table(["key", "value"], rows)));
    }
    for (const c of stage.configs || []) {
      const text = c.text + (c.truncated ? "\n… (cut at 1 MB)" : "");
      const pre = h("pre", { class: "config-text", text });
      const title = h("summary", { text: `config: ${c.name}` });
      section.append(h("details", { testid: "config" }, title, pre));
    }
    return section;
  }

  // --- Curves ------------------------------------------------------------------------------

  // A step -> tokens map from the `tokens` curve, for plotting against tokens seen.
  function tokenAxis(tokens) {
    if (!tokens || tokens.x.length < 2) return null;
    const xs = tokens.x;
    const ys = tokens.y;
    return (step) => {
      let lo = 0;
      let hi = xs.length - 1;
      if (step <= xs[0]) return ys[0] * (step / xs[0]);
      if (step >= xs[hi]) {
        const slope = (ys[hi] - ys[hi - 1]) / (xs[hi] - xs[hi - 1] || 1);
        return ys[hi] + slope * (step - xs[hi]);
      }
      while (hi - lo > 1) {
        const mid = (lo + hi) >> 1;
        if (xs[mid] <= step) lo = mid;
        else hi = mid;
      }
      return ys[lo] + ((ys[hi] - ys[lo]) * (step - xs[lo])) / (xs[hi] - xs[lo] || 1);
    };
  }

  function curve(name, s, toTokens, color) {
    const x = { step: s.x };
    if (toTokens) x.tokens = s.x.map(toTokens);
    return { name, y: s.y, x, color };
  }

  async function loadCurves(stage, box) {
    let m;
    try {
      m = await api("/api/metrics", { path: stage.path });
    } catch (e) {
      return failed(e, box);
    }
    box.replaceChildren();
    const toTokens = tokenAxis(m.series.tokens);
    const modes = toTokens ? ["step", "tokens"] : ["step"];
    const notes = [`${m.records} records`];
    if (m.bucket_lines > 1) notes.push(`downsampled: min and max of every ${m.bucket_lines} lines`);
    box.append(h("p", { class: "muted", text: notes.join(" · ") }));
    if (m.bad_lines) {
      const lines = `${m.bad_lines} unreadable line${m.bad_lines > 1 ? "s" : ""}`;
      box.append(badge(`${lines} in metrics.jsonl skipped`, "unreadable", "bad-lines"));
    }
    const nonfinite = Object.entries(m.series).filter(([, s]) => s.nonfinite);
    for (const [k, s] of nonfinite) {
      box.append(badge(`${k}: ${s.nonfinite} NaN/inf not drawn`, "unreadable"));
    }
    const used = new Set(["tokens"]);
    const grid = h("div", { class: "chart-grid" });
    box.append(grid);
    const cell = (title) => h("div", { class: "chart", testid: "chart", data: { chart: title } });
    // Every cell is in the grid before any chart is drawn, so each is drawn at its final width.
    const charts = [];
    for (const group of CURVES) {
      const keys = group.keys.filter((k) => m.series[k] && m.series[k].x.length);
      if (!keys.length) continue;
      keys.forEach((k) => used.add(k));
      const series = keys.map((k) => curve(k, m.series[k], toTokens));
      charts.push([cell(group.title), { title: group.title, series, xModes: modes }]);
    }
    const others = m.keys.filter((k) => !used.has(k));
    const rest = others.length ? cell("other") : null;
    grid.append(...charts.map(([c]) => c), ...(rest ? [rest] : []));
    for (const [c, opts] of charts) window.LmPlot.create(c, opts);
    if (rest) otherChart(stage, m, others, rest, toTokens, modes);
  }

  // A chart of any other numeric key, picked from a list.
  function otherChart(stage, m, others, cell, toTokens, modes) {
    const select = h("select", { testid: "other-key" }, others.map(option));
    cell.append(h("label", { class: "other-key" }, "metric ", select));
    let chart = null;
    const draw = async () => {
      const k = select.value;
      let s = m.series[k];
      if (!s) s = (await api("/api/metrics", { path: stage.path, keys: k })).series[k];
      const series = s ? [curve(k, s, toTokens)] : [];
      if (chart) chart.update(series);
      else chart = window.LmPlot.create(cell, { title: "", series, xModes: modes });
    };
    select.addEventListener("change", () => draw().catch((e) => failed(e, cell)));
    draw().catch((e) => failed(e, cell));
  }

  // --- Evaluation --------------------------------------------------------------------------

  function evalSection(stage) {
    const metrics = [...new Set(stage.eval.flatMap((t) => t.metrics.map((m) => m.name)))];
    const samples = h("div", { class: "samples-slot" });
    const rows = stage.eval.map((t) => {
      const byName = new Map(t.metrics.map((m) => [m.name, m]));
      const open = h("button", {
        type: "button",
        class: "link",
        text: t.task,
        testid: "eval-task",
        data: { task: t.task },
        title: stage.samples ? "show this task's items" : "no samples.jsonl",
        disabled: !stage.samples,
      });
      const row = h(
        "tr",
        { data: { task: t.task } },
        h("td", {}, open),
        h("td", { class: "num", text: value(t.n) }),
        metrics.map((name) => {
          const m = byName.get(name);
          if (!m) return h("td", { text: "" });
          const se = typeof m.stderr === "number" ? ` ± ${fmt(m.stderr)}` : "";
          return h("td", { class: "num", text: value(m.value) + se });
        }),
      );
      open.addEventListener("click", () => {
        for (const r of row.parentNode.children) r.classList.toggle("selected", r === row);
        samples.replaceChildren(samplesViewer(stage.path, t.task));
      });
      return row;
    });
    return h(
      "div",
      { class: "eval" },
      h("h3", { text: "evaluation" }),
      table(["task", "n", ...metrics], rows, "eval-table"),
      samples,
    );
  }

  // Items of a samples.jsonl, a page at a time: prompt, gold, prediction, scores.
  function samplesViewer(path, task) {
    const limit = 5;
    const box = h("div", { class: "samples", testid: "samples", data: { task: task || "" } });
    const status = h("span", { class: "muted", testid: "samples-status" });
    const prev = h("button", { type: "button", text: "‹ previous", testid: "samples-prev" });
    const next = h("button", { type: "button", text: "next ›", testid: "samples-next" });
    const list = h("div", { class: "sample-list" });
    let offset = 0;
    const load = async () => {
      let page;
      try {
        const params = { path, offset, limit, ...(task === null ? {} : { task }) };
        page = await api("/api/samples", params);
      } catch (e) {
        return failed(e, list);
      }
      const last = Math.min(page.offset + page.items.length, page.total);
      const label = task === null ? "samples" : `samples of ${task}`;
      status.textContent = page.total
        ? `${label}: ${page.offset + 1}–${last} of ${page.total}`
        : `${label}: none`;
      if (page.bad_lines) status.textContent += ` (${page.bad_lines} unreadable lines skipped)`;
      prev.disabled = offset === 0;
      next.disabled = last >= page.total;
      list.replaceChildren(...page.items.map(sampleCard));
    };
    prev.addEventListener("click", () => {
      offset = Math.max(0, offset - limit);
      load();
    });
    next.addEventListener("click", () => {
      offset += limit;
      load();
    });
    box.append(h("div", { class: "toolbar" }, status, prev, next), list);
    load();
    return box;
  }

  function sampleCard(item) {
    // Green/red only where the score is a verdict: a flag, or a 0/1 accuracy-like metric.
    const scores = Object.entries(item.scores).map(([k, v]) => {
      const verdict = typeof v === "boolean" || ((v === 0 || v === 1) && VERDICT.test(k));
      return badge(`${k} ${value(v)}`, verdict ? (v ? "good" : "bad") : "score");
    });
    const field = (label, text, testid) =>
      h(
        "div",
        { class: "field" },
        h("div", { class: "label", text: label }),
        h("pre", { class: "wrap", text, testid }),
      );
    const record = h("pre", { class: "wrap", text: JSON.stringify(item.record, null, 2) });
    const task = item.task ? ` ${item.task} ` : " ";
    return h(
      "article",
      { class: "sample", testid: "sample" },
      h("div", { class: "sample-head" }, `#${item.index ?? item.position}`, task, scores),
      field("prompt", item.prompt, "sample-prompt"),
      field("gold", item.gold, "sample-gold"),
      field("prediction", item.pred, "sample-pred"),
      item.extracted ? field("extracted answer", item.extracted, "sample-extracted") : null,
      collapsible("whole record", false, record),
    );
  }

  // --- Data pipeline -----------------------------------------------------------------------

  function dataSection(data) {
    const count = (v) => (typeof v === "number" ? v.toLocaleString() : value(v));
    const num = (v) => h("td", { class: "num", text: count(v) });
    const counted = (s) => typeof s.docs_in === "number" && typeof s.docs_out === "number";
    const removed = (s) => (counted(s) ? s.docs_in - s.docs_out : null);
    const pairs = (o) => Object.entries(o).map(([k, v]) => `${k} ${value(v)}`).join(", ");
    const rows = data.steps.map((s) =>
      h(
        "tr",
        {},
        h("td", { text: s.step }),
        num(s.docs_in),
        num(s.docs_out),
        num(removed(s)),
        num(s.chars_in),
        num(s.chars_out),
        h("td", { text: pairs(s.reasons) }),
        h("td", { text: pairs(s.counts) }),
      ),
    );
    const head = ["step", "docs in", "docs out", "removed", "chars in", "chars out"];
    head.push("removed by reason", "counts");
    const examples = data.steps.filter((s) => s.examples.length).map((s) =>
      collapsible(
        `removed by ${s.step}`,
        false,
        h(
          "ul",
          {},
          s.examples.map((ex) =>
            h("li", {}, h("code", { text: ex.id }), ` (${ex.reason}) ${ex.text}`),
          ),
        ),
      ),
    );
    const facts = [
      `${value(data.input_shards)} input shard(s)`,
      `${value(data.output_documents)} documents out`,
    ];
    if (Object.keys(data.input).length) facts.push(pairs(data.input));
    return h(
      "div",
      { class: "data" },
      h("h3", { text: "data pipeline" }),
      h("p", { class: "muted", text: facts.join(" · ") }),
      table(head, rows, "data-table"),
      examples,
    );
  }

  // --- Compare -----------------------------------------------------------------------------

  async function showCompare(token, paths) {
    document.title = "lmforge runs: compare";
    const [cmp, ...runs] = await Promise.all([
      api("/api/compare", { path: paths }),
      ...paths.map((path) => api("/api/run", { path })),
    ]);
    if (token !== current) return;
    const colors = window.LmPlot.palette;
    // Each run's own curves (whatever its kind), or those of a stage the runs have in common.
    const withCurves = runs.flatMap((r) => r.stages.filter((s) => s.metrics).map((s) => s.name));
    const stageNames = [...new Set(withCurves)];
    const own = h("option", { value: "", text: "each run's own" });
    const stageSelect = h("select", { testid: "compare-stage" }, own, stageNames.map(option));
    const metricSelect = h("select", { testid: "compare-metric" });
    const plot = h("div", { class: "chart", testid: "compare-plot" });
    const note = h("p", { class: "muted" });
    let chart = null;
    const cache = new Map();
    const metricsOf = (stage, key) => {
      const id = `${stage.path}\n${key}`;
      if (!cache.has(id)) {
        cache.set(id, api("/api/metrics", { path: stage.path, keys: `${key},tokens` }));
      }
      return cache.get(id);
    };
    const draw = async () => {
      const name = stageSelect.value;
      const stages = runs.map((r) =>
        r.stages.find((s, i) => s.metrics && (name === "" ? i === 0 : s.name === name)),
      );
      if (!metricSelect.options.length || metricSelect.dataset.stage !== name) {
        const lists = await Promise.all(stages.map((s) => (s ? metricsOf(s, "loss") : null)));
        const all = new Set(lists.flatMap((m) => (m ? m.keys : [])));
        const keys = [...all].filter((k) => k !== "tokens");
        const keep = metricSelect.value;
        metricSelect.replaceChildren(...keys.map(option));
        const fallback = keys.includes("loss") ? "loss" : keys[0] || "";
        metricSelect.value = keys.includes(keep) ? keep : fallback;
        metricSelect.dataset.stage = name;
      }
      const key = metricSelect.value;
      const loaded = await Promise.all(stages.map((s) => (s ? metricsOf(s, key) : null)));
      const series = [];
      const missing = [];
      loaded.forEach((m, i) => {
        const s = m && m.series[key];
        if (!s || !s.x.length) return missing.push(label(runs[i]));
        const color = colors[i % colors.length];
        series.push(curve(label(runs[i]), s, tokenAxis(m.series.tokens), color));
      });
      note.textContent = missing.length ? `no ${key} in: ${missing.join(", ")}` : "";
      const modes = series.every((s) => s.x.tokens) ? ["step", "tokens"] : ["step"];
      if (chart) chart.root.remove();
      const title = name ? `${name}: ${key}` : key;
      chart = window.LmPlot.create(plot, { title, series, xModes: modes });
    };
    const redraw = () => draw().catch((e) => failed(e, plot));
    stageSelect.addEventListener("change", redraw);
    metricSelect.addEventListener("change", redraw);

    const labels = [...new Set(cmp.runs.flatMap((r) => r.headline.map(([k]) => k)))];
    const maps = cmp.runs.map((r) => new Map(r.headline));
    const runHeads = cmp.runs.map(label);
    const numbers = table(
      ["", ...runHeads],
      labels.map((k) =>
        h(
          "tr",
          {},
          h("th", { text: k }),
          maps.map((m) => h("td", { class: "num", text: value(m.get(k)) })),
        ),
      ),
      "compare-headline",
    );
    const diff = cmp.diff.length
      ? table(
          ["config field", ...runHeads],
          cmp.diff.map(([k, vs]) =>
            h("tr", {}, h("th", { text: k }), vs.map((v) => h("td", { text: configValue(v) }))),
          ),
          "config-diff",
        )
      : h("p", { class: "muted", testid: "config-diff", text: "The configs are identical." });
    show(
      h("p", {}, h("a", { href: "#/", text: "← all runs" })),
      h("h1", { text: "Compare runs" }),
      h("ul", { class: "compare-runs" }, runs.map((r, i) => {
        const swatch = h("span", { class: "lmplot-swatch" });
        swatch.style.background = colors[i % colors.length];
        return h("li", {}, swatch, " ", h("a", { href: runHref(r.path), text: label(r) }));
      })),
      stageNames.length
        ? h(
            "div",
            { class: "toolbar" },
            h("label", {}, "stage ", stageSelect),
            h("label", {}, "metric ", metricSelect),
          )
        : h("p", { class: "muted", text: "None of these runs has a metrics.jsonl." }),
      plot,
      note,
      h("h2", { text: "headline numbers" }),
      numbers,
      h("h2", { text: "config differences" }),
      diff,
    );
    if (stageNames.length) redraw();
  }

  // --- Routing -----------------------------------------------------------------------------

  function route() {
    const token = ++current;
    const hash = location.hash.replace(/^#/, "") || "/";
    let page;
    try {
      if (hash.startsWith("/run/")) page = showRun(token, decodeURIComponent(hash.slice(5)));
      else if (hash.startsWith("/compare/")) {
        const paths = hash.slice(9).split(",").filter(Boolean).map(decodeURIComponent);
        page = showCompare(token, paths);
      } else page = showList(token);
    } catch (e) {
      page = Promise.reject(e); // a malformed %-escape in a hand-typed address
    }
    show(h("p", { class: "muted", text: "loading…" }));
    page.catch((e) => {
      if (token === current) failed(e, view);
    });
  }

  window.addEventListener("hashchange", route);
  route();
})();
