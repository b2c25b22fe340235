/* A small SVG line chart for training curves (no library: the page must work offline).
 *
 * const chart = window.LmPlot.create(container, {
 *   title: "loss",
 *   series: [{name: "loss", y: [...], x: {step: [...], tokens: [...]}, color: "#..."}],
 *   xModes: ["step", "tokens"],   // the x keys offered (a series without one is not drawn then)
 *   height: 240,
 * });
 * chart.update(series)  // new data, same settings
 *
 * Toolbar: x axis, log-y, EMA smoothing; the legend toggles series; hovering shows the values
 * nearest the pointer. Series may differ in length and hold gaps (null/NaN: the line breaks).
 * All text goes into the DOM as textContent. window.LmPlot.format(number) is the number format
 * the chart uses, shared with the page.
 */
(function () {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = [
    "#2f6fdf", "#e4572e", "#17a673", "#a05bd5", "#f0a202",
    "#1fa3b8", "#d6336c", "#6c757d", "#8a6d3b", "#4c9a2a",
  ];
  const MARGIN = { left: 58, right: 14, top: 10, bottom: 26 };
  const charts = new Set();

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  const UNITS = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];

  function trim(s) {
    return s.includes("e") || !s.includes(".") ? s : s.replace(/\.?0+$/, "");
  }

  // Compact and exact enough for axes and tooltips: 0.0123, 3.46, 51.3k, 1.2e-5.
  function format(v) {
    if (typeof v !== "number") return v === null || v === undefined ? "—" : String(v);
    if (!Number.isFinite(v)) return String(v);
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e15 || a < 1e-3) return v.toExponential(2).replace(/\.?0+e/, "e");
    if (a >= 1e4) {
      for (const [size, unit] of UNITS) {
        if (a >= size) return trim((v / size).toPrecision(3)) + unit;
      }
    }
    return trim(v.toPrecision(4));
  }

  // Round steps of 1, 2 or 5 times a power of ten, about `count` of them across [lo, hi].
  function niceTicks(lo, hi, count) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const raw = span / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
      ticks.push(Math.abs(t) < step * 1e-9 ? 0 : Number(t.toPrecision(12)));
    }
    return ticks;
  }

  // Ticks of a log axis given log10 bounds: the powers of ten in range, or, within one decade,
  // linear ticks placed on the log scale.
  function logTicks(lo, hi) {
    const decades = [];
    for (let e = Math.ceil(lo); e <= Math.floor(hi); e++) decades.push(e);
    if (decades.length >= 2) {
      const every = Math.ceil(decades.length / 6);
      return decades.filter((e) => e % every === 0).map((e) => Math.pow(10, e));
    }
    return niceTicks(Math.pow(10, lo), Math.pow(10, hi), 4).filter((t) => t > 0);
  }

  // Debiased exponential moving average (as TensorBoard draws it): early points are not pulled
  // towards zero; gaps are skipped and keep the average.
  function smooth(ys, weight) {
    if (!(weight > 0)) return ys;
    let last = 0;
    let n = 0;
    return ys.map((y) => {
      if (!Number.isFinite(y)) return y;
      last = last * weight + (1 - weight) * y;
      n += 1;
      return last / (1 - Math.pow(weight, n));
    });
  }

  function finite(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  class Chart {
    constructor(container, opts) {
      this.opts = opts;
      this.modes = opts.xModes && opts.xModes.length ? opts.xModes : ["step"];
      this.mode = this.modes[0];
      this.log = !!opts.logY;
      this.weight = opts.smoothing || 0;
      this.hidden = new Set();
      this.root = el("div", "lmplot");
      this.root.dataset.testid = "plot";
      this.build();
      container.appendChild(this.root);
      this.update(opts.series);
      charts.add(this);
    }

    build() {
      const bar = el("div", "lmplot-bar");
      if (this.opts.title) bar.appendChild(el("span", "lmplot-title", this.opts.title));
      if (this.modes.length > 1) {
        const label = el("label", null, "x ");
        const select = el("select");
        select.dataset.testid = "plot-x";
        for (const m of this.modes) {
          const o = el("option", null, m);
          o.value = m;
          select.appendChild(o);
        }
        select.addEventListener("change", () => {
          this.mode = select.value;
          this.render();
        });
        label.appendChild(select);
        bar.appendChild(label);
      }
      const logLabel = el("label");
      const log = el("input");
      log.type = "checkbox";
      log.checked = this.log;
      log.dataset.testid = "plot-log";
      log.addEventListener("change", () => {
        this.log = log.checked;
        this.render();
      });
      logLabel.append(log, " log y");
      bar.appendChild(logLabel);
      const smoothLabel = el("label", null, "smoothing ");
      const range = el("input");
      Object.assign(range, { type: "range", min: "0", max: "0.99", step: "0.01" });
      range.value = String(this.weight);
      range.dataset.testid = "plot-smooth";
      const shown = el("span", "lmplot-smooth", this.weight.toFixed(2));
      range.addEventListener("input", () => {
        this.weight = Number(range.value);
        shown.textContent = this.weight.toFixed(2);
        this.render();
      });
      smoothLabel.append(range, shown);
      bar.appendChild(smoothLabel);
      this.legend = el("div", "lmplot-legend");
      this.svg = svg("svg", { class: "lmplot-svg", role: "img" });
      this.tip = el("div", "lmplot-tip");
      this.tip.hidden = true;
      this.stage = el("div", "lmplot-stage");
      this.stage.append(this.svg, this.tip);
      this.message = el("div", "lmplot-empty muted");
      this.root.append(bar, this.legend, this.stage, this.message);
    }

    update(series) {
      this.series = (series || []).map((s, i) => ({
        ...s,
        color: s.color || PALETTE[i % PALETTE.length],
      }));
      this.renderLegend();
      this.render();
    }

    renderLegend() {
      this.legend.replaceChildren();
      for (const s of this.series) {
        const item = el("button", "lmplot-key");
        item.type = "button";
        item.dataset.testid = "legend-item";
        item.dataset.series = s.name;
        item.setAttribute("aria-pressed", String(!this.hidden.has(s.name)));
        const swatch = el("span", "lmplot-swatch");
        swatch.style.background = s.color;
        item.append(swatch, el("span", null, s.name));
        item.addEventListener("click", () => {
          if (this.hidden.has(s.name)) this.hidden.delete(s.name);
          else this.hidden.add(s.name);
          item.setAttribute("aria-pressed", String(!this.hidden.has(s.name)));
          this.render();
        });
        this.legend.appendChild(item);
      }
    }

    // The drawable points of each visible series in the current x mode and scale.
    prepared() {
      const out = [];
      for (const s of this.series) {
        const xs = s.x && s.x[this.mode];
        if (this.hidden.has(s.name) || !xs) continue;
        const n = Math.min(xs.length, s.y.length);
        const raw = [];
        const x = [];
        for (let i = 0; i < n; i++) {
          if (!finite(xs[i])) continue;
          const y = s.y[i];
          x.push(xs[i]);
          raw.push(finite(y) && (!this.log || y > 0) ? y : NaN);
        }
        const shown = smooth(raw, this.weight);
        let sorted = true;
        for (let i = 1; i < x.length && sorted; i++) sorted = x[i] >= x[i - 1];
        out.push({ s, x, raw, y: shown, sorted });
      }
      return out;
    }

    render() {
      const data = this.prepared();
      this.data = data;
      // Not on the page yet (no width): drawn again once it is.
      if (!this.root.isConnected) {
        requestAnimationFrame(() => this.root.isConnected && this.render());
      }
      const width = Math.max(this.root.clientWidth || 0, 320);
      const height = this.opts.height || 240;
      this.svg.replaceChildren();
      this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      this.svg.setAttribute("width", width);
      this.svg.setAttribute("height", height);
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, count = 0;
      for (const d of data) {
        for (let i = 0; i < d.x.length; i++) {
          const ys = this.weight > 0 ? [d.raw[i], d.y[i]] : [d.y[i]];
          for (const y of ys) {
            if (!Number.isFinite(y)) continue;
            count += 1;
            x0 = Math.min(x0, d.x[i]);
            x1 = Math.max(x1, d.x[i]);
            y0 = Math.min(y0, y);
            y1 = Math.max(y1, y);
          }
        }
      }
      this.message.textContent = count ? "" : this.log ? "no positive values to plot" : "no data";
      if (!count) return;
      if (this.log) {
        y0 = Math.log10(y0);
        y1 = Math.log10(y1);
      }
      if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
      if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.1, y1 + (Math.abs(y1) || 1) * 0.1];
      const pad = (y1 - y0) * 0.04;
      y0 -= pad;
      y1 += pad;
      const pw = width - MARGIN.left - MARGIN.right;
      const ph = height - MARGIN.top - MARGIN.bottom;
      const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * pw;
      const ty = (y) => (this.log ? Math.log10(y) : y);
      const sy = (y) => MARGIN.top + (1 - (ty(y) - y0) / (y1 - y0)) * ph;
      this.scale = { sx, sy, x0, x1, pw };

      const axes = svg("g", { class: "lmplot-axes" });
      const yTicks = this.log ? logTicks(y0, y1) : niceTicks(y0, y1, 5);
      for (const t of yTicks) {
        const y = sy(t);
        if (y < MARGIN.top - 0.5 || y > MARGIN.top + ph + 0.5) continue;
        const x2 = width - MARGIN.right;
        axes.appendChild(svg("line", { class: "lmplot-grid", x1: MARGIN.left, x2, y1: y, y2: y }));
        const label = svg("text", { x: MARGIN.left - 6, y: y + 4, "text-anchor": "end" });
        label.textContent = format(t);
        axes.appendChild(label);
      }
      for (const t of niceTicks(x0, x1, Math.max(2, Math.floor(pw / 90)))) {
        const x = sx(t);
        const y2 = MARGIN.top + ph;
        axes.appendChild(svg("line", { class: "lmplot-grid", x1: x, x2: x, y1: MARGIN.top, y2 }));
        const label = svg("text", { x, y: height - 8, "text-anchor": "middle" });
        label.textContent = format(t);
        axes.appendChild(label);
      }
      const area = { x: MARGIN.left, y: MARGIN.top, width: pw, height: ph };
      axes.appendChild(svg("rect", { class: "lmplot-frame", ...area }));
      this.svg.appendChild(axes);

      for (const d of data) {
        if (this.weight > 0) this.svg.appendChild(this.line(d, d.raw, "lmplot-raw", sx, sy));
        const path = this.line(d, d.y, "lmplot-line", sx, sy);
        path.dataset.testid = "plot-line";
        path.dataset.series = d.s.name;
        this.svg.appendChild(path);
        const drawn = d.y.filter(Number.isFinite).length;
        if (drawn && drawn <= 40) {
          for (let i = 0; i < d.x.length; i++) {
            if (!Number.isFinite(d.y[i])) continue;
            const dot = { class: "lmplot-dot", cx: sx(d.x[i]), cy: sy(d.y[i]), r: 2.5 };
            this.svg.appendChild(svg("circle", { ...dot, fill: d.s.color }));
          }
        }
      }
      const span = { y1: MARGIN.top, y2: MARGIN.top + ph, visibility: "hidden" };
      this.cursor = svg("line", { class: "lmplot-cursor", ...span });
      this.svg.appendChild(this.cursor);
      const overlay = svg("rect", { class: "lmplot-overlay", ...area });
      overlay.addEventListener("mousemove", (e) => this.hover(e));
      overlay.addEventListener("mouseleave", () => this.unhover());
      this.svg.appendChild(overlay);
    }

    // One path: M/L commands, broken at gaps; data-points tells how many points it joins.
    line(d, ys, className, sx, sy) {
      const parts = [];
      let pen = false;
      let points = 0;
      for (let i = 0; i < d.x.length; i++) {
        if (!Number.isFinite(ys[i])) {
          pen = false;
          continue;
        }
        parts.push(`${pen ? "L" : "M"}${sx(d.x[i]).toFixed(1)},${sy(ys[i]).toFixed(1)}`);
        pen = true;
        points += 1;
      }
      const path = svg("path", { class: className, d: parts.join(""), stroke: d.s.color });
      path.dataset.points = String(points);
      return path;
    }

    // The index of the point nearest x (binary search on sorted x, a scan otherwise).
    static nearest(d, x) {
      let best = -1;
      let dist = Infinity;
      const consider = (i) => {
        if (i < 0 || i >= d.x.length || !Number.isFinite(d.y[i])) return;
        const gap = Math.abs(d.x[i] - x);
        if (gap < dist) [best, dist] = [i, gap];
      };
      if (d.sorted) {
        let lo = 0;
        let hi = d.x.length - 1;
        while (lo < hi) {
          const mid = (lo + hi) >> 1;
          if (d.x[mid] < x) lo = mid + 1;
          else hi = mid;
        }
        // The first drawable point at or after x, and the first before it.
        for (let i = lo; i < d.x.length && best < 0; i++) consider(i);
        for (let i = lo - 1; i >= 0; i--) {
          if (Number.isFinite(d.y[i])) {
            consider(i);
            break;
          }
        }
      } else {
        for (let i = 0; i < d.x.length; i++) consider(i);
      }
      return best;
    }

    hover(event) {
      const box = this.svg.getBoundingClientRect();
      const { sx, x0, x1, pw } = this.scale;
      const px = ((event.clientX - box.left) / box.width) * Number(this.svg.getAttribute("width"));
      const x = x0 + ((px - MARGIN.left) / pw) * (x1 - x0);
      const hits = [];
      for (const d of this.data) {
        const i = Chart.nearest(d, x);
        if (i >= 0) hits.push({ d, i });
      }
      if (!hits.length) return this.unhover();
      hits.sort((a, b) => Math.abs(a.d.x[a.i] - x) - Math.abs(b.d.x[b.i] - x));
      const at = hits[0].d.x[hits[0].i];
      this.cursor.setAttribute("x1", sx(at));
      this.cursor.setAttribute("x2", sx(at));
      this.cursor.setAttribute("visibility", "visible");
      this.tip.replaceChildren(el("div", "lmplot-tip-x", `${this.mode} ${format(at)}`));
      for (const { d, i } of hits) {
        const row = el("div");
        const swatch = el("span", "lmplot-swatch");
        swatch.style.background = d.s.color;
        let text = ` ${d.s.name}: ${format(d.y[i])}`;
        if (this.weight > 0) text += ` (raw ${format(d.raw[i])})`;
        if (d.x[i] !== at) text += ` at ${format(d.x[i])}`;
        row.append(swatch, text);
        this.tip.appendChild(row);
      }
      this.tip.hidden = false;
      const left = (sx(at) / Number(this.svg.getAttribute("width"))) * box.width;
      const flip = left > box.width * 0.6;
      this.tip.style.left = flip ? "" : `${left + 12}px`;
      this.tip.style.right = flip ? `${box.width - left + 12}px` : "";
      this.tip.style.top = `${MARGIN.top + 4}px`;
    }

    unhover() {
      this.tip.hidden = true;
      if (this.cursor) this.cursor.setAttribute("visibility", "hidden");
    }
  }

  // Redraw at the new width; charts whose page section is gone are dropped.
  let pending = 0;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(() => {
      for (const c of charts) {
        if (!c.root.isConnected) charts.delete(c);
        else c.render();
      }
    }, 100);
  });

  window.LmPlot = {
    create: (container, opts) => new Chart(container, opts || {}),
    format,
    palette: PALETTE,
  };
})();
