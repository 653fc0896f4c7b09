// Small SVG line charts (log or linear y) for spectra; no dependencies.
import { fmtNum } from "./format.js";

const SVGNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, children = []) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "text") el.textContent = v; else el.setAttribute(k, String(v));
  }
  for (const c of [].concat(children)) if (c) el.appendChild(c);
  return el;
}

function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const span = hi - lo;
  const step0 = Math.pow(10, Math.floor(Math.log10(span / n)));
  const err = (span / n) / step0;
  const step = step0 * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmtTick(v, log) {
  if (log) {
    const e = Math.round(Math.log10(v));
    return e === 0 ? "1" : e === 1 ? "10" : "1e" + e;
  }
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-2) return v.toExponential(0);
  return String(+v.toPrecision(4));
}

/**
 * lineChart({width, height, title, xlabel, ylabel, ylog, ymin, ymax, series, vlines, hlines, shadeTo})
 * series: [{name, y: number[], color, dash, width, points}] with x = 1..n
 * vlines: [{x, label, color, dash}], hlines: [{y, label, color, dash}]
 */
export function lineChart(o) {
  const W = o.width || 520, H = o.height || 260;
  const m = { l: 58, r: 16, t: o.title ? 26 : 10, b: 40 };
  const pw = W - m.l - m.r, ph = H - m.t - m.b;
  const n = Math.max(1, ...o.series.map((q) => q.y.length));
  const xmax = Math.max(2, n);
  const all = [];
  for (const q of o.series) for (const v of q.y) if (v !== null && isFinite(v) && (!o.ylog || v > 0)) all.push(v);
  for (const hl of o.hlines || []) if (isFinite(hl.y) && (!o.ylog || hl.y > 0)) all.push(hl.y);
  let ylo = o.ymin !== undefined ? o.ymin : Math.min(...all);
  let yhi = o.ymax !== undefined ? o.ymax : Math.max(...all);
  if (!isFinite(ylo) || !isFinite(yhi)) { ylo = o.ylog ? 1e-3 : 0; yhi = 1; }
  if (o.ylog) {
    if (o.yfloor) ylo = Math.max(ylo, yhi * o.yfloor);
    ylo = Math.pow(10, Math.floor(Math.log10(ylo)));
    yhi = Math.pow(10, Math.ceil(Math.log10(yhi)));
    if (yhi <= ylo) yhi = ylo * 10;
  } else if (yhi <= ylo) { yhi = ylo + 1; }
  const X = (i) => m.l + ((i - 1) / (xmax - 1)) * pw;
  const Y = (v) => o.ylog
    ? m.t + ph - ((Math.log10(v) - Math.log10(ylo)) / (Math.log10(yhi) - Math.log10(ylo))) * ph
    : m.t + ph - ((v - ylo) / (yhi - ylo)) * ph;

  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "uws-chart", role: "img",
                          "aria-label": o.title || "chart" });
  if (o.title) svg.appendChild(s("text", { x: m.l, y: 16, class: "uws-chart-title", text: o.title }));
  const grid = s("g", { class: "uws-chart-grid" });
  svg.appendChild(grid);

  // y ticks
  let yt = [];
  if (o.ylog) {
    const e0 = Math.log10(ylo), e1 = Math.log10(yhi);
    const stride = Math.max(1, Math.ceil((e1 - e0) / 6));
    for (let e = e0; e <= e1 + 1e-9; e += stride) yt.push(Math.pow(10, e));
  } else yt = niceTicks(ylo, yhi, 5);
  for (const v of yt) {
    grid.appendChild(s("line", { x1: m.l, x2: m.l + pw, y1: Y(v), y2: Y(v) }));
    svg.appendChild(s("text", { x: m.l - 6, y: Y(v) + 4, class: "uws-chart-tick", "text-anchor": "end",
                                text: fmtTick(v, o.ylog) }));
  }
  // x ticks
  const xt = niceTicks(1, xmax, 6).filter((v) => Number.isInteger(v) && v >= 1);
  for (const v of xt) {
    grid.appendChild(s("line", { x1: X(v), x2: X(v), y1: m.t, y2: m.t + ph, class: "uws-chart-xgrid" }));
    svg.appendChild(s("text", { x: X(v), y: m.t + ph + 15, class: "uws-chart-tick", "text-anchor": "middle",
                                text: String(v) }));
  }
  svg.appendChild(s("rect", { x: m.l, y: m.t, width: pw, height: ph, class: "uws-chart-frame" }));
  if (o.xlabel) svg.appendChild(s("text", { x: m.l + pw / 2, y: H - 6, class: "uws-chart-label",
                                            "text-anchor": "middle", text: o.xlabel }));
  if (o.ylabel) svg.appendChild(s("text", { x: 12, y: m.t + ph / 2, class: "uws-chart-label", "text-anchor": "middle",
                                            transform: `rotate(-90 12 ${m.t + ph / 2})`, text: o.ylabel }));

  const clipId = "uwsclip" + Math.random().toString(36).slice(2);
  svg.appendChild(s("clipPath", { id: clipId }, [s("rect", { x: m.l, y: m.t, width: pw, height: ph })]));
  const body = s("g", { "clip-path": `url(#${clipId})` });
  svg.appendChild(body);

  if (o.shadeTo && o.shadeTo >= 1) {
    body.appendChild(s("rect", { x: m.l, y: m.t, width: Math.max(0, X(Math.min(o.shadeTo, xmax)) - m.l),
                                 height: ph, class: "uws-chart-kept" }));
  }
  for (const q of o.series) {
    let d = "", pen = false;
    q.y.forEach((v, i) => {
      const ok = v !== null && isFinite(v) && (!o.ylog || v > 0);
      if (!ok) { pen = false; return; }
      d += (pen ? "L" : "M") + X(i + 1).toFixed(1) + "," + Y(v).toFixed(1);
      pen = true;
    });
    body.appendChild(s("path", { d, fill: "none", stroke: q.color, "stroke-width": q.width || 1.8,
                                 "stroke-dasharray": q.dash || null, class: "uws-series", "data-name": q.name }));
    if (q.points && q.y.length <= 80) {
      q.y.forEach((v, i) => {
        if (v !== null && isFinite(v) && (!o.ylog || v > 0))
          body.appendChild(s("circle", { cx: X(i + 1), cy: Y(v), r: 2.4, fill: q.color }));
      });
    }
  }
  for (const vl of o.vlines || []) {
    if (!(vl.x >= 1)) continue;
    const x = X(Math.min(vl.x, xmax));
    body.appendChild(s("line", { x1: x, x2: x, y1: m.t, y2: m.t + ph, stroke: vl.color, "stroke-width": 1.5,
                                 "stroke-dasharray": vl.dash || null, class: "uws-vline" }));
    svg.appendChild(s("text", { x: Math.min(x + 4, m.l + pw - 4), y: m.t + 12, fill: vl.color,
                                class: "uws-chart-annot", "text-anchor": x + 80 > m.l + pw ? "end" : "start",
                                text: vl.label }));
  }
  for (const hl of o.hlines || []) {
    if (!isFinite(hl.y)) continue;
    const y = Y(hl.y);
    body.appendChild(s("line", { x1: m.l, x2: m.l + pw, y1: y, y2: y, stroke: hl.color, "stroke-width": 1.5,
                                 "stroke-dasharray": hl.dash || null, class: "uws-hline" }));
    svg.appendChild(s("text", { x: m.l + pw - 4, y: y + 14, fill: hl.color, class: "uws-chart-annot",
                                "text-anchor": "end", text: hl.label }));
  }
  // legend
  const named = o.series.filter((q) => q.name);
  if (named.length > 1) {
    let lx = m.l + 8;
    const lg = s("g", { class: "uws-chart-legend" });
    for (const q of named) {
      lg.appendChild(s("line", { x1: lx, x2: lx + 18, y1: m.t + ph - 10, y2: m.t + ph - 10, stroke: q.color,
                                 "stroke-width": 2, "stroke-dasharray": q.dash || null }));
      const txt = s("text", { x: lx + 22, y: m.t + ph - 6, class: "uws-chart-tick", text: q.name });
      lg.appendChild(txt);
      lx += 30 + 6.2 * q.name.length;
    }
    svg.appendChild(lg);
  }
  // hover readout
  const cross = s("line", { y1: m.t, y2: m.t + ph, class: "uws-chart-cross", visibility: "hidden" });
  const readout = s("text", { x: m.l + 6, y: m.t + 14, class: "uws-chart-readout" });
  svg.appendChild(cross);
  svg.appendChild(readout);
  const hit = s("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "transparent" });
  hit.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const px = (ev.clientX - r.left) * (W / r.width);
    const i = Math.round(1 + ((px - m.l) / pw) * (xmax - 1));
    if (i < 1 || i > n) return;
    cross.setAttribute("x1", X(i)); cross.setAttribute("x2", X(i)); cross.setAttribute("visibility", "visible");
    const parts = [`k=${i}`].concat(o.series.map((q) => `${q.name || "y"}=${fmtNum(q.y[i - 1], 3)}`));
    readout.textContent = parts.join("  ");
  });
  hit.addEventListener("mouseleave", () => { cross.setAttribute("visibility", "hidden"); readout.textContent = ""; });
  svg.appendChild(hit);
  return svg;
}
