// Inspect page: upload images, show original + heat map + boxes, re-judge them with a threshold slider.
"use strict";

const state = { model: null, details: null, shown: [] };
const $ = (id) => document.getElementById(id);

function verdictFor(score, threshold) {
  if (threshold === null || threshold === undefined || Number.isNaN(threshold)) return "uncalibrated";
  return score > threshold ? "defect" : "good";  // the same rule the service applies
}

function sliderThreshold() { return parseFloat($("threshold").value); }

async function loadModels() {
  const { loaded } = await api("/api/models");
  const select = $("model");
  select.replaceChildren(...loaded.map((m) => el("option", { value: m.name, text: m.name })));
  if (!loaded.length) { $("message").textContent = "No model is loaded: start the service with a model file."; return; }
  await chooseModel(loaded[0].name);
}

async function chooseModel(name) {
  state.model = name;
  state.details = await api(`/api/models/${encodeURIComponent(name)}`);
  setSliderRange();
  $("threshold").value = state.details.threshold ?? "";
  $("model-threshold").textContent = fmt(state.details.threshold, 4);
  showSelection(state.details.selection);
  rejudge();
  showDriftChart();
}

async function showDriftChart() {
  if (!state.model) return;
  const d = await api(`/api/models/${encodeURIComponent(state.model)}/drift`);
  $("drift-state").textContent = d.state;
  $("drift-state").dataset.state = d.state;
  const figures = d.ks_statistic === null || d.ks_statistic === undefined ? d.reasons.join("; ")
    : `last ${d.span ?? d.n} inspections: KS D ${fmt(d.ks_statistic, 2)} (p ${Number(d.ks_pvalue).toPrecision(2)}); `
      + `last ${d.n}: ${d.rejects} rejected (${fmt(100 * d.reject_rate, 1)} % against ${fmt(100 * d.expected_frr, 1)} % expected)`
      + (d.reasons.length ? ` — ${d.reasons.join("; ")}` : "");
  $("drift-figures").textContent = figures;
  const svg = $("drift-chart"), NS = "http://www.w3.org/2000/svg", W = 900, H = 160, pad = 8;
  svg.replaceChildren();
  const values = d.series.map((p) => p.score).concat(d.threshold ?? []);
  if (!d.series.length) return;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const y = (v) => H - pad - ((v - lo) / span) * (H - 2 * pad), x = (i) => pad + (i / Math.max(1, d.series.length - 1)) * (W - 2 * pad);
  const add = (tag, attrs) => { const n = document.createElementNS(NS, tag); Object.entries(attrs).forEach(([k, v]) => n.setAttribute(k, v)); svg.append(n); return n; };
  if (d.threshold !== null) add("line", { x1: 0, x2: W, y1: y(d.threshold), y2: y(d.threshold), stroke: "#111827", "stroke-dasharray": "4 3" });
  d.series.forEach((p, i) => add("circle", { cx: x(i), cy: y(p.score), r: 3, class: "drift-point", fill: p.verdict === "defect" ? "#d64545" : "#1f9d55" }));
}

function showSelection(selection) {
  $("selection-panel").hidden = !selection;
  if (!selection) return;
  $("selection-reason").textContent = `Chose ${selection.chosen.label}: ${selection.reason}.`;
  const head = el("tr", {}, ...["candidate", "stage", "fit images", "synthetic AUROC", "synthetic AUPRO", "fit s", "ms/image", "note"]
    .map((h) => el("th", { text: h })));
  const rows = selection.results.map((r) => el("tr", r.label === selection.chosen.label && r.stage !== "skipped" ? { class: "chosen" } : {},
    ...[r.label, r.stage, String(r.n_fit), fmt(r.image_auroc), fmt(r.aupro), fmt(r.fit_s, 1), fmt(r.ms_per_image, 1), r.note]
      .map((c) => el("td", { text: c }))));
  $("selection-table").replaceChildren(head, ...rows);
}

function setSliderRange() {
  const d = state.details;
  const scores = [...d.good_scores, ...d.defect_scores, ...(d.synthetic_scores || []), ...state.shown.filter((r) => r.data).map((r) => r.data.score)];
  if (d.threshold !== null) scores.push(d.threshold);
  if (!scores.length) return;
  const lo = Math.min(...scores), hi = Math.max(...scores), pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
  $("threshold").min = lo - pad;
  $("threshold").max = hi + pad;
}

async function inspectFiles(files) {
  if (!state.model) return;
  for (const file of files) {
    const entry = { file, url: URL.createObjectURL(file), data: null, error: null };
    state.shown.unshift(entry);
    entry.card = renderCard(entry);
    $("results").prepend(entry.card);
    try {
      const form = new FormData();
      form.append("file", file, file.name);
      entry.data = await api(`/api/models/${encodeURIComponent(state.model)}/inspect?overlay=true`, { method: "POST", body: form });
    } catch (err) {
      entry.error = err.message;
    }
    const card = renderCard(entry);
    entry.card.replaceWith(card);
    entry.card = card;
  }
  setSliderRange();
  rejudge();
  showStatus();
  showDriftChart();
}

function renderCard(entry) {
  const d = entry.data;
  const badge = el("span", { class: "verdict", text: entry.error ? "error" : d ? "…" : "inspecting" });
  const card = el("div", { class: "result", "data-name": entry.file.name },
    el("header", {}, el("span", { class: "name", text: entry.file.name, title: entry.file.name }), badge,
      el("span", { class: "score", text: d ? `score ${fmt(d.score, 4)}` : "" })));
  if (entry.error) { card.append(el("p", { class: "error-text", text: entry.error })); return card; }
  const original = el("img", { src: entry.url, alt: "original" });
  const frame = el("div", { class: "frame" }, original);
  const pair = el("div", { class: "pair" }, el("div", {}, frame, el("div", { class: "caption", text: "original with regions" })));
  if (d) {
    const [w, h] = [d.width, d.height];
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    for (const r of d.regions) {
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const [x0, y0, x1, y1] = r.box;
      Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "region" }).forEach(([k, v]) => rect.setAttribute(k, v));
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${r.type || "region"} · severity ${fmt(r.severity, 2)}`;
      rect.append(title);
      svg.append(rect);
    }
    frame.append(svg);
    pair.append(el("div", {}, el("div", { class: "frame" }, el("img", { src: d.overlay, alt: "heat map", class: "overlay" })),
      el("div", { class: "caption", text: "heat map" })));
    card.append(pair);
    const list = el("ul", { class: "regions" });
    d.regions.forEach((r) => list.append(el("li", { text: `${r.type || "region"}: severity ${fmt(r.severity, 2)}, ${fmt(r.area_pct, 2)} % of the image` })));
    card.append(list, el("div", { class: "caption", text: `${Object.values(d.timings_ms).reduce((a, b) => a + b, 0).toFixed(0)} ms · record #${d.id}` }),
      feedbackButtons(d.id));
  } else {
    card.append(pair);
  }
  return card;
}

function rejudge() {
  const thr = sliderThreshold();
  $("threshold-value").textContent = fmt(thr, 4);
  let defects = 0, judged = 0;
  for (const entry of state.shown) {
    if (!entry.data || !entry.card) continue;
    const verdict = verdictFor(entry.data.score, thr);
    const badge = entry.card.querySelector(".verdict");
    badge.textContent = verdict;
    badge.className = `verdict ${verdict}`;
    judged += 1;
    defects += verdict === "defect" ? 1 : 0;
  }
  $("tally").textContent = judged ? `${defects} of ${judged} shown image(s) judged defective at this threshold.` : "";
  $("threshold-promise").textContent = promise(thr);
  drawHistogram(thr);
}

// What the slider's threshold promises: the conformal bound from the good calibration scores
// ((scores above + 1) / (n + 1)), and the recall on synthetic defects, which is only an estimate.
function promise(thr) {
  const d = state.details;
  if (!d || Number.isNaN(thr) || !d.good_scores.length) return "";
  const n = d.good_scores.length, above = d.good_scores.filter((v) => v > thr).length;
  let text = `At this threshold: false-reject rate ≤ ${(100 * Math.min(1, (above + 1) / (n + 1))).toFixed(1)} % guaranteed on average`;
  const upper = (d.frr_upper || [])[above];
  if (upper !== undefined) text += `, ≤ ${(100 * upper).toFixed(1)} % for this calibration set with ${100 * d.frr_upper_confidence} % confidence`;
  text += ` (${n} good calibration images)`;
  const syn = d.synthetic_scores || [];
  if (syn.length) text += `; estimated recall on ${syn.length} synthetic defects ${(100 * syn.filter((v) => v > thr).length / syn.length).toFixed(0)} %`;
  return text + ".";
}

function drawHistogram(thr) {
  const canvas = $("histogram"), ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, lo = parseFloat($("threshold").min), hi = parseFloat($("threshold").max);
  ctx.clearRect(0, 0, W, H);
  if (!state.details || !(hi > lo)) return;
  const bins = 48, x = (v) => ((v - lo) / (hi - lo)) * W;
  const count = (values) => { const c = new Array(bins).fill(0); values.forEach((v) => { c[Math.min(bins - 1, Math.max(0, Math.floor(((v - lo) / (hi - lo)) * bins)))] += 1; }); return c; };
  const good = count(state.details.good_scores), bad = count(state.details.defect_scores);
  const synthetic = count(state.details.synthetic_scores || []);
  const peak = Math.max(1, ...good, ...bad, ...synthetic), bw = W / bins;
  ctx.globalAlpha = 0.6;
  [[synthetic, "#e69500"], [good, "#1f9d55"], [bad, "#d64545"]].forEach(([c, colour]) => {
    ctx.fillStyle = colour;
    c.forEach((n, i) => { if (n) ctx.fillRect(i * bw + 1, H - 18 - (n / peak) * (H - 30), bw - 2, (n / peak) * (H - 30)); });
  });
  ctx.globalAlpha = 1;
  ctx.fillStyle = "#1d4ed8";
  state.shown.filter((e) => e.data).forEach((e) => ctx.fillRect(x(e.data.score) - 1, H - 14, 2, 12));
  if (!Number.isNaN(thr)) {
    ctx.strokeStyle = "#111827"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(x(thr), 0); ctx.lineTo(x(thr), H); ctx.stroke();
  }
  ctx.fillStyle = "#6b7280"; ctx.font = "11px system-ui";
  ctx.fillText(fmt(lo, 3), 2, H - 2);
  ctx.fillText(fmt(hi, 3), W - 40, H - 2);
}

async function saveThreshold() {
  const key = $("api-key").value;
  try {
    await api(`/api/models/${encodeURIComponent(state.model)}/threshold`, {
      method: "PUT", headers: { "content-type": "application/json", "X-API-Key": key },
      body: JSON.stringify({ threshold: sliderThreshold(), reason: $("reason").value || "set from the dashboard" }),
    });
    $("message").textContent = `Threshold of ${state.model} is now ${fmt(sliderThreshold(), 4)} (recorded; undo with POST /api/models/${state.model}/threshold/undo).`;
    await chooseModel(state.model);
  } catch (err) {
    $("message").textContent = `Threshold not changed: ${err.message}`;
  }
}

function wire() {
  $("model").addEventListener("change", (e) => chooseModel(e.target.value));
  $("files").addEventListener("change", (e) => { inspectFiles([...e.target.files]); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); inspectFiles([...e.dataTransfer.files]); });
  $("threshold").addEventListener("input", rejudge);
  $("reset-slider").addEventListener("click", () => { $("threshold").value = state.details?.threshold ?? ""; rejudge(); });
  $("save-threshold").addEventListener("click", saveThreshold);
}

wire();
showStatus();
loadModels().catch((err) => { $("message").textContent = err.message; });
