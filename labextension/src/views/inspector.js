// Inspector view: summary, heatmap, tensor table + spectrum, model list + export.
import {
  EXACT_RGB, NAN_RGB, errorScale, fmtBytes, fmtDate, fmtErr, fmtNum, fmtPct, fmtRank, fmtShape, h, kvTable, put, rgb, viridis,
} from "./format.js";
import { lineChart } from "./plot.js";
import { makeTable } from "./table.js";

const ENC_ORDER = ["subspace", "shared", "dense"];

function summaryCards(sm) {
  const enc = sm.encodings || {};
  const encText = Object.keys(enc).sort((a, b) => ENC_ORDER.indexOf(a) - ENC_ORDER.indexOf(b))
    .map((k) => `${enc[k]} ${k}`).join(" · ") || "–";
  const card = (label, value, sub, cls) => h("div", { class: "uws-card " + (cls || "") }, [
    h("div", { class: "uws-card-label", text: label }),
    h("div", { class: "uws-card-value", text: value }),
    sub ? h("div", { class: "uws-card-sub", text: sub }) : null,
  ]);
  return h("div", { class: "uws-cards" }, [
    card("Models", fmtNum(sm.n_models)),
    card("Tensors", fmtNum(sm.n_tensors), encText),
    card("Compression", sm.ratio ? sm.ratio.toFixed(2) + "×" : "–",
         `${fmtBytes(sm.store_bytes)} store vs ${fmtBytes(sm.source_bytes)} sources`),
    card("Relative error", fmtErr(sm.error_max), "max · mean " + fmtErr(sm.error_mean),
         sm.budget_met === false ? "uws-bad" : ""),
    card("Built on", sm.device || "–", "created " + fmtDate(sm.created)),
    card("Format", sm.format_version || "–", sm.generation ? "generation " + sm.generation : null),
  ]);
}

function settingsList(settings) {
  const keys = Object.keys(settings || {});
  if (!keys.length) return null;
  return h("details", { class: "uws-settings" }, [
    h("summary", { text: "Build settings" }),
    kvTable(keys.map((k) => [k, typeof settings[k] === "object" && settings[k] !== null
      ? JSON.stringify(settings[k]) : String(settings[k])]), "uws-mono-values"),
  ]);
}

function encodingPill(enc) {
  return h("span", { class: "uws-pill uws-enc-" + enc, text: enc || "–" });
}

function errorColor(v, scale) {
  if (v === null || v === undefined || isNaN(v)) return NAN_RGB;
  return v === 0 ? EXACT_RGB : viridis(scale.t(v));
}

function errorCell(v, scale) {
  if (v === null || v === undefined) return "–";
  const c = rgb(errorColor(v, scale));
  return h("span", { class: "uws-errcell" }, [h("span", { class: "uws-swatch", style: { background: c } }), fmtErr(v)]);
}

export function render({ model, el }) {
  const root = h("div", { class: "uws uws-inspector" });
  el.appendChild(root);

  const header = h("div", { class: "uws-header" });
  const msg = h("div", { class: "uws-message" });
  const tabs = h("div", { class: "uws-tabs", role: "tablist" });
  const panels = {
    overview: h("div", { class: "uws-panel", "data-tab": "overview" }),
    tensors: h("div", { class: "uws-panel", "data-tab": "tensors" }),
    models: h("div", { class: "uws-panel", "data-tab": "models" }),
  };
  const tabLabels = { overview: "Overview", tensors: "Tensors", models: "Models" };
  const tabButtons = {};
  for (const k of Object.keys(panels)) {
    tabButtons[k] = h("button", { class: "uws-tab", role: "tab", "data-tab": k, text: tabLabels[k],
                                  onclick: () => { model.set("tab", k); model.save_changes(); } });
    tabs.appendChild(tabButtons[k]);
  }
  root.append(header, msg, tabs, ...Object.values(panels));

  // ---------------------------------------------------------------- overview
  const cardsBox = h("div");
  const warnBox = h("div");
  const heatTitle = h("div", { class: "uws-section-title", text: "Relative reconstruction error, per model × tensor" });
  const heatInfo = h("div", { class: "uws-hint" });
  const canvas = h("canvas", { class: "uws-heatmap" });
  const tooltip = h("div", { class: "uws-tooltip", style: { display: "none" } });
  const legend = h("div", { class: "uws-legend" });
  const heatSel = h("div", { class: "uws-heat-selection" });
  const heatWrap = h("div", { class: "uws-heatmap-wrap" }, [canvas, tooltip]);
  panels.overview.append(cardsBox, warnBox, heatTitle, heatInfo, heatWrap, legend, heatSel);

  // ---------------------------------------------------------------- tensors
  const tFilter = h("input", { type: "search", class: "uws-input uws-filter", placeholder: "Filter tensors by name…" });
  const tEnc = h("select", { class: "uws-input uws-enc-filter" }, [
    h("option", { value: "", text: "all encodings" }),
    ...ENC_ORDER.map((e) => h("option", { value: e, text: e })),
  ]);
  let errScale = errorScale(1e-6, 1);
  const tTable = makeTable({
    rowKey: "name",
    sortKey: "error_max", desc: true,
    emptyText: "This store has no tensors.",
    onSelect: (row) => { model.set("selected_tensor", row.name); model.save_changes(); },
    columns: [
      { key: "name", label: "Tensor", render: (r) => h("span", { class: "uws-mono", text: r.name }) },
      { key: "shape", label: "Shape", render: (r) => fmtShape(r.shape),
        sort: (r) => (Array.isArray(r.shape) ? r.shape.reduce((a, b) => a * b, 1) : null) },
      { key: "dtype", label: "Dtype" },
      { key: "encoding", label: "Encoding", render: (r) => encodingPill(r.encoding) },
      { key: "mode", label: "Mode", render: (r) => r.mode || "–" },
      { key: "rank", label: "Rank", align: "right", render: (r) => fmtRank(r.rank),
        sort: (r) => (Array.isArray(r.rank) ? r.rank.reduce((a, b) => a * (b || 1), 1) : r.rank) },
      { key: "explained_variance", label: "Explained", align: "right", render: (r) => fmtPct(r.explained_variance) },
      { key: "residual_bits", label: "Residual", align: "right",
        render: (r) => (r.residual_bits ? r.residual_bits + " bit" : "–") },
      { key: "error_mean", label: "Error mean", align: "right", descFirst: true,
        render: (r) => errorCell(r.error_mean, errScale) },
      { key: "error_max", label: "Error max", align: "right", descFirst: true,
        render: (r) => errorCell(r.error_max, errScale) },
    ],
  });
  const spectrumBox = h("div", { class: "uws-spectrum" });
  panels.tensors.append(h("div", { class: "uws-toolbar" }, [tFilter, tEnc]), tTable.el, spectrumBox);

  // ---------------------------------------------------------------- models
  const mFilter = h("input", { type: "search", class: "uws-input uws-filter", placeholder: "Filter models by id…" });
  const mTable = makeTable({
    rowKey: "id",
    emptyText: "This store has no models.",
    onSelect: (row) => { model.set("selected_model", row.id); model.save_changes(); },
    columns: [
      { key: "id", label: "Model", render: (r) => h("span", { class: "uws-mono", text: r.id }) },
      { key: "format", label: "Source format", render: (r) => r.format || "–" },
      { key: "size", label: "Source size", align: "right", render: (r) => fmtBytes(r.size) },
      { key: "added", label: "Added", render: (r) => fmtDate(r.added) },
      { key: "error_mean", label: "Error mean", align: "right", descFirst: true,
        render: (r) => errorCell(r.error_mean, errScale) },
      { key: "error_max", label: "Error max", align: "right", descFirst: true,
        render: (r) => errorCell(r.error_max, errScale) },
      { key: "sha256", label: "SHA-256", render: (r) => h("span", { class: "uws-mono uws-dim", text: (r.sha256 || "–").slice(0, 12) }),
        cellTitle: (r) => (r.path ? r.path + "\n" : "") + (r.sha256 || "") },
    ],
  });
  const exportBox = h("div", { class: "uws-export" });
  const exSel = h("div", { class: "uws-export-model" });
  const exFormat = h("select", { class: "uws-input uws-export-format" });
  const exPath = h("input", { type: "text", class: "uws-input uws-export-path", placeholder: "output path" });
  const exButton = h("button", { class: "uws-button uws-primary uws-export-button", text: "Export" });
  const exStatus = h("div", { class: "uws-export-status" });
  exportBox.append(
    h("div", { class: "uws-section-title", text: "Export a model" }), exSel,
    h("div", { class: "uws-row" }, [h("label", { text: "Format" }), exFormat]),
    h("div", { class: "uws-row" }, [h("label", { text: "Path" }), exPath]),
    h("div", { class: "uws-row" }, [exButton]), exStatus,
  );
  exFormat.addEventListener("change", () => { model.set("export_format", exFormat.value); model.save_changes(); });
  exPath.addEventListener("input", () => { model.set("export_path", exPath.value); model.save_changes(); });
  exButton.addEventListener("click", () => model.send({ action: "export" }));
  panels.models.append(
    h("div", { class: "uws-toolbar" }, [mFilter]),
    h("div", { class: "uws-split" }, [h("div", { class: "uws-split-main" }, [mTable.el]), exportBox]),
  );

  // ---------------------------------------------------------------- drawing
  function drawHeader() {
    const sm = model.get("summary") || {};
    const path = model.get("path");
    header.replaceChildren(
      h("div", { class: "uws-title" }, [h("span", { class: "uws-logo", text: "UWS" }), " Store inspector"]),
      h("div", { class: "uws-path uws-mono", title: path, text: path || "" }),
    );
    cardsBox.replaceChildren(Object.keys(sm).length ? summaryCards(sm) : h("div"));
    const warns = [];
    if (sm.budget_met === false)
      warns.push(`Some tensors exceed the error budget of ${fmtErr(sm.max_error)}: see the Error max column.`);
    if (Array.isArray(sm.refit_suggested) && sm.refit_suggested.length)
      warns.push(`Models appended after the build fit the bases poorly for ${sm.refit_suggested.length} tensor(s) `
                 + `(${sm.refit_suggested.slice(0, 3).join(", ")}${sm.refit_suggested.length > 3 ? ", …" : ""}): consider rebuilding.`);
    put(warnBox, warns.map((w) => h("div", { class: "uws-warning", text: w })), settingsList(sm.settings));
  }

  function drawMessage() {
    const text = model.get("message");
    const kind = model.get("message_kind") || "info";
    msg.className = "uws-message uws-" + kind;
    msg.textContent = text || "";
    msg.style.display = text ? "block" : "none";
  }

  function drawTab() {
    const tab = model.get("tab") || "overview";
    for (const [k, p] of Object.entries(panels)) {
      p.style.display = k === tab ? "block" : "none";
      tabButtons[k].classList.toggle("uws-active", k === tab);
      tabButtons[k].setAttribute("aria-selected", k === tab ? "true" : "false");
    }
  }

  // One colour scale for the heatmap and the error columns of both tables.
  function updateScale() {
    const meta = model.get("heatmap") || {};
    const hi = meta.max || 1, lo = meta.min_positive || hi * 1e-6;
    errScale = errorScale(Math.max(lo, hi * 1e-8), hi);
  }

  let heat = null; // {values, rows, cols, meta}
  function heatValues() {
    const dv = model.get("errors");
    if (!dv || !dv.byteLength) return new Float32Array(0);
    const buf = dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength);
    return new Float32Array(buf);
  }

  function drawHeatmap() {
    const meta = model.get("heatmap") || {};
    const values = heatValues();
    const rows = meta.rows || 0, cols = meta.cols || 0;
    if (!rows || !cols || values.length < rows * cols) {
      heat = null;
      canvas.style.display = "none";
      heatInfo.textContent = model.get("summary") && model.get("summary").n_models === 0 ? "No models yet." : "";
      legend.replaceChildren();
      return;
    }
    canvas.style.display = "block";
    const avail = Math.max(300, Math.min(1100, (root.clientWidth || 900) - 24));
    const cw = Math.max(1, Math.min(24, Math.floor(avail / cols)));
    const rh = Math.max(1, Math.min(18, Math.floor(520 / rows)));
    const W = cols * cw, H = rows * rh;
    const dpr = window.devicePixelRatio || 1;
    canvas.width = W * dpr; canvas.height = H * dpr;
    canvas.style.width = W + "px"; canvas.style.height = H + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    // Paint at cell resolution, then scale up without smoothing: one putImageData, not rows*cols fillRects.
    const img = ctx.createImageData(cols, rows);
    for (let i = 0; i < rows * cols; i++) {
      const c = errorColor(values[i], errScale);
      img.data[4 * i] = c[0]; img.data[4 * i + 1] = c[1]; img.data[4 * i + 2] = c[2]; img.data[4 * i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    off.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, W, H);
    heat = { values, rows, cols, cw, rh, meta };
    const pooled = meta.row_block > 1 || meta.col_block > 1;
    heatInfo.textContent = `${fmtNum(meta.n_models)} models (rows) × ${fmtNum(meta.n_tensors)} tensors (columns)`
      + (pooled ? ` · each cell shows the worst of ${meta.row_block}×${meta.col_block}` : "")
      + " · hover for values, click to select";
    drawLegend();
    drawHeatSelection();
  }

  function drawLegend() {
    const steps = 48;
    const bar = h("div", { class: "uws-legend-bar" });
    for (let i = 0; i < steps; i++) bar.appendChild(h("span", { style: { background: rgb(viridis(i / (steps - 1))) } }));
    const chip = (c, label) => h("span", { class: "uws-legend-label" }, [
      h("span", { class: "uws-swatch", style: { background: rgb(c) } }), " " + label]);
    put(legend, h("span", { class: "uws-legend-label", text: fmtErr(errScale.lo) + " or less" }), bar,
        h("span", { class: "uws-legend-label", text: fmtErr(errScale.hi) }),
        h("span", { class: "uws-legend-label uws-dim", text: "(log scale)" }),
        chip(EXACT_RGB, "0 (exact)"), chip(NAN_RGB, "not finite"));
  }

  function cellAt(ev) {
    if (!heat) return null;
    const r = canvas.getBoundingClientRect();
    const x = Math.floor((ev.clientX - r.left) / heat.cw), y = Math.floor((ev.clientY - r.top) / heat.rh);
    if (x < 0 || y < 0 || x >= heat.cols || y >= heat.rows) return null;
    return { row: y, col: x, value: heat.values[y * heat.cols + x] };
  }

  function cellNames(cell) {
    const meta = heat.meta;
    const models = model.get("models") || [], tensors = model.get("tensors") || [];
    const mName = meta.row_block === 1 ? (models[cell.row] || {}).id
      : `models ${cell.row * meta.row_block + 1}–${Math.min(meta.n_models, (cell.row + 1) * meta.row_block)}`;
    const tName = meta.col_block === 1 ? (tensors[cell.col] || {}).name
      : `tensors ${cell.col * meta.col_block + 1}–${Math.min(meta.n_tensors, (cell.col + 1) * meta.col_block)}`;
    return { mName, tName, exact: meta.row_block === 1 && meta.col_block === 1 };
  }

  canvas.addEventListener("mousemove", (ev) => {
    const cell = cellAt(ev);
    if (!cell) { tooltip.style.display = "none"; return; }
    const { mName, tName } = cellNames(cell);
    tooltip.replaceChildren(h("div", { class: "uws-mono", text: tName || "" }), h("div", { text: "model " + (mName || "") }),
                            h("div", { class: "uws-tooltip-value", text: "error " + fmtErr(isNaN(cell.value) ? null : cell.value) }));
    tooltip.style.display = "block";
    const wr = heatWrap.getBoundingClientRect();
    tooltip.style.left = (ev.clientX - wr.left + 14) + "px";
    tooltip.style.top = (ev.clientY - wr.top + 14) + "px";
  });
  canvas.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  canvas.addEventListener("click", (ev) => {
    const cell = cellAt(ev);
    if (!cell) return;
    const { exact } = cellNames(cell);
    if (!exact) return;
    const m = (model.get("models") || [])[cell.row], t = (model.get("tensors") || [])[cell.col];
    if (m) model.set("selected_model", m.id);
    if (t) model.set("selected_tensor", t.name);
    model.save_changes();
  });

  function drawHeatSelection() {
    const sm = model.get("selected_model"), st = model.get("selected_tensor");
    if (!sm && !st) { put(heatSel); return; }
    const goto = (tab, label) => h("button", { class: "uws-button uws-link", text: label,
                                                onclick: () => { model.set("tab", tab); model.save_changes(); } });
    put(heatSel,
      h("span", { text: "Selected: " }),
      sm ? h("span", { class: "uws-mono", text: "model " + sm }) : null,
      sm && st ? h("span", { text: " · " }) : null,
      st ? h("span", { class: "uws-mono", text: "tensor " + st }) : null,
      st ? goto("tensors", "Spectrum →") : null,
      sm ? goto("models", "Model & export →") : null,
    );
  }

  function tensorFilter() {
    const q = tFilter.value.trim().toLowerCase();
    const enc = tEnc.value;
    if (!q && !enc) return null;
    return (r) => (!q || String(r.name).toLowerCase().includes(q)) && (!enc || r.encoding === enc);
  }
  function drawTensors() { tTable.update(model.get("tensors"), tensorFilter(), model.get("selected_tensor")); }
  tFilter.addEventListener("input", drawTensors);
  tEnc.addEventListener("change", drawTensors);

  function modelFilter() {
    const q = mFilter.value.trim().toLowerCase();
    return q ? (r) => String(r.id).toLowerCase().includes(q) : null;
  }
  function drawModels() { mTable.update(model.get("models"), modelFilter(), model.get("selected_model")); }
  mFilter.addEventListener("input", drawModels);

  function drawSpectrum() {
    const sp = model.get("spectrum") || {};
    const name = model.get("selected_tensor");
    if (!name) {
      spectrumBox.replaceChildren(h("div", { class: "uws-placeholder",
        text: "Select a tensor to see its spectrum: eigenvalues against a random-matrix baseline and the explained variance." }));
      return;
    }
    if (sp.name !== name) {
      spectrumBox.replaceChildren(h("div", { class: "uws-placeholder", text: "Loading spectrum of " + name + " …" }));
      return;
    }
    const row = (model.get("tensors") || []).find((r) => r.name === name) || {};
    const facts = h("div", { class: "uws-facts" }, [
      h("div", { class: "uws-section-title uws-mono", text: name }),
      h("div", {}, [encodingPill(row.encoding), ` ${fmtShape(row.shape)} · ${row.dtype || ""}`
        + (row.mode ? ` · mode ${row.mode}` : "") + (row.residual_bits ? ` · ${row.residual_bits}-bit residual` : "")
        + (row.basis ? ` · ${row.basis} bases` : "")]),
      h("div", { text: `error mean ${fmtErr(row.error_mean)} · max ${fmtErr(row.error_max)}` }),
      row.reason ? h("div", { class: "uws-dim", text: "why: " + row.reason }) : null,
      row.basis_note ? h("div", { class: "uws-dim", text: "exact bases, sketch not kept: " + row.basis_note }) : null,
    ]);
    if (sp.unavailable) {
      put(spectrumBox, facts, h("div", { class: "uws-placeholder", text: sp.unavailable }));
      return;
    }
    const ev = sp.eigenvalues || [], nul = sp.null || [];
    const k = typeof sp.kept === "number" ? sp.kept : null;
    const nPos = ev.filter((v) => v > 0).length;
    const series = [{ name: "eigenvalues", y: ev, color: "#1f6feb", points: true }];
    if (nul.length) series.push({ name: "null baseline", y: nul, color: "#8b949e", dash: "5 4" });
    const chart1 = lineChart({
      title: "Spectrum" + (sp.side ? ` (${sp.side} basis)` : ""), ylog: true, xlabel: "direction k",
      ylabel: "eigenvalue", series, shadeTo: k,
      vlines: k ? [{ x: k, label: `kept k=${k}`, color: "#d1242f" }] : [],
      width: 490, height: 260, yfloor: 1e-10,
    });
    const tau = typeof sp.tau === "number" ? sp.tau : null;
    const chart2 = lineChart({
      title: "Cumulative explained variance", ylog: false, ymin: 0, ymax: 1, xlabel: "directions kept",
      ylabel: "explained", series: [{ name: "explained", y: sp.explained || [], color: "#1a7f37", points: true }],
      shadeTo: k,
      vlines: k ? [{ x: k, label: `k=${k}: ${fmtPct(sp.explained_at_kept)}`, color: "#d1242f" }] : [],
      hlines: tau !== null ? [{ y: tau, label: `τ = ${tau}`, color: "#bc4c00", dash: "6 4" }] : [],
      width: 490, height: 260,
    });
    const above = sp.n_above_null;
    let verdict = null;
    if (above !== null && above !== undefined) {
      if (above === 0)
        verdict = h("div", { class: "uws-verdict uws-bad", text: "No direction rises above the random-matrix baseline: "
          + "this layer shows no shared structure, so a low-rank basis only fits noise. Check its error before relying on it." });
      else if (k !== null && k > above)
        verdict = h("div", { class: "uws-verdict uws-warn", text: `Only the first ${above} direction(s) rise above the null baseline; `
          + `the other ${k - above} kept direction(s) are indistinguishable from noise.` });
      else if (k !== null && k < above)
        verdict = h("div", { class: "uws-verdict uws-warn", text: `${above} directions rise above the null baseline but only ${k} `
          + `are kept (${fmtPct(sp.explained_at_kept)} explained): the rest is left to the residual or shows up as error.` });
      else
        verdict = h("div", { class: "uws-verdict uws-good", text: `The first ${above} direction(s) rise above the null baseline`
          + (k !== null ? `; ${k} kept.` : ".") });
    }
    put(spectrumBox, facts, verdict,
      h("div", { class: "uws-hint", text: `${ev.length} eigenvalues (${nPos} non-zero)`
        + (k !== null ? ` · kept ${k} · explained ${fmtPct(sp.explained_at_kept)}` : "") }),
      h("div", { class: "uws-charts" }, [chart1, chart2]));
  }

  function drawExport() {
    const sel = model.get("selected_model");
    const state = model.get("export_state");
    put(exSel, sel ? h("span", {}, ["Model ", h("b", { class: "uws-mono", text: sel })])
                              : h("span", { class: "uws-dim", text: "Select a model in the list." }));
    const fmts = model.get("export_formats") || [];
    if (exFormat.options.length !== fmts.length) exFormat.replaceChildren(...fmts.map((f) => h("option", { value: f, text: f })));
    exFormat.value = model.get("export_format");
    if (document.activeElement !== exPath) exPath.value = model.get("export_path") || "";
    exButton.disabled = !sel || state === "running";
    exButton.textContent = state === "running" ? "Exporting…" : "Export";
    exStatus.className = "uws-export-status uws-" + (state === "error" ? "error" : state === "done" ? "success" : "info");
    exStatus.textContent = model.get("export_message") || "";
  }

  function drawAll() {
    updateScale();
    drawHeader(); drawMessage(); drawTab(); drawTensors(); drawModels(); drawSpectrum(); drawExport();
    drawHeatmap();
  }

  const on = (names, fn) => names.split(" ").forEach((n) => model.on("change:" + n, fn));
  on("summary path", drawHeader);
  on("message message_kind", drawMessage);
  on("tab", () => { drawTab(); if (model.get("tab") === "overview") drawHeatmap(); });
  on("tensors", () => { drawTensors(); drawHeatmap(); });
  on("models", drawModels);
  on("errors heatmap", () => { updateScale(); drawHeatmap(); drawTensors(); drawModels(); });
  on("selected_tensor", () => { tTable.select(model.get("selected_tensor")); drawSpectrum(); drawHeatSelection(); });
  on("spectrum", drawSpectrum);
  on("selected_model", () => { mTable.select(model.get("selected_model")); drawExport(); drawHeatSelection(); });
  on("export_state export_message export_path export_format export_formats", drawExport);
  drawAll();
  // The first layout pass may happen after render: redraw the heatmap once the width is known.
  requestAnimationFrame(() => drawHeatmap());
}

export default { render };
