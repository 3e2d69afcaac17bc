// The muster dashboard: plain JavaScript and SVG, no framework. It polls the JSON API
// (/api/jobs, /api/nodes, /api/jobs/ID) once a second and redraws. Routes: #/ (jobs and nodes)
// and #/job/ID. A coordinator bound beyond loopback wants a bearer token: open the page as
// /?token=... once; it is kept in this tab's sessionStorage.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem("muster-token", params.get("token"));
    history.replaceState(null, "", location.pathname + location.hash);
  }
})();

const COLORS = ["#2f6fdf", "#e0703a", "#1f9d55", "#9b51e0", "#c2417b", "#0e9aa7"];
const app = document.getElementById("app");
const statusEl = document.getElementById("status");
let timer = null;
let logRank = 0;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem("muster-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store" });
  const body = await r.json().catch(() => ({ error: "not JSON (" + r.status + ")" }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits ?? 0 });
}

function fmtDur(s) {
  if (s === null || s === undefined || s < 0) return "";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "";
}

function stateBadge(s) {
  return `<span class="state st-${esc(s)}">${esc(s)}</span>`;
}

// ---------------------------------------------------------------------------------------------
// #/ : jobs and nodes

function jobsTable(jobs) {
  if (!jobs.length) return '<p class="muted">no jobs yet</p>';
  let rows = "";
  for (const j of jobs.slice().reverse()) {
    const p = j.progress || {};
    const step = p.step !== undefined ? fmtNum(p.step) + (p.total ? " / " + fmtNum(p.total) : "") : "";
    const tput = p.throughput ? fmtNum(p.throughput, 1) + " " + esc(p.unit || "") : "";
    rows += `<tr class="job-row" data-job="${esc(j.id)}" data-state="${esc(j.state)}">
      <td><a href="#/job/${encodeURIComponent(j.id)}">${esc(j.id)}</a></td>
      <td>${stateBadge(j.state)}</td>
      <td>${esc(j.provider)}${j.spares && j.spares.length ? ` <span class="muted spares" title="hot spares held: ${esc(j.spares.join(", "))}">+${j.spares.length} spare${j.spares.length > 1 ? "s" : ""}</span>` : ""}</td>
      <td class="num step">${step}</td>
      <td class="num">${p.loss !== undefined && j.progress ? fmtNum(p.loss, 4) : ""}</td>
      <td class="num">${tput}</td>
      <td class="num preemptions">${j.preemptions}</td>
      <td class="num">${j.attempt}</td>
      <td class="num">${j.state === "running" ? fmtDur(j.eta_s) : ""}</td>
      <td class="muted">${esc(j.pending_reason || j.detail)}</td></tr>`;
  }
  return `<table id="jobs"><thead><tr><th>job</th><th>state</th><th>provider</th><th>step</th>
    <th>loss</th><th>throughput</th><th>preemptions</th><th>attempt</th><th>eta</th><th></th>
    </tr></thead><tbody>${rows}</tbody></table>`;
}

function nodesView(nodes) {
  if (!nodes.length) return '<p class="muted">no nodes registered</p>';
  const byProvider = {};
  for (const n of nodes) {
    const p = (byProvider[n.provider || "(none)"] ??= {});
    (p[n.island || "(no island)"] ??= []).push(n);
  }
  let out = '<div class="providers" id="nodes">';
  for (const [prov, islands] of Object.entries(byProvider).sort()) {
    out += `<div class="provider" data-provider="${esc(prov)}"><h3>${esc(prov)}</h3>`;
    for (const [isl, ns] of Object.entries(islands).sort()) {
      out += `<div class="island"><div class="name">island ${esc(isl)}</div>`;
      for (const n of ns) {
        out += `<span class="node" data-node="${esc(n.name)}" title="heartbeat ${fmtNum(n.heartbeat_age_s, 1)} s ago">
          ${esc(n.name)} ${stateBadge(n.state)} ${n.job ? '<span class="muted">' + esc(n.job) + (n.spare ? " (spare)" : "") + "</span>" : ""}</span>`;
      }
      out += "</div>";
    }
    out += "</div>";
  }
  return out + "</div>";
}

async function showHome() {
  const [jobs, nodes] = await Promise.all([api("/api/jobs"), api("/api/nodes")]);
  app.innerHTML = `<div class="card"><h2>Jobs</h2>${jobsTable(jobs.jobs)}</div>
    <div class="card"><h2>Nodes by provider and island</h2>${nodesView(nodes.nodes)}</div>`;
  return jobs.time_ms;
}

// ---------------------------------------------------------------------------------------------
// #/job/ID

// The step a preempted or lost attempt stopped at: where the next attempt resumed (the
// checkpoint taken on the notice), else its last reported step.
function stopStep(job, i) {
  const next = job.attempts[i + 1];
  if (next && next.resume_step >= 0) return next.resume_step;
  return job.attempts[i].end_step;
}

function lossChart(job) {
  const W = 900, H = 320, L = 56, R = 18, T = 16, B = 34;
  const attempts = job.attempts.filter((a) => a.points.length || a.ended_ms);
  let maxStep = (job.progress && job.progress.total) || 0, minLoss = Infinity, maxLoss = -Infinity;
  for (const a of job.attempts) {
    for (const [s, l] of a.points) {
      maxStep = Math.max(maxStep, s);
      minLoss = Math.min(minLoss, l);
      maxLoss = Math.max(maxLoss, l);
    }
  }
  if (!Number.isFinite(minLoss)) return '<p class="muted">no progress reported yet</p>';
  if (maxLoss - minLoss < 1e-9) { maxLoss += 0.5; minLoss -= 0.5; }
  const pad = (maxLoss - minLoss) * 0.08;
  minLoss -= pad; maxLoss += pad;
  maxStep = Math.max(maxStep, 1);
  const x = (s) => L + (s / maxStep) * (W - L - R);
  const y = (l) => T + (1 - (l - minLoss) / (maxLoss - minLoss)) * (H - T - B);
  let svg = `<svg id="loss-chart" viewBox="0 0 ${W} ${H}" width="100%" data-max-step="${maxStep}"
      data-x0="${L}" data-x1="${W - R}" role="img" aria-label="loss by step">`;
  // Axes and ticks.
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#c9ceda"/>`;
  svg += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#c9ceda"/>`;
  for (let i = 0; i <= 5; i++) {
    const s = Math.round((maxStep * i) / 5);
    svg += `<text x="${x(s)}" y="${H - B + 16}" text-anchor="middle">${s}</text>`;
    const l = minLoss + ((maxLoss - minLoss) * i) / 5;
    svg += `<text x="${L - 6}" y="${y(l) + 4}" text-anchor="end">${l.toFixed(2)}</text>`;
    svg += `<line x1="${L}" y1="${y(l)}" x2="${W - R}" y2="${y(l)}" stroke="#f0f2f7"/>`;
  }
  svg += `<text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">step</text>`;
  // One line per attempt.
  let legend = "";
  job.attempts.forEach((a, i) => {
    const c = COLORS[i % COLORS.length];
    if (a.points.length) {
      const d = a.points.map(([s, l], k) => (k ? "L" : "M") + x(s).toFixed(1) + "," + y(l).toFixed(1)).join("");
      svg += `<path class="attempt-line" data-attempt="${a.attempt}" data-provider="${esc(a.provider)}"
        data-points="${a.points.length}" data-first-step="${a.points[0][0]}"
        data-last-step="${a.points[a.points.length - 1][0]}" d="${d}" fill="none" stroke="${c}"
        stroke-width="2"/>`;
    }
    legend += `<span style="--c:${c}">attempt ${a.attempt} · ${esc(a.provider || "?")}
      ${a.outcome ? "(" + esc(a.outcome) + ")" : a.ended_ms ? "" : "(running)"}</span>`;
  });
  // Where each attempt stopped early, and where the next one resumed.
  job.attempts.forEach((a, i) => {
    if (a.outcome === "preempted" || a.outcome === "node_lost" || a.outcome === "failed") {
      const s = stopStep(job, i);
      if (s === undefined || s < 0) return;
      const cls = a.outcome === "preempted" ? "preempt" : a.outcome === "node_lost" ? "lost" : "failed";
      const label = a.outcome === "preempted" ? "preempted" : a.outcome === "node_lost" ? "node lost" : "failed";
      svg += `<g class="mark ${cls}" data-attempt="${a.attempt}" data-step="${s}" data-x="${x(s).toFixed(1)}">
        <line x1="${x(s)}" y1="${T}" x2="${x(s)}" y2="${H - B}" stroke="#d64545" stroke-dasharray="5,4" stroke-width="1.5"/>
        <text x="${x(s) + 5}" y="${T + 10}" style="fill:#d64545">${label} · attempt ${a.attempt} @ step ${s}</text></g>`;
    }
    if (i > 0 && a.resume_step >= 0) {
      const ly = a.points.length ? y(a.points[0][1]) : (T + H - B) / 2;
      svg += `<g class="mark resume" data-attempt="${a.attempt}" data-step="${a.resume_step}"
          data-provider="${esc(a.provider)}" data-x="${x(a.resume_step).toFixed(1)}">
        <circle cx="${x(a.resume_step)}" cy="${ly}" r="6" fill="none" stroke="#1f9d55" stroke-width="2.5"/>
        <text x="${x(a.resume_step) + 9}" y="${ly + 18}" style="fill:#1f9d55">resumed from step ${a.resume_step} on ${esc(a.provider)}</text></g>`;
    }
  });
  svg += "</svg>";
  return svg + `<div class="legend">${legend}</div>`;
}

function eventsTable(events) {
  if (!events.length) return '<p class="muted">no events</p>';
  let rows = "";
  for (const e of events.slice().reverse()) {
    rows += `<tr class="event" data-kind="${esc(e.kind)}"><td class="muted">${fmtTime(e.time_ms)}</td>
      <td class="kind k-${esc(e.kind)}">${esc(e.kind)}</td><td>${esc(e.node)}</td><td>${esc(e.message)}</td></tr>`;
  }
  return `<div class="events"><table id="events">${rows}</table></div>`;
}

function checkpointsView(ck) {
  const providers = Object.keys(ck.providers).sort();
  if (!providers.length) return '<p class="muted">no checkpoint committed yet</p>';
  const lag = Object.fromEntries(ck.lag.map((l) => [l.provider, l]));
  let out = '<div class="providers" id="checkpoints">';
  for (const p of providers) {
    const l = lag[p] || {};
    const byVol = {};
    for (const c of ck.providers[p]) (byVol[c.volume] ??= []).push(c);
    out += `<div class="provider provider-ckpts" data-provider="${esc(p)}"><h3>${esc(p || "(no provider)")}</h3>`;
    for (const [v, cs] of Object.entries(byVol)) {
      out += `<div class="muted">volume ${esc(v)}</div>`;
      out += cs.map((c) => `<span class="ckpt-step" data-step="${c.step}" title="${fmtTime(c.time_ms)}">${c.step}</span>`).join("");
    }
    out += `<div class="lag ${l.lag_steps > 0 ? "behind" : ""}" data-lag-steps="${l.lag_steps ?? 0}">
      ${l.lag_steps > 0 ? "behind by " + l.lag_steps + " steps, " + fmtDur(l.lag_s) : "up to date"}</div></div>`;
  }
  return out + "</div>";
}

async function showJob(id) {
  const job = await api("/api/jobs/" + encodeURIComponent(id));
  const p = job.progress || {};
  const ranks = (job.spec.nodes || 1) * (job.spec.ranks_per_node || 1);
  let log = { data: "" };
  let logError = "";
  try {
    log = await api(`/api/jobs/${encodeURIComponent(id)}/logs?rank=${logRank}&bytes=6000`);
  } catch (e) {
    logError = e.message;
  }
  let opts = "";
  for (let r = 0; r < ranks; r++) opts += `<option value="${r}" ${r === logRank ? "selected" : ""}>rank ${r}</option>`;
  // Keep the log pinned to its end unless the reader scrolled up.
  const was = document.querySelector("pre.log");
  const scrollWas = was && was.scrollTop + was.clientHeight < was.scrollHeight - 20 ? was.scrollTop : null;
  app.innerHTML = `
    <div class="card" id="job" data-job="${esc(job.id)}" data-state="${esc(job.state)}">
      <h2>${esc(job.id)} ${stateBadge(job.state)}
        <span class="muted">attempt ${job.attempt} · ${esc(job.provider || "no provider")} ·
        step ${fmtNum(p.step)}${p.total ? " / " + fmtNum(p.total) : ""} · ${job.preemptions} preemption(s) ·
        ${job.restarts} restart(s)${job.state === "running" && job.eta_s >= 0 ? " · eta " + fmtDur(job.eta_s) : ""}</span></h2>
      ${lossChart(job)}
    </div>
    <div class="grid">
      <div class="card"><h2>Events</h2>${eventsTable(job.events)}</div>
      <div class="card"><h2>Checkpoints by provider</h2>${checkpointsView(job.checkpoints)}</div>
    </div>
    <div class="card"><h2>Log tail <select id="rank">${opts}</select></h2>
      ${logError ? `<p class="error">${esc(logError)}</p>` : ""}
      <pre class="log" id="log">${esc(log.data)}</pre></div>`;
  document.getElementById("rank").onchange = (ev) => { logRank = Number(ev.target.value); refresh(); };
  const pre = document.getElementById("log");
  pre.scrollTop = scrollWas ?? pre.scrollHeight;
  return Date.now();
}

// ---------------------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(timer);
  const h = location.hash || "#/";
  try {
    const m = h.match(/^#\/job\/(.+)$/);
    const t = m ? await showJob(decodeURIComponent(m[1])) : await showHome();
    statusEl.textContent = "updated " + fmtTime(t);
    statusEl.className = "status";
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  } catch (e) {
    statusEl.textContent = "error: " + e.message;
    app.innerHTML = `<div class="card error" id="error">${esc(e.message)}</div>`;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  }
  timer = setTimeout(refresh, 1000);
}

window.addEventListener("hashchange", () => { logRank = 0; refresh(); });
refresh();
