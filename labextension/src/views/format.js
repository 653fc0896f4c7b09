// Shared helpers of the uwsfmt views: DOM building, number formatting, colour map.

export function h(tag, attrs = {}, children = []) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of [].concat(children)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}

// replaceChildren without the "null" text nodes that null/false children would become.
export function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// A two-column key/value table (tables, not <dl>: notebook CSS restyles dl/dt/dd).
export function kvTable(pairs, cls) {
  return h("table", { class: "uws-kv " + (cls || "") }, [h("tbody", {}, pairs.map(([k, v]) =>
    h("tr", {}, [h("th", { text: k }), h("td", {}, [v === null || v === undefined ? "–" : v])])))]);
}

export function fmtBytes(n) {
  if (n === null || n === undefined || !isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}

// Relative errors span many decades: small ones in exponent form.
export function fmtErr(x) {
  if (x === null || x === undefined || (typeof x === "number" && !isFinite(x))) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a < 1e-3 || a >= 1e4) return x.toExponential(2);
  return x.toPrecision(3);
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || (typeof x === "number" && !isFinite(x))) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(digits - 1);
  return x.toPrecision(digits);
}

export function fmtPct(x, digits = 2) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return (100 * x).toFixed(digits) + "%";
}

export function fmtShape(s) {
  if (!Array.isArray(s)) return s === null || s === undefined ? "varies" : String(s);
  return s.length ? s.join("×") : "scalar";
}

export function fmtRank(r) {
  if (r === null || r === undefined) return "–";
  if (Array.isArray(r)) return r.map((v) => (v === null ? "–" : v)).join("×");
  return String(r);
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 1) return "<1 s";
  if (s < 60) return Math.round(s) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.round(s - 60 * m) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (isNaN(d.getTime())) return String(iso);
  return d.toISOString().slice(0, 16).replace("T", " ");
}

// Viridis, 9 stops; t in [0, 1].
export const VIRIDIS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];
export function viridis(t) {
  if (!isFinite(t)) return [190, 190, 190];
  t = Math.min(1, Math.max(0, t));
  const x = t * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return [0, 1, 2].map((j) => Math.round(a[j] + f * (b[j] - a[j])));
}
export function rgb(c) { return `rgb(${c[0]},${c[1]},${c[2]})`; }
// Exactly zero error (shared/dense tensors, lossless): a neutral colour apart from the scale.
export const EXACT_RGB = [226, 231, 236];
export const NAN_RGB = [150, 150, 150];

// Log-scale colour normalisation for relative errors.
export function errorScale(lo, hi) {
  const l = Math.log10(Math.max(lo, 1e-12));
  let u = Math.log10(Math.max(hi, 1e-12));
  if (!(u > l)) u = l + 1;
  return {
    lo: Math.pow(10, l), hi: Math.pow(10, u),
    t: (v) => (v === null || v === undefined || isNaN(v)) ? NaN : (v <= 0 ? 0 : (Math.log10(v) - l) / (u - l)),
  };
}
