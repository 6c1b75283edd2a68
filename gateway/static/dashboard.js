// Polls /dashboard/data and draws the live view. No libraries: the gateway runs offline.
"use strict";

const POLL_MS = 2000;
const HISTORY = 90; // points kept in the browser (3 minutes at 2 s)
const COLORS = ["#2f6fde", "#1a9c5b", "#e08a00", "#a347c2", "#d23f5a", "#00838f", "#6d4c41"];
const history = []; // {t, byRoute: {route: count}}
let last = null;

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n >= 1000 ? (n / 1000).toFixed(1) + "k" : String(Math.round(n)));
// Not `top`: a top-level `const top` collides with the unforgeable `window.top` and the whole
// script fails to parse (SyntaxError), leaving the page at "connecting…". Found by the browser test.
const topCounts = (obj, n = 3) => Object.entries(obj || {}).sort((a, b) => b[1] - a[1]).slice(0, n)
  .map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "none";

function color(route, routes) {
  return COLORS[routes.indexOf(route) % COLORS.length];
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c && typeof c === "object") { td.textContent = c.text; td.className = c.cls || ""; } else { td.textContent = c; }
      tr.appendChild(td);
    }
    return tr;
  }));
}

function drawChart(routes) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const deltas = [];
  for (let i = 1; i < history.length; i++) {
    const d = {};
    for (const r of routes) d[r] = Math.max(0, (history[i].byRoute[r] || 0) - (history[i - 1].byRoute[r] || 0));
    deltas.push(d);
  }
  // A multiple of 4, so the 4 grid lines fall on whole requests (max 1 labelled the axis 0, 0, 1, 1, 1).
  const max = 4 * Math.ceil(Math.max(1, ...deltas.map((d) => Object.values(d).reduce((a, b) => a + b, 0))) / 4);
  ctx.strokeStyle = "#eceef2"; ctx.fillStyle = "#8a93a6"; ctx.font = "11px system-ui";
  for (let g = 0; g <= 4; g++) {
    const y = h - pad - (g / 4) * (h - 2 * pad);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 8, y); ctx.stroke();
    ctx.fillText(fmt((g / 4) * max), 2, y + 4);
  }
  const bw = (w - pad - 8) / HISTORY;
  deltas.forEach((d, i) => {
    let y = h - pad;
    const x = pad + (HISTORY - deltas.length + i) * bw;
    for (const r of routes) {
      const bh = (d[r] / max) * (h - 2 * pad);
      ctx.fillStyle = color(r, routes);
      ctx.fillRect(x, y - bh, Math.max(1, bw - 1), bh);
      y -= bh;
    }
  });
  $("legend").replaceChildren(...routes.map((r) => {
    const s = document.createElement("span");
    const i = document.createElement("i");
    i.style.background = color(r, routes);
    s.append(i, r);
    return s;
  }));
}

function render(data) {
  const req = data.requests;
  $("total").textContent = fmt(req.total);
  if (last) {
    const dt = Math.max(0.001, data.time - last.time);
    $("rate").textContent = ((req.total - last.requests.total) / dt).toFixed(1) + " req/s";
  }
  const local = req.by_kind.local || 0, cloud = req.by_kind.cloud || 0;
  $("local-share").textContent = local + cloud ? Math.round((100 * local) / (local + cloud)) + "%" : "–";
  $("kind-counts").textContent = `local ${fmt(local)} · cloud ${fmt(cloud)}`;
  $("fallbacks").textContent = fmt(data.fallbacks.total);
  $("fallback-reasons").textContent = topCounts(data.fallbacks.by_reason);
  $("redactions").textContent = fmt(data.redactions.total);
  $("redaction-types").textContent = topCounts(data.redactions.by_entity);
  $("policy").textContent = data.policy + (data.policy_error ? " (reload rejected: " + data.policy_error + ")" : "");

  fillTable("connectivity", Object.entries(data.connectivity).map(([name, c]) => [
    name,
    { text: c.state + (c.forced ? " (forced)" : "") + (c.disabled ? " (no key)" : ""), cls: c.state },
    new Date(c.since * 1000).toLocaleTimeString(),
    c.last_error || "",
  ]));
  fillTable("routes", Object.entries(req.by_route).map(([route, n]) => [
    route, data.targets[route] || "none", fmt(n),
    data.mean_latency_ms[route] !== undefined ? data.mean_latency_ms[route].toFixed(1) : "",
  ]));
  const engineRows = [];
  for (const [target, stats] of Object.entries(data.engines)) {
    for (const [stat, value] of Object.entries(stats)) engineRows.push([target, stat, Number(value.toFixed(3))]);
  }
  fillTable("engines", engineRows.length ? engineRows : [["–", "no in-process engine", ""]]);

  history.push({ t: data.time, byRoute: req.by_route });
  while (history.length > HISTORY + 1) history.shift();
  drawChart(Object.keys(data.targets).concat(Object.keys(req.by_route).filter((r) => !(r in data.targets))));
  last = data;
  $("status").textContent = "live · updated " + new Date(data.time * 1000).toLocaleTimeString();
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

async function poll() {
  try {
    const resp = await fetch("/dashboard/data", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (err) {
    $("status").textContent = "disconnected (" + err.message + "), retrying…";
  }
  setTimeout(poll, POLL_MS);
}

poll();
