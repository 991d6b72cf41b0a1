// Small helpers shared by the dashboard pages (no framework, no build step).
"use strict";

async function api(path, options = {}) {
  const response = await fetch(path, options);
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
    document.getElementById("status").textContent =
      `v${s.version} · ${s.models.length} model(s) · ${s.served} served · up ${Math.round(s.uptime_s)} s`;
  } catch (err) {
    document.getElementById("status").textContent = `service unreachable: ${err.message}`;
  }
}
