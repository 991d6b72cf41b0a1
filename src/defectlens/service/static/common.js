// Small helpers shared by the dashboard pages (no framework, no build step).
"use strict";

async function api(path, options = {}) {
  // the page's key field (when it has one) goes with every call, so a service run with --protect-read works too
  const key = (document.getElementById("api-key") || {}).value;
  const headers = { ...(key ? { "X-API-Key": key } : {}), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

async function showStatus() {
  try {
    const s = await api("/api/status");
    const history = s.history && s.history.state === "degraded" ? ` · history degraded (${s.history.journaled} rows waiting)` : "";
    document.getElementById("status").textContent =
      `v${s.version} · ${s.models.length} model(s) · ${s.served} served · up ${Math.round(s.uptime_s)} s${history}`;
    showDrift(s);
  } catch (err) {
    document.getElementById("status").textContent = `service unreachable: ${err.message}`;
  }
}

// Drift banner: shown on every page while any loaded model's recent scores have moved.
async function showDrift(s) {
  const banner = document.getElementById("drift-banner");
  if (!banner) return;
  try {
    const moved = s.models.filter((m) => m.drift && m.drift !== "ok");
    const reports = await Promise.all(moved.map((m) => api(`/api/models/${encodeURIComponent(m.name)}/drift`)));
    banner.hidden = !reports.length;
    banner.className = `banner ${reports.some((r) => r.state === "drift") ? "drift" : "warning"}`;
    banner.replaceChildren(...reports.map((r) => el("div", { "data-model": r.model, "data-state": r.state },
      el("b", { text: `${r.model}: ${r.state}` }), ` — ${r.reasons.join("; ")}`)));
  } catch (err) {
    banner.hidden = true;
  }
}

// "mark good" / "mark defect" on one inspection: an operator's word, kept beside the verdict.
// A part confirmed good may teach the model a new version; the answer says which, or why not.
function feedbackButtons(inspectionId) {
  const out = el("span", { class: "feedback-result note" });
  if (inspectionId === null || inspectionId === undefined) {  // journaled while the database is away: no row to talk about yet
    out.textContent = "history degraded: feedback once the row is written";
    return out;
  }
  const send = async (label) => {
    const key = (document.getElementById("api-key") || {}).value || "";
    out.textContent = "sending…";
    try {
      const body = await api(`/api/history/${inspectionId}/feedback`, {
        method: "POST", headers: { "content-type": "application/json", "X-API-Key": key }, body: JSON.stringify({ label, note: "from the dashboard" }),
      });
      const l = body.learning;
      out.textContent = !l ? `recorded as ${label}`
        : l.status === "learned" ? `learned: the model now runs ${l.model.file}` : `recorded; not learned: ${l.reason}`;
      out.dataset.status = body.feedback.status;
    } catch (err) {
      out.textContent = `not recorded: ${err.message}`;
      out.dataset.status = "refused";
    }
  };
  const good = el("button", { class: "mark-good", type: "button", text: "mark good" });
  const defect = el("button", { class: "mark-defect", type: "button", text: "mark defect" });
  good.addEventListener("click", () => send("good"));
  defect.addEventListener("click", () => send("defect"));
  return el("span", { class: "feedback" }, good, defect, out);
}
