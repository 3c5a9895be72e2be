"use strict";
const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("skald-token") || "";
tokenInput.addEventListener("change", () => { localStorage.setItem("skald-token", tokenInput.value); refresh(); });

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (tokenInput.value) headers["authorization"] = "Bearer " + tokenInput.value;
  const res = await fetch(path, { ...options, headers });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((body.error && body.error.message) || res.statusText);
  return body;
}
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
const pill = (s) => `<span class="pill s-${esc(s)}">${esc(s)}</span>`;
const time = (t) => t ? new Date(t).toLocaleTimeString() : "";
let selected = null, graphSaga = null;

async function loadHealth() {
  try {
    const r = await fetch("/api/v1/ready", { headers: tokenInput.value ? { authorization: "Bearer " + tokenInput.value } : {} });
    $("health").textContent = r.ok ? "ready" : "not ready";
    $("health").className = "health " + (r.ok ? "ok" : "bad");
  } catch { $("health").textContent = "down"; $("health").className = "health bad"; }
}

async function loadStats() {
  const stats = await api("/api/v1/stats");
  const bySaga = {};
  for (const c of stats.instances) (bySaga[c.saga] ??= {})[c.status] = c.count;
  // Live instances per version: an old version can go once nothing runs on it.
  const versions = {};
  for (const v of stats.live_per_version || []) (versions[v.saga] ??= []).push(`v${v.version}: ${v.live}`);
  const sagas = await api("/api/v1/sagas");
  const rows = sagas.items.map((s) => {
    const c = bySaga[s.name] || {};
    return `<tr class="clickable" data-saga="${esc(s.name)}"><td>${esc(s.name)} <span class="muted">v${s.version}</span></td>
      <td>${(c.running||0)+(c.compensating||0)+(c.waiting||0)}</td><td>${c.completed||0}</td><td>${c.compensated||0}</td><td>${c.failed||0}</td>
      <td class="live-versions">${esc((versions[s.name] || ["none"]).join(" · "))}</td></tr>`;
  });
  $("sagas").tBodies[0].innerHTML = rows.join("");
  for (const tr of $("sagas").tBodies[0].rows) tr.onclick = () => loadGraph(tr.dataset.saga);
  const select = $("f-saga");
  if (select.options.length === 1) for (const s of sagas.items) select.add(new Option(s.name, s.name));
  if (!graphSaga && sagas.items.length) loadGraph(sagas.items[0].name);
  const e = stats.engine;
  $("counts").textContent = `applied ${e.applied} · failed attempts ${e.failed_attempts} · stale ${e.stale} · malformed ${e.malformed} · in flight ${e.in_flight}`;
  drawChart(stats.throughput);
}

function drawChart(points) {
  const svg = $("chart"), w = svg.clientWidth || 500, h = 220, pad = 30;
  const max = Math.max(1, ...points.map((p) => p.steps));
  const bw = (w - pad * 2) / Math.max(15, points.length);
  let out = `<line x1="${pad}" y1="${h-pad}" x2="${w-pad}" y2="${h-pad}" stroke="#ccc"/>`;
  out += `<text x="4" y="14" fill="#6b7385">${max}/min</text>`;
  points.forEach((p, i) => {
    const x = pad + i * bw, hs = (h - pad * 2) * p.steps / max, hf = (h - pad * 2) * p.failed / max;
    out += `<rect x="${x}" y="${h-pad-hs}" width="${bw*0.8}" height="${hs}" fill="#2f6fde"><title>${p.steps} steps</title></rect>`;
    out += `<rect x="${x}" y="${h-pad-hf}" width="${bw*0.8}" height="${hf}" fill="#d64545"><title>${p.failed} failed</title></rect>`;
    out += `<text x="${x}" y="${h-10}" fill="#6b7385">${new Date(p.minute).toLocaleTimeString([], {hour:"2-digit", minute:"2-digit"})}</text>`;
  });
  if (!points.length) out += `<text x="${pad}" y="${h/2}" fill="#6b7385">no steps in the last 15 minutes</text>`;
  out += `<text x="${w-160}" y="14" fill="#2f6fde">■ steps</text><text x="${w-90}" y="14" fill="#d64545">■ failures</text>`;
  svg.innerHTML = out;
}

async function loadGraph(name) {
  graphSaga = name;
  const def = await api("/api/v1/sagas/" + encodeURIComponent(name));
  $("graph-name").textContent = name;
  const nodes = def.graph.nodes, svg = $("graph"), w = svg.clientWidth || 500;
  const step = Math.min(170, (w - 20) / Math.max(1, nodes.length)), y = 50;
  let out = `<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker>
    <marker id="c" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#d98c00"/></marker></defs>`;
  const pos = {};
  nodes.forEach((n, i) => { pos[n.id] = 10 + i * step; });
  for (const e of def.graph.edges) {
    const x1 = pos[e.from], x2 = pos[e.to], bw = step - 30;
    if (e.kind === "next") out += `<line x1="${x1+bw}" y1="${y}" x2="${x2}" y2="${y}" stroke="#555" marker-end="url(#a)"/>`;
    else out += `<path d="M${x1+bw/2},${y+18} C${x1+bw/2},${y+60} ${x2+bw/2},${y+60} ${x2+bw/2},${y+20}" fill="none" stroke="#d98c00" stroke-dasharray="4 3" marker-end="url(#c)"><title>compensate ${esc(e.to)}</title></path>`;
  }
  nodes.forEach((n) => {
    const color = n.role === "pivot" ? "#1d2330" : n.role === "retriable" ? "#1f9d55" : "#2f6fde";
    out += `<rect x="${pos[n.id]}" y="${y-18}" width="${step-30}" height="36" rx="6" fill="${color}"/>
      <text x="${pos[n.id]+8}" y="${y-2}" fill="#fff">${esc(n.id)}</text><text x="${pos[n.id]+8}" y="${y+12}" fill="#cfd5e0">${esc(n.role)}</text>`;
  });
  out += `<text x="10" y="140" fill="#6b7385">→ next step   ⇢ compensation when a later step fails</text>`;
  svg.innerHTML = out;
}

let searchQ = "";
async function loadInstances() {
  let items;
  if (searchQ) {
    // The search box: instances by instance id, aggregate id or message id.
    const found = await api("/api/v1/search?" + new URLSearchParams({ q: searchQ }));
    items = found.items.map((f) => ({ ...f.instance, matched: f.matched }));
    $("search-result").textContent = `${items.length} found for “${found.q}”`;
  } else {
    const q = new URLSearchParams({ limit: "25" });
    if ($("f-saga").value) q.set("saga", $("f-saga").value);
    if ($("f-status").value) q.set("status", $("f-status").value);
    if ($("f-aggregate").value) q.set("aggregate_id", $("f-aggregate").value);
    items = (await api("/api/v1/instances?" + q)).items;
  }
  $("instances").tBodies[0].innerHTML = items.map((i) =>
    `<tr class="clickable ${i.id === selected ? "selected" : ""}" data-id="${i.id}"><td>${pill(i.status)}${i.matched ? ` <span class="muted matched">${esc(i.matched.replace("_", " "))}</span>` : ""}</td><td>${esc(i.saga)}</td>
     <td>${esc(i.aggregate_id)}</td><td>${i.cursor.step} ${esc(i.cursor.phase)} #${i.cursor.attempt}</td><td>${time(i.created_at)}</td></tr>`).join("");
  for (const tr of $("instances").tBodies[0].rows) tr.onclick = () => select(tr.dataset.id);
}

function select(id) {
  if (selected !== id) $("action-result").textContent = "";
  selected = id;
  $("instance-actions").hidden = false;
  loadDetail(); loadInstances();
}

async function search(event) {
  event.preventDefault();
  searchQ = $("q").value.trim();
  $("search-clear").hidden = !searchQ;
  $("search-result").textContent = "";
  try { await loadInstances(); } catch (e) { $("search-result").textContent = "search refused: " + e.message; }
}

async function instanceAction(act) {
  if (!selected) return;
  try {
    const r = await api(`/api/v1/instances/${selected}/${act}`, { method: "POST", body: JSON.stringify({ by: "dashboard" }) });
    $("action-result").textContent = `${act}: ${r.outcome.replace("_", " ")}`;
    $("action-result").className = "ok-text";
    await refresh();
  } catch (e) {
    $("action-result").textContent = `${act} refused: ${e.message}`;
    $("action-result").className = "err";
  }
}

// What the service recorded of a command: its outcome and every failed try there.
function serviceSide(c) {
  const side = c.service_side;
  if (!side) return `<span class="muted">—</span>`;
  if (side.unavailable) return `<span class="err">${esc(side.unavailable)}</span>`;
  const done = side.processed ? `${esc(side.processed.outcome)} after ${side.processed.attempts} tr${side.processed.attempts === 1 ? "y" : "ies"}` : "not finished";
  const tries = side.failures.map((f) => `<li>try ${f.attempt}${f.retryable ? "" : " (fatal)"}: ${esc(f.error)}</li>`).join("");
  const letters = side.dead_letters.map((d) => `dead letter ${esc(d.reason_code)} (${esc(d.status)})`).join(", ");
  return `<div class="service-side">${done}${letters ? ` · <span class="err">${letters}</span>` : ""}${tries ? `<ul class="tries">${tries}</ul>` : ""}</div>`;
}

async function loadDetail() {
  if (!selected) return;
  const d = await api("/api/v1/instances/" + selected);
  const rows = d.timeline.map((e) => {
    const label = e.disposition === "applied"
      ? `${esc(e.step_name)} · ${esc(e.phase)} · try ${e.attempt} · ${esc(e.outcome)}` : esc(e.disposition);
    const cls = e.disposition === "applied" ? `${esc(e.phase)} ${esc(e.outcome)}` : esc(e.disposition);
    const sent = (e.sent || []).map((m) => m.command ? `→ command ${m.command.message.type} to ${m.command.service}`
      : m.dead_letter ? "→ dead-letter queue" : m.envelope.command.type === "timer" ? `→ reply timer ${m.delay_ms} ms`
      : m.delay_ms ? `→ retry in ${m.delay_ms} ms` : "→ next").join(", ");
    return `<div class="attempt"><span class="muted">${time(e.finished_at)}</span><span class="bar ${cls}">${label}</span>
      <span class="muted">${esc(sent)}</span>${e.error ? `<span class="err">${esc(e.error_kind)}: ${esc(e.error)}</span>` : ""}</div>`;
  });
  $("detail").innerHTML = `<p>${pill(d.status)} <b>${esc(d.saga)}</b> on <b>${esc(d.aggregate_id)}</b> <span class="muted">${d.id}</span></p>
    <div class="timeline">${rows.join("")}</div>
    ${d.dead_letters.length ? `<p class="err">dead letter: ${esc(d.dead_letters[0].reason)}</p>` : ""}
    ${(d.commands || []).length ? `<table class="commands"><thead><tr><th>command</th><th>service</th><th>step</th><th>status</th><th>sends</th><th>sent</th><th>answered</th><th>at the service</th></tr></thead><tbody>
      ${d.commands.map((c) => `<tr><td>${esc(c.type)}</td><td>${esc(c.service)}</td><td>${esc(c.step_name)} · ${esc(c.phase)} · try ${c.attempt}</td>
        <td>${esc(c.status)}${c.error ? ` <span class="err">${esc(c.error)}</span>` : ""}</td><td>${c.sends}</td><td>${time(c.sent_at)}</td><td>${c.answered_at ? time(c.answered_at) : ""}</td><td class="wrap">${serviceSide(c)}</td></tr>`).join("")}
      </tbody></table>` : ""}
    ${(d.replies || []).some((r) => r.disposition !== "applied") ? `<p class="muted">replies not applied: ${d.replies.filter((r) => r.disposition !== "applied").map((r) => `${esc(r.service)} ${esc(r.disposition)} ${time(r.received_at)}`).join(", ")}</p>` : ""}
    <details><summary>payload and outputs</summary><pre>${esc(JSON.stringify({payload: d.payload, outputs: d.outputs}, null, 2))}</pre></details>`;
}

async function loadDead() {
  const list = await api("/api/v1/dead-letters?limit=25");
  $("dead").tBodies[0].innerHTML = list.items.map((d) =>
    `<tr data-id="${d.id}"><td>${pill(d.status)}</td><td>${esc(d.kind)}</td><td>${esc(d.saga || "")}</td>
     <td class="wrap">${esc(d.reason)}</td><td>${time(d.created_at)}</td>
     <td><button data-act="inspect">inspect</button>
     ${d.status === "pending" ? `<button class="primary" data-act="replay">replay</button> <button class="danger" data-act="discard">discard</button>` : ""}</td></tr>`).join("");
  for (const tr of $("dead").tBodies[0].rows) for (const b of tr.querySelectorAll("button")) b.onclick = () => deadAction(tr.dataset.id, b.dataset.act, list.items.find((d) => d.id === tr.dataset.id));
}

async function deadAction(id, act, letter) {
  try {
    if (act === "inspect") { $("dead-body").hidden = false; $("dead-body").textContent = JSON.stringify({body: letter.body, history: letter.history, resolution: letter.resolution}, null, 2); return; }
    await api(`/api/v1/dead-letters/${id}/${act}`, { method: "POST", body: JSON.stringify({ by: "dashboard" }) });
    await refresh();
  } catch (e) { alert(act + " failed: " + e.message); }
}

// The participant services' dead letters (SKALD_SERVICE_DATABASES), beside skald's.
async function loadServiceDead() {
  const services = (await api("/api/v1/services")).items;
  $("service-dead").hidden = !services.length;
  const rows = [];
  for (const svc of services) {
    let list;
    try { list = await api(`/api/v1/services/${encodeURIComponent(svc.name)}/dead-letters?limit=25`); }
    catch (e) { rows.push(`<tr><td>${esc(svc.name)}</td><td colspan="7" class="err">${esc(e.message)}</td></tr>`); continue; }
    for (const d of list.items) {
      const history = (d.errors || []).map((e) => `<li>try ${e.attempt} ${time(e.at)}: ${esc(e.message)}</li>`).join("");
      rows.push(`<tr data-service="${esc(svc.name)}" data-id="${d.id}"><td>${esc(svc.name)}</td><td>${pill(d.status)}</td>
        <td class="wrap">${esc(d.reason_code)}: ${esc(d.reason)}</td><td>${esc(d.type || "")}</td><td>${esc(d.aggregate_id || "")}</td>
        <td class="wrap">${history ? `<ul class="tries">${history}</ul>` : `<span class="muted">none</span>`}</td><td>${time(d.created_at)}</td>
        <td>${d.status === "pending" ? `<button class="primary" data-act="replay">replay</button> <button class="danger" data-act="discard">discard</button>` : esc(d.resolved_by || "")}</td></tr>`);
    }
  }
  $("service-letters").tBodies[0].innerHTML = rows.join("");
  for (const tr of $("service-letters").tBodies[0].rows) for (const b of tr.querySelectorAll("button")) b.onclick = () => serviceDeadAction(tr.dataset.service, tr.dataset.id, b.dataset.act);
}

async function serviceDeadAction(service, id, act) {
  try {
    const r = await api(`/api/v1/services/${encodeURIComponent(service)}/dead-letters/${id}/${act}`, { method: "POST", body: JSON.stringify({ by: "dashboard" }) });
    $("service-dead-result").textContent = `${service}: ${r.status}`;
    await refresh();
  } catch (e) { $("service-dead-result").textContent = `${act} refused: ${e.message}`; }
}

async function loadGroups() {
  const groups = await api("/api/v1/failure-groups");
  $("groups").tBodies[0].innerHTML = groups.items.map((g) =>
    `<tr data-id="${g.id}"><td>${esc(g.saga)}</td><td>${esc(g.step || "")} <span class="muted">${esc(g.phase || "")}</span></td>
     <td>${esc(g.code || "")}</td><td class="wrap" title="${esc(g.example)}">${esc(g.message)}</td>
     <td>${g.attempts}</td><td>${g.instances}</td><td>${g.dead_letters}</td><td>${time(g.first_seen)}</td><td>${time(g.last_seen)}</td>
     <td><button class="primary" data-act="retry">retry group</button>
     ${g.dead_letters ? `<button class="danger" data-act="discard">discard dead letters</button>` : ""}</td></tr>`).join("");
  for (const tr of $("groups").tBodies[0].rows) for (const b of tr.querySelectorAll("button")) b.onclick = () => groupAction(tr.dataset.id, b.dataset.act);
}

async function groupAction(id, act) {
  try {
    const r = await api(`/api/v1/failure-groups/${id}/${act}`, { method: "POST", body: JSON.stringify({ by: "dashboard" }) });
    $("group-result").textContent = `${act}: ${r.done.length} done, ${r.skipped.length} skipped`;
    await refresh();
  } catch (e) { alert(act + " failed: " + e.message); }
}

async function refresh() {
  try { await Promise.all([loadHealth(), loadStats(), loadInstances(), loadGroups(), loadDead(), loadServiceDead(), loadDetail()]); }
  catch (e) { $("counts").textContent = "error: " + e.message; }
}
for (const id of ["f-saga", "f-status", "f-aggregate"]) $(id).addEventListener("change", loadInstances);
$("search").addEventListener("submit", search);
$("search-clear").addEventListener("click", () => { $("q").value = ""; $("search").requestSubmit(); });
for (const b of $("instance-actions").querySelectorAll("button")) b.addEventListener("click", () => instanceAction(b.dataset.act));
refresh();
setInterval(refresh, 2000);
