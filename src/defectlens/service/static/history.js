// History page: filtered, paged inspection records; per-model counts and defect rate over time.
"use strict";

const PAGE = 50;
let offset = 0;
const $ = (id) => document.getElementById(id);

function filters() {
  const p = new URLSearchParams();
  const utc = (v) => (v ? new Date(v).toISOString() : "");  // the inputs are local time; the API speaks UTC
  const add = (k, v) => { if (v) p.set(k, v); };
  add("model", $("f-model").value);
  add("verdict", $("f-verdict").value);
  add("since", utc($("f-since").value));
  add("until", utc($("f-until").value));
  return p;
}

async function loadModels() {
  const { loaded, available } = await api("/api/models");
  const names = [...new Set([...loaded.map((m) => m.name), ...available])].sort();
  names.forEach((n) => $("f-model").append(el("option", { value: n, text: n })));
}

async function loadRows() {
  const p = filters();
  p.set("limit", PAGE);
  p.set("offset", offset);
  const page = await api(`/api/history?${p}`);
  const body = $("rows").querySelector("tbody");
  body.replaceChildren(...page.items.map((r) => el("tr", { "data-id": r.id },
    el("td", { class: "num", text: r.id }), el("td", { text: r.created_at.replace("T", " ").slice(0, 19) }), el("td", { text: r.model }),
    el("td", { text: r.source, title: r.image_sha256 }), el("td", {}, el("span", { class: `verdict ${r.verdict}`, text: r.verdict })),
    el("td", { class: "num", text: fmt(r.score, 4) }), el("td", { class: "num", text: fmt(r.threshold, 4) }),
    el("td", { class: "num", text: fmt(r.severity, 2) }), el("td", { class: "num", text: r.regions.length }),
    el("td", {}, feedbackButtons(r.id)))));
  $("range").textContent = page.total ? `${offset + 1}–${offset + page.items.length} of ${page.total}` : "none match";
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + page.items.length >= page.total;
}

async function loadStats() {
  const p = filters();
  p.delete("verdict");
  p.set("bucket", $("f-bucket").value);
  const stats = await api(`/api/stats?${p}`);
  $("per-model").querySelector("tbody").replaceChildren(...stats.models.map((m) => el("tr", {},
    el("td", { text: m.model }), el("td", { class: "num", text: m.total }), el("td", { class: "num", text: m.defects }),
    el("td", { class: "num", text: `${(100 * m.defect_rate).toFixed(1)} %` }), el("td", { class: "num", text: fmt(m.mean_score, 4) }))));
  drawTrend(stats.series);
}

function drawTrend(series) {
  const svg = $("trend"), NS = "http://www.w3.org/2000/svg", W = 900, H = 180, pad = 24;
  svg.replaceChildren();
  const buckets = [...new Set(series.map((s) => s.bucket))].sort();
  if (!buckets.length) return;
  const models = [...new Set(series.map((s) => s.model))].sort();
  const colours = ["#d64545", "#1d4ed8", "#1f9d55", "#b45309", "#7c3aed", "#0e7490"];
  const slot = (W - pad) / buckets.length, bar = Math.min(40, Math.max(2, (slot - 4) / models.length));
  const add = (tag, attrs, text) => { const n = document.createElementNS(NS, tag); Object.entries(attrs).forEach(([k, v]) => n.setAttribute(k, v)); if (text) n.textContent = text; svg.append(n); return n; };
  add("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#94a3b8" });
  add("text", { x: 0, y: 12, "font-size": 10, fill: "#6b7280" }, "100%");
  series.forEach((s) => {
    const h = s.defect_rate * (H - 2 * pad);
    const x = pad + buckets.indexOf(s.bucket) * slot + 2 + models.indexOf(s.model) * bar;
    const rect = add("rect", { x, y: H - pad - h, width: bar - 1, height: Math.max(h, 0.5), fill: colours[models.indexOf(s.model) % colours.length], class: "trend-bar" });
    const title = document.createElementNS(NS, "title");
    title.textContent = `${s.model} ${s.bucket}: ${s.defects}/${s.total} defective (${(100 * s.defect_rate).toFixed(1)} %)`;
    rect.append(title);
  });
  const step = Math.ceil(buckets.length / 8);
  buckets.forEach((b, i) => { if (i % step === 0) add("text", { x: pad + i * slot, y: H - 6, "font-size": 10, fill: "#6b7280" }, b); });
}

async function loadAudit() {
  const { items } = await api("/api/audit?limit=50");
  $("audit").querySelector("tbody").replaceChildren(...items.map((a) => el("tr", {},
    el("td", { text: a.created_at.replace("T", " ").slice(0, 19) }), el("td", { text: a.actor }), el("td", { text: a.role }),
    el("td", { text: a.action }), el("td", { text: a.model || "" }), el("td", { class: "note", text: JSON.stringify(a.details) }))));
}

function refresh() { loadRows(); loadStats(); loadAudit(); showStatus(); }

$("filters").addEventListener("submit", (e) => { e.preventDefault(); offset = 0; refresh(); });
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadRows(); });
$("next").addEventListener("click", () => { offset += PAGE; loadRows(); });
loadModels().then(refresh).catch((err) => { $("range").textContent = err.message; });
