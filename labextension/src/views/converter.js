// Converter view: sources -> plan -> options -> run with progress/ETA/cancel -> summary.
import { fmtBytes, fmtDuration, fmtErr, fmtNum, h, kvTable, put } from "./format.js";

const MODE_LABELS = {
  auto: "automatic", left: "left: shared column space", right: "right: shared row space",
  both: "both: two-sided (Tucker-2)", flat: "flat: PCA over whole tensors",
};

export function render({ model, el }) {
  const root = h("div", { class: "uws uws-converter" });
  el.appendChild(root);

  const bind = (input, trait, kind) => {
    const push = () => {
      let v = input.type === "checkbox" ? input.checked : input.value;
      if (kind === "int") { v = parseInt(v, 10); if (isNaN(v)) return; }
      if (kind === "float") { v = parseFloat(v); if (isNaN(v)) return; }
      if (kind === "float?") { v = String(v).trim() === "" ? null : parseFloat(v); if (v !== null && isNaN(v)) return; }
      model.set(trait, v);
      model.save_changes();
    };
    input.addEventListener(input.tagName === "SELECT" || input.type === "checkbox" ? "change" : "input", push);
    const pull = () => {
      if (document.activeElement === input) return; // do not fight the user's typing
      const v = model.get(trait);
      if (input.type === "checkbox") input.checked = !!v;
      else input.value = v === null || v === undefined ? "" : String(v);
    };
    model.on("change:" + trait, pull);
    pull();
    return input;
  };
  // a button's message carries the form's values: trait updates may still wait behind an earlier
  // one (ipywidgets sends one at a time), so the kernel would act on the options before the last change
  const FORM = ["sources", "output", "action", "skip_existing", "rank_mode", "tau", "rank", "center", "mode",
                "residual_bits", "max_error", "basis", "mean_dtype", "device", "overwrite"];
  const send = (action) => () => model.send({ action, form: Object.fromEntries(FORM.map((k) => [k, model.get(k)])) });

  // ------------------------------------------------------------------ sources + plan
  const sources = bind(h("textarea", { class: "uws-input uws-sources", rows: 3, spellcheck: "false",
    placeholder: "One per line: a checkpoint file, a folder of checkpoints, or a glob\n"
      + "e.g. runs/*/model.safetensors  or  adapters/" }), "sources");
  const planBtn = h("button", { class: "uws-button uws-plan-button", text: "Plan", onclick: send("plan"),
                                title: "Read the checkpoints' headers (no weights) and check they form one family" });
  const planBox = h("div", { class: "uws-plan" });

  // ------------------------------------------------------------------ options
  const action = bind(h("select", { class: "uws-input uws-action" }, [
    h("option", { value: "create", text: "create a new store" }),
    h("option", { value: "add", text: "add to an existing store" }),
  ]), "action");
  const rankMode = bind(h("select", { class: "uws-input uws-rank-mode" }, [
    h("option", { value: "auto", text: "automatic (library default)" }),
    h("option", { value: "tau", text: "explained variance τ" }),
    h("option", { value: "rank", text: "fixed rank k" }),
  ]), "rank_mode");
  const tau = bind(h("input", { type: "number", class: "uws-input uws-tau", min: "0.5", max: "1", step: "0.001" }), "tau", "float");
  const rank = bind(h("input", { type: "number", class: "uws-input uws-rank", min: "0", step: "1" }), "rank", "int");
  const center = bind(h("input", { type: "checkbox", class: "uws-center" }), "center");
  const residual = h("select", { class: "uws-input uws-residual" });
  const mode = h("select", { class: "uws-input uws-mode" });
  const maxError = bind(h("input", { type: "number", class: "uws-input uws-max-error", min: "0", step: "any",
                                     placeholder: "none" }), "max_error", "float?");
  const basis = bind(h("select", { class: "uws-input uws-basis" }, [
    h("option", { value: "exact", text: "exact" }),
    h("option", { value: "sketch", text: "sketch (randomised)" }),
  ]), "basis");
  const meanDtype = bind(h("select", { class: "uws-input uws-mean-dtype" }, [
    h("option", { value: "auto", text: "auto" }),
    h("option", { value: "float16", text: "float16" }),
    h("option", { value: "compute", text: "float32" }),
  ]), "mean_dtype");
  const device = h("select", { class: "uws-input uws-device" });
  const output = bind(h("input", { type: "text", class: "uws-input uws-output", placeholder: "family.uws" }), "output");
  const overwrite = bind(h("input", { type: "checkbox", class: "uws-overwrite" }), "overwrite");

  function fillSelect(sel, trait, choicesTrait, label) {
    const choices = model.get(choicesTrait) || [];
    sel.replaceChildren(...choices.map((c) => h("option", { value: String(c), text: label ? label(c) : String(c) })));
    sel.value = String(model.get(trait));
  }
  const drawChoices = () => {
    fillSelect(residual, "residual_bits", "residual_choices",
               (b) => (b === 0 ? "none" : b === 16 ? "float16" : `${b}-bit`));
    fillSelect(device, "device", "devices");
    fillSelect(mode, "mode", "modes", (m) => MODE_LABELS[m] || m);
  };
  residual.addEventListener("change", () => { model.set("residual_bits", parseInt(residual.value, 10)); model.save_changes(); });
  device.addEventListener("change", () => { model.set("device", device.value); model.save_changes(); });
  mode.addEventListener("change", () => { model.set("mode", mode.value); model.save_changes(); });
  model.on("change:mode", drawChoices);
  model.on("change:residual_bits", drawChoices);
  model.on("change:device", drawChoices);
  model.on("change:devices", drawChoices);

  const opt = (label, input, hint) => h("div", { class: "uws-opt" }, [
    h("label", { text: label }), input, hint ? h("div", { class: "uws-hint", text: hint }) : null]);
  const tauOpt = opt("τ", tau, "smallest k whose explained variance reaches τ");
  const rankOpt = opt("k", rank, "directions kept per basis side");
  const outputLabel = h("label", { text: "Output" });
  const overwriteBox = h("label", { class: "uws-check" }, [overwrite, " overwrite an existing store"]);
  // options that shape a new store's bases: adding to a store projects onto the bases it has
  const createOnly = [opt("Rank", rankMode),
    opt("Basis side", mode, "which mode of each matrix the shared basis spans"),
    opt("Centering", h("label", { class: "uws-check" }, [center, " subtract the family mean first"])),
    opt("Residual", residual, "quantized per-model correction on top of the basis"),
    opt("Bases", basis, "sketch: much faster for wide layers and large LoRA families; exact where its check fails"),
    opt("Means", meanDtype, "float16: half the bytes of each tensor's family mean, faster loads (auto: for bf16/fp16 families and error budgets)")];
  const skipExisting = bind(h("input", { type: "checkbox", class: "uws-skip-existing" }), "skip_existing");
  const addHint = h("div", { class: "uws-opt uws-opt-wide uws-add-hint" }, [h("div", { class: "uws-hint",
    text: "The new checkpoints are projected onto the store's own bases and committed together (all or none); "
      + "the store's error budget holds for them unless you give one here." })]);
  const skipOpt = opt("Known ids", h("label", { class: "uws-check" }, [skipExisting, " skip models the store already has"]),
                      "else a source whose model id is taken stops the whole run");
  const options = h("div", { class: "uws-options" }, [
    opt("Action", action), addHint, skipOpt, createOnly[0], tauOpt, rankOpt, ...createOnly.slice(1),
    opt("Error budget", maxError, "max relative error per tensor and model (blank: none)"),
    opt("Device", device),
    h("div", { class: "uws-opt uws-opt-wide" }, [outputLabel, h("div", { class: "uws-row uws-tight" }, [output, overwriteBox])]),
  ]);
  const stepTitle = h("div", { class: "uws-section-title", text: "3 · Convert" });
  const drawRankMode = () => {
    const adding = model.get("action") === "add";
    const m = model.get("rank_mode");
    tauOpt.style.display = m === "tau" && !adding ? "" : "none";
    rankOpt.style.display = m === "rank" && !adding ? "" : "none";
    for (const o of createOnly) o.style.display = adding ? "none" : "";
    addHint.style.display = adding ? "" : "none";
    skipOpt.style.display = adding ? "" : "none";
    overwriteBox.style.display = adding ? "none" : "";
    outputLabel.textContent = adding ? "Store" : "Output";
    output.placeholder = adding ? "the store to add to, e.g. family.uws" : "family.uws";
    stepTitle.textContent = adding ? "3 · Add to the store" : "3 · Convert";
  };
  model.on("change:rank_mode", drawRankMode);
  model.on("change:action", drawRankMode);

  // ------------------------------------------------------------------ run
  const runBtn = h("button", { class: "uws-button uws-primary uws-run-button", text: "Run", onclick: send("run") });
  const cancelBtn = h("button", { class: "uws-button uws-danger uws-cancel-button", text: "Cancel", onclick: send("cancel") });
  const bar = h("div", { class: "uws-progress-fill" });
  const progress = h("div", { class: "uws-progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, [bar]);
  const progressText = h("div", { class: "uws-progress-text" });
  const statusBadge = h("span", { class: "uws-status" });
  const msg = h("div", { class: "uws-message" });
  const logPre = h("pre", { class: "uws-log" });
  const logBox = h("details", { class: "uws-logbox" }, [h("summary", { text: "Log" }), logPre]);
  const summaryBox = h("div", { class: "uws-summary" });
  const openBtn = h("button", { class: "uws-button uws-open-button", text: "Open in Inspector", onclick: send("open_inspector") });

  root.append(
    h("div", { class: "uws-header" }, [
      h("div", { class: "uws-title" }, [h("span", { class: "uws-logo", text: "UWS" }), " Convert checkpoints"]),
      statusBadge]),
    h("div", { class: "uws-section-title", text: "1 · Sources" }),
    h("div", { class: "uws-row uws-sources-row" }, [sources, planBtn]),
    planBox,
    h("div", { class: "uws-section-title", text: "2 · Options" }),
    options,
    stepTitle,
    h("div", { class: "uws-row" }, [runBtn, cancelBtn, h("div", { class: "uws-progress-box" }, [progress, progressText])]),
    msg, summaryBox, logBox,
  );

  function drawPlan() {
    const r = model.get("plan_report") || {};
    if (!Object.keys(r).length) { put(planBox); return; }
    const formats = Object.entries(r.formats || {}).map(([k, v]) => `${v} ${k}`).join(", ") || "–";
    const enc = Object.entries(r.encodings || {}).map(([k, v]) => `${v} ${k}`).join(", ");
    const nT = r.n_tensors !== undefined ? r.n_tensors
      : Array.isArray(r.tensors) ? r.tensors.length : (r.tensors && typeof r.tensors === "object" ? Object.keys(r.tensors).length : r.tensors);
    const conflicts = r.conflicts || [];
    const items = [["Models", fmtNum(r.n_models)], ["Formats", formats]];
    if (nT !== undefined) items.push(["Tensors", fmtNum(nT) + (enc ? ` (${enc})` : "")]);
    items.push(["Size of sources", fmtBytes(r.total_bytes)]);
    if (Array.isArray(r.new)) items.push(["New to the store", r.new.length + (r.new.length ? ": " + r.new.slice(0, 8).join(", ") + (r.new.length > 8 ? " …" : "") : "")]);
    if (Array.isArray(r.existing) && r.existing.length) items.push(["Already in the store", r.existing.length + ": " + r.existing.slice(0, 8).join(", ") + (r.existing.length > 8 ? " …" : "")]);
    if (Array.isArray(r.varying_shapes) && r.varying_shapes.length) items.push(["Shapes vary", r.varying_shapes.length + " tensor(s), stored dense"]);
    if (r.lora) items.push(["LoRA", typeof r.lora === "object" ? Object.entries(r.lora).filter(([, v]) => typeof v !== "object").map(([k, v]) => `${k}: ${v}`).join(", ") : String(r.lora)]);
    put(planBox,
      kvTable(items, "uws-plan-facts"),
      conflicts.length ? h("div", { class: "uws-conflicts" }, [
        h("div", { class: "uws-conflicts-title", text: `${conflicts.length} conflict(s): ` + (Array.isArray(r.new)
          ? "these sources cannot be added to the store" : "these sources are not one family") }),
        h("ul", {}, conflicts.slice(0, 50).map((c) => h("li", { text: c }))),
        conflicts.length > 50 ? h("div", { class: "uws-dim", text: `… and ${conflicts.length - 50} more` }) : null,
      ]) : null,
    );
  }

  function drawStatus() {
    const st = model.get("status");
    const busy = st === "planning" || st === "running" || st === "cancelling";
    runBtn.disabled = busy;
    planBtn.disabled = busy;
    cancelBtn.disabled = st !== "running";
    cancelBtn.style.display = st === "running" || st === "cancelling" ? "" : "none";
    openBtn.disabled = st !== "done";
    statusBadge.className = "uws-status uws-status-" + st;
    statusBadge.textContent = st;
    root.dataset.status = st;
    drawProgress();
  }

  function drawProgress() {
    const p = model.get("progress") || {};
    const st = model.get("status");
    const total = p.total || 0, done = p.done || 0;
    const frac = total ? Math.min(1, done / total) : (st === "done" ? 1 : 0);
    bar.style.width = (100 * frac).toFixed(1) + "%";
    progress.setAttribute("aria-valuenow", (100 * frac).toFixed(0));
    progress.classList.toggle("uws-progress-active", st === "running");
    progress.classList.toggle("uws-progress-failed", st === "error" || st === "cancelled");
    if (!Object.keys(p).length) { progressText.textContent = ""; return; }
    const parts = [];
    if (total) parts.push(`${done} / ${total} (${(100 * frac).toFixed(0)}%)`);
    parts.push("elapsed " + fmtDuration(p.elapsed));
    if (st === "running" && p.eta !== null && p.eta !== undefined) parts.push("ETA " + fmtDuration(p.eta));
    if (p.message) parts.push(p.message);
    progressText.textContent = parts.join(" · ");
  }

  function drawMessage() {
    const text = model.get("message");
    msg.className = "uws-message uws-" + (model.get("message_kind") || "info");
    msg.textContent = text || "";
    msg.style.display = text ? "block" : "none";
  }

  function drawLog() {
    const lines = model.get("log") || [];
    const atBottom = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 4;
    logPre.textContent = lines.join("\n");
    if (atBottom) logPre.scrollTop = logPre.scrollHeight;
  }

  function drawSummary() {
    const sm = model.get("summary") || {};
    if (!Object.keys(sm).length) { put(summaryBox); return; }
    const enc = Object.entries(sm.encodings || {}).map(([k, v]) => `${v} ${k}`).join(" · ");
    const card = (label, value, sub) => h("div", { class: "uws-card" }, [
      h("div", { class: "uws-card-label", text: label }), h("div", { class: "uws-card-value", text: value }),
      sub ? h("div", { class: "uws-card-sub", text: sub }) : null]);
    put(summaryBox,
      h("div", { class: "uws-cards" }, [
        card("Models", fmtNum(sm.n_models)),
        card("Tensors", fmtNum(sm.n_tensors), enc),
        card("Compression", sm.ratio ? sm.ratio.toFixed(2) + "×" : "–",
             `${fmtBytes(sm.store_bytes)} vs ${fmtBytes(sm.source_bytes)}`),
        card("Relative error", fmtErr(sm.error_max), "max · mean " + fmtErr(sm.error_mean)),
      ]),
      h("div", { class: "uws-row" }, [openBtn, h("span", { class: "uws-mono uws-dim", text: sm.path || "" })]),
    );
  }

  model.on("change:plan_report", drawPlan);
  model.on("change:status", drawStatus);
  model.on("change:progress", drawProgress);
  model.on("change:message", drawMessage);
  model.on("change:message_kind", drawMessage);
  model.on("change:log", drawLog);
  model.on("change:summary", drawSummary);
  drawChoices(); drawRankMode(); drawPlan(); drawStatus(); drawMessage(); drawLog(); drawSummary();
}

export default { render };
