// meshlet dashboard: reads the supervisor's admin API (same origin) and stays live
// through a long poll of GET /v1/events (each answer refreshes status and endpoints);
// a timer refreshes status too, for ages. Every text is set with textContent: event
// texts and an app's last lines are data, never markup.
"use strict";

const POLL_WAIT = "25s";
const KEEP_EVENTS = 500;
const state = { status: null, endpoints: null, events: [], last: null, pending: null };

function $(sel) { return document.querySelector(sel); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function api(path, options) {
  const r = await fetch(path, options);
  let body = {};
  try { body = await r.json(); } catch (e) { body = {}; }
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor(s % 86400 / 3600)).padStart(2, "0")}h`;
}

function clock(at) {
  return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
}

function setConn(live) {
  const c = $("#conn");
  c.dataset.state = live ? "live" : "down";
  c.textContent = live ? "live" : "reconnecting…";
}

function show(text, kind) {
  const m = $("#message");
  m.textContent = text;
  m.className = kind || "";
  m.hidden = false;
}

function replace(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "muted", text: empty }))]));
}

// ---------------------------------------------------------------- services

function revisionCell(s) {
  const r = s.rollout || {};
  const rev = r.revision || s.revision;
  if (!rev) return el("td", { class: "muted", text: "-" });
  return el("td", {}, r.number ? el("span", { "data-testid": `number-${s.name}`, text: `#${r.number} ` }) : null,
    el("span", { class: "mono", "data-dynamic": true, "data-testid": `revision-${s.name}`, text: rev.slice(0, 12) }));
}

function rolloutCell(s) {
  const r = s.rollout;
  const td = el("td", { "data-testid": `rollout-${s.name}` });
  if (!r) { td.append(el("span", { class: "muted", text: "-" })); return td; }
  const cls = { complete: "ok", progressing: "warn", reverting: "warn", paused: "warn", failed: "bad" }[r.phase] || "";
  if (typeof r.updated === "number" && r.replicas) {
    td.append(el("progress", { max: r.replicas, value: Math.min(r.updated, r.replicas) }));
  }
  td.append(el("span", { class: cls, "data-testid": `phase-${s.name}`, text: r.phase }));
  if (r.progress) td.append(" ", el("span", { "data-testid": `progress-${s.name}`, text: r.progress }));
  if (r.summary && r.phase !== "complete") td.append(el("div", { class: "muted", text: r.summary }));
  else if (r.pause_requested && r.phase !== "paused") td.append(el("div", { class: "warn", text: "paused: the next rollout waits" }));
  return td;
}

function actionButtons(s) {
  const r = s.rollout || {};
  const paused = r.phase === "paused" || r.pause_requested === true;
  const td = el("td", { class: "actions" });
  if (!s.desired && !s.revision) return td;
  const b = (action, label) => el("button", { type: "button", "data-action": action, "data-service": s.name,
    onclick: () => ask(action, s), text: label });
  td.append(b("rollback", "Rollback"), b("restart", "Restart"),
    paused ? b("resume", "Resume") : b("pause", "Pause"), b("scale", "Scale"));
  return td;
}

function renderServices() {
  const services = state.status.services || [];
  const rows = services.map((s) => el("tr", { "data-service": s.name },
    el("td", { text: s.name }),
    el("td", { class: s.ready === s.desired ? "ok" : "warn", "data-testid": `ready-${s.name}`, text: `${s.ready}/${s.desired}` }),
    revisionCell(s), rolloutCell(s),
    el("td", { class: s.problem ? "bad" : "muted", text: s.problem || "" }),
    actionButtons(s)));
  replace($("#services tbody"), rows, "no services: apply some (meshlet apply -f FILE)", 6);
  const filter = $("#event-filter");
  const want = ["", ...services.map((s) => s.name)];
  const have = [...filter.options].map((o) => o.value);
  if (want.join("\n") !== have.join("\n")) {
    const keep = filter.value;
    filter.replaceChildren(...want.map((n) => el("option", { value: n, text: n || "all services" })));
    filter.value = want.includes(keep) ? keep : "";
  }
}

// ---------------------------------------------------------------- replicas and nodes

function lastFailure(s, inst) {
  const exits = (s.last_exits || []).filter((e) => e.slot === inst.slot && e.code !== 0);
  const e = exits[exits.length - 1];
  if (!e) return "";
  const line = [...(e.lines || [])].reverse().find((l) => l.trim()) || "";
  const code = e.code === null ? "exited" : `exited with code ${e.code}`;
  return `${code} at ${clock(e.at)}` + (line ? `: ${line}` : "");
}

function renderReplicas() {
  const rows = [];
  for (const s of state.status.services || []) {
    for (const i of s.instances || []) {
      const cls = i.ready ? "ok" : i.state === "exited" || i.state === "failed" ? "bad" : "warn";
      rows.push(el("tr", { "data-instance": i.id },
        el("td", { class: "mono", "data-dynamic": true, text: i.id }), el("td", { text: s.name }),
        el("td", { class: "num", text: i.slot }), el("td", { text: i.node }),
        el("td", { class: "mono", "data-dynamic": true, text: i.address }),
        el("td", { class: cls, text: i.state + (i.exit_code !== null && i.exit_code !== undefined ? ` (${i.exit_code})` : "") }),
        el("td", { class: "num", text: i.restarts }), el("td", { "data-dynamic": true, text: age(i.age) }),
        el("td", { class: "mono", "data-dynamic": true, text: (i.revision || "-").slice(0, 12) }),
        el("td", { class: "muted", "data-dynamic": true, text: lastFailure(s, i) })));
    }
  }
  replace($("#replicas tbody"), rows, "no replicas", 10);
}

function share(used, room, memory) {
  const f = (x) => memory ? `${(x / 1048576).toFixed(0)}Mi` : `${+x.toFixed(3)}`;
  return room === null || room === undefined ? `${f(used)} (unbounded)` : `${f(used)} of ${f(room)}`;
}

function renderNodes() {
  const rows = (state.status.nodes || []).map((n) => {
    let st = n.state || "ready";
    if (n.draining) st += ",draining"; else if (n.cordoned) st += ",cordoned";
    const a = n.allocated || {}, room = n.room || {};
    return el("tr", { "data-node": n.name }, el("td", { text: n.name }),
      el("td", { class: n.state === "ready" ? (n.cordoned ? "warn" : "ok") : "bad", "data-testid": `node-${n.name}`, text: st }),
      el("td", { text: n.runtime }), el("td", { class: "mono", text: n.address }),
      el("td", { class: "num", "data-dynamic": true, text: a.replicas ?? 0 }),
      el("td", { "data-dynamic": true, text: share(a.cpu || 0, room.cpu, false) }),
      el("td", { "data-dynamic": true, text: share(a.memory || 0, room.memory, true) }));
  });
  replace($("#nodes tbody"), rows, "no nodes", 7);
}

function renderEndpoints() {
  const doc = state.endpoints;
  if (!doc) return;
  const rows = (doc.services || []).map((s) => {
    const dns = s.dns_problem ? s.dns_problem
      : s.dns.filter((d) => d.status === "passing").map((d) => `${d.address}:${d.port}`).join(", ") || "none";
    const proxies = (s.proxies || []).map((p) => p.error ? `${p.proxy}: ${p.error}`
      : `${p.proxy}: ` + (p.endpoints.map((e) => `${e.address}:${e.port}${e.ejected ? " (ejected)" : ""}`).join(", ") || "none"));
    return el("tr", { "data-endpoints": s.service }, el("td", { text: s.service }),
      el("td", { class: "mono", text: s.dns_name }), el("td", { class: "mono", text: s.vip || "-" }),
      el("td", { class: "mono", "data-dynamic": true, text: dns }),
      el("td", { class: "mono", "data-dynamic": true }, ...(proxies.length ? proxies.map((t) => el("div", { text: t }))
        : [el("span", { class: "muted", text: "no proxy known to the supervisor" })])));
  });
  replace($("#endpoints tbody"), rows, "no services", 5);
}

// ---------------------------------------------------------------- events

function renderEvents() {
  const only = $("#event-filter").value;
  const shown = state.events.filter((e) => !only || e.service === only).slice(-200).reverse();
  $("#events").replaceChildren(...shown.map((e) => el("li", { "data-kind": e.kind, "data-seq": e.seq },
    el("time", { text: clock(e.at) }), el("span", { class: "kind", text: e.kind }), e.text)));
}

async function follow() {
  for (;;) {
    try {
      const q = state.last === null ? "limit=200" : `since=${state.last}&wait=${POLL_WAIT}&limit=${KEEP_EVENTS}`;
      const doc = await api(`/v1/events?${q}`);
      setConn(true);
      if (state.last !== null && doc.last < state.last) state.events = [];   // numbered anew
      state.last = doc.last;
      if (doc.events.length) {
        state.events.push(...doc.events);
        state.events = state.events.slice(-KEEP_EVENTS);
        renderEvents();
        refreshSoon();
      }
    } catch (e) {
      setConn(false);
      await new Promise((ok) => setTimeout(ok, 1000));
    }
  }
}

// ---------------------------------------------------------------- refresh

async function refresh() {
  try {
    state.status = await api("/v1/status");
    renderServices(); renderReplicas(); renderNodes();
    $("#updated").textContent = `updated ${clock(state.status.now)}`;
    state.endpoints = await api("/v1/endpoints");
    renderEndpoints();
  } catch (e) {
    setConn(false);
  }
}

function refreshSoon() {
  if (state.pending) return;
  state.pending = setTimeout(() => { state.pending = null; refresh(); }, 100);
}

// ---------------------------------------------------------------- actions

const QUESTIONS = {
  rollback: (s) => `Roll ${s} back to its last complete revision?`,
  restart: (s) => `Replace every replica of ${s}, one at a time?`,
  pause: (s) => `Pause the rollout of ${s} where it is?`,
  resume: (s) => `Resume the rollout of ${s}?`,
  scale: (s) => `Set the number of replicas of ${s}:`,
};

function ask(action, s) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = QUESTIONS[action](s.name);
  $("#scale-field").hidden = action !== "scale";
  $("#scale-input").value = String(s.desired);
  dialog.dataset.action = action;
  dialog.dataset.service = s.name;
  dialog.returnValue = "";
  dialog.showModal();
}

$("#confirm").addEventListener("close", async () => {
  const dialog = $("#confirm");
  if (dialog.returnValue !== "ok") return;
  const { action, service } = dialog.dataset;
  const body = {};
  if (action === "scale") {
    const text = $("#scale-input").value.trim();
    body.replicas = /^-?\d+$/.test(text) ? Number(text) : text;
  }
  try {
    const doc = await api(`/v1/services/${encodeURIComponent(service)}/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    show(doc.message, "info");
  } catch (e) {
    show(`${action} ${service}: ${e.message}`);
  }
  refreshSoon();
});

$("#event-filter").addEventListener("change", renderEvents);
refresh();
setInterval(refresh, 3000);
follow();
