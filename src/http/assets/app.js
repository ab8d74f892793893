// The dashboard's page: one live view of the stack, fed by server-sent events (/api/events).
// Signing in trades the token for a dashboard session, kept in sessionStorage (this scheme,
// host and port only) and sent as a header; the token itself is never stored. Everything the
// stack sends is put on the page as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const SESSION = "dspy-agent-session";
let session = sessionStorage.getItem(SESSION);
let tasks = new Map(); // task_id -> task, the rows on screen
let logStream = null;
let events = null;

class SignedOut extends Error {}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function duration(seconds) {
  if (seconds == null) return "-";
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${Math.round(seconds % 60)}s`;
  return `${Math.floor(seconds / 3600)}h${Math.floor((seconds % 3600) / 60)}m`;
}

function bytes(n) {
  if (n == null) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ms(seconds) {
  return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
}

// A call of the dashboard's API with this page's session; a refused session signs out.
async function call(method, url, body) {
  const headers = session ? { "X-Dspy-Agent-Session": session } : {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(url, {
    method, headers, credentials: "omit", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) {
    signedOut("");
    throw new SignedOut();
  }
  if (!r.ok) throw new Error(await r.text());
  return r;
}

// A stream of server-sent events: an EventSource cannot send a header, so it opens with a
// one-use ticket, and asks for a new one whenever it has to connect again.
function stream(url, handlers, onState) {
  let source = null;
  let closed = false;
  const open = async () => {
    if (closed) return;
    let ticket;
    try {
      ticket = (await (await call("POST", "/api/tickets")).json()).ticket;
    } catch (e) {
      if (!(e instanceof SignedOut)) setTimeout(open, 2000);
      return;
    }
    if (closed) return;
    source = new EventSource(`${url}?ticket=${encodeURIComponent(ticket)}`);
    source.addEventListener("open", () => onState && onState(true));
    source.addEventListener("error", () => {
      onState && onState(false);
      source.close();
      setTimeout(open, 1000);
    });
    for (const [name, f] of Object.entries(handlers)) source.addEventListener(name, f);
  };
  open();
  return { close: () => { closed = true; if (source) source.close(); } };
}

// ---- services -------------------------------------------------------------------------------

function renderServices(services) {
  const body = $("services").tBodies[0];
  body.replaceChildren();
  for (const s of services) {
    const health = s.healthy ? "healthy" : s.phase;
    body.append(el("tr", { "data-service": s.name },
      el("td", {}, s.name, s.stand_in ? el("span", { class: "muted" }, " (stand-in)") : ""),
      el("td", { class: s.state || s.phase }, s.state || s.phase),
      el("td", { class: `state ${health}`, title: s.message }, health),
      el("td", {}, s.ports.join(", ")),
      el("td", {}, String(s.restarts)),
      el("td", {}, duration(s.uptime_s)),
      el("td", {}, s.cpu_percent == null ? "-" : `${s.cpu_percent.toFixed(1)}%`),
      el("td", {}, bytes(s.memory_bytes)),
      el("td", {},
        el("button", { onclick: () => showLogs(s.name) }, "logs"), " ",
        el("button", { class: "restart", onclick: () => restart(s.name) }, "restart")),
    ));
    for (const r of s.replicas) {
      body.append(el("tr", { class: "replica" },
        el("td", {}, `  ${s.name}.${r.slot}`), el("td", { class: r.state }, r.state),
        el("td", {}, r.error || ""), el("td", {}, `@${r.node}`),
        el("td", {}), el("td", {}), el("td", {}), el("td", {}), el("td", {})));
    }
  }
}

async function restart(name) {
  await call("POST", `/api/services/${encodeURIComponent(name)}/restart`);
}

async function showLogs(name) {
  if (logStream) logStream.close();
  $("logs").hidden = false;
  $("logs-title").textContent = `${name}: live output`;
  const text = $("logs-text");
  text.textContent = "";
  logStream = stream(`/api/services/${encodeURIComponent(name)}/logs/stream`, {
    log: (e) => {
      text.textContent += e.data + "\n";
      text.scrollTop = text.scrollHeight;
    },
  });
}

$("logs-close").addEventListener("click", () => {
  if (logStream) logStream.close();
  logStream = null;
  $("logs").hidden = true;
});

// ---- tasks ----------------------------------------------------------------------------------

function renderCounts(counts) {
  $("counts").replaceChildren(...Object.entries(counts).map(([state, n]) =>
    el("span", { class: state, "data-state": state }, `${state} ${n}`)));
}

function renderTypes(types) {
  const select = $("filter-type");
  const chosen = select.value;
  const have = new Set([...select.options].map((o) => o.value));
  for (const t of types) if (!have.has(t)) select.append(el("option", {}, t));
  select.value = chosen;
}

function matchesFilter(t) {
  const state = $("filter-state").value;
  const type = $("filter-type").value;
  return (!state || t.state === state) && (!type || t.task_type === type);
}

function taskRow(t) {
  const run = t.started_at_ms && t.finished_at_ms ? ms((t.finished_at_ms - t.started_at_ms) / 1000) : "-";
  const actions = [];
  if (t.state === "PENDING" || t.state === "RUNNING") {
    actions.push(el("button", { class: "cancel", onclick: (e) => { e.stopPropagation(); act(t, "cancel"); } }, "cancel"));
  }
  if (t.state === "FAILED" || t.state === "CANCELLED") {
    actions.push(el("button", { class: "retry", onclick: (e) => { e.stopPropagation(); act(t, "retry"); } }, "retry"));
  }
  return el("tr", { "data-task": t.task_id, onclick: () => showTask(t.task_id) },
    el("td", {}, t.task_id), el("td", {}, t.task_type),
    el("td", { class: `state ${t.state}` }, t.state), el("td", {}, String(t.attempt)),
    el("td", {}, new Date(t.created_at_ms).toLocaleTimeString()), el("td", {}, run),
    el("td", {}, ...actions));
}

function renderTasks() {
  const rows = [...tasks.values()].filter(matchesFilter)
    .sort((a, b) => b.created_at_ms - a.created_at_ms).slice(0, 50);
  $("tasks").tBodies[0].replaceChildren(...rows.map(taskRow));
}

async function loadTasks() {
  const q = new URLSearchParams({ state: $("filter-state").value, type: $("filter-type").value, limit: "50" });
  const r = await call("GET", `/api/tasks?${q}`);
  tasks = new Map((await r.json()).map((t) => [t.task_id, t]));
  renderTasks();
}

async function act(t, action) {
  const r = await call("POST", `/api/tasks/${encodeURIComponent(t.task_id)}/${action}`);
  const updated = await r.json();
  tasks.set(updated.task_id, updated);
  renderTasks();
}

async function showTask(id) {
  const t = await (await call("GET", `/api/tasks/${encodeURIComponent(id)}`)).json();
  $("detail").hidden = false;
  $("detail-title").textContent = t.task_id;
  const when = (v) => (v ? new Date(v).toLocaleString() : "-");
  const fields = [
    ["type", t.task_type], ["state", t.state], ["attempt", `${t.attempt} of ${t.max_retries + 1}`],
    ["priority", t.priority], ["timeout", t.timeout_ms ? `${t.timeout_ms} ms` : "none"],
    ["created", when(t.created_at_ms)], ["started", when(t.started_at_ms)], ["finished", when(t.finished_at_ms)],
    ["payload", bytes(t.payload_bytes)], ["error", t.error || "-"],
    ["result", t.result_preview == null ? "-" : t.result_preview],
    ["metadata", JSON.stringify(t.metadata)],
  ];
  $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

$("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
$("filter-state").addEventListener("change", loadTasks);
$("filter-type").addEventListener("change", loadTasks);

// ---- activity -------------------------------------------------------------------------------

function renderThroughput(points) {
  const svg = $("throughput");
  const max = Math.max(1, ...points.map((p) => p.per_second));
  const step = points.length > 1 ? 360 / (points.length - 1) : 360;
  const line = points.map((p, i) => `${(i * step).toFixed(1)},${(78 - (p.per_second / max) * 74).toFixed(1)}`).join(" ");
  const polyline = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  for (const [k, v] of [["fill", "none"], ["stroke", "#2f5fb3"], ["stroke-width", "1.5"], ["points", line]]) {
    polyline.setAttribute(k, v);
  }
  svg.replaceChildren(...(points.length ? [polyline] : []));
  const last = points[points.length - 1];
  $("throughput-now").textContent = last
    ? `${last.per_second.toFixed(1)} tasks/s now, ${max.toFixed(1)}/s at most over the last ${Math.round(points.length * 5 / 60)} min`
    : "measured every 5 s";
}

function renderRunTimes(byType) {
  $("run-times").tBodies[0].replaceChildren(...Object.entries(byType).map(([type, q]) =>
    el("tr", {}, el("td", {}, type), el("td", {}, String(q.count)), el("td", {}, ms(q.p50)),
      el("td", {}, ms(q.p95)), el("td", {}, ms(q.p99)))));
}

function renderWorkers(workers) {
  const body = $("workers").tBodies[0];
  if (!workers.length) {
    body.replaceChildren(el("tr", {}, el("td", { class: "muted", colspan: "4" }, "no remote worker connected")));
    return;
  }
  body.replaceChildren(...workers.map((w) => el("tr", {}, el("td", {}, w.name),
    el("td", {}, w.task_types.join(", ")), el("td", {}, String(w.running)), el("td", {}, String(w.capacity)))));
}

// ---- live -----------------------------------------------------------------------------------

function render(state) {
  renderServices(state.services);
  renderCounts(state.tasks);
  renderTypes(state.task_types);
  renderThroughput(state.throughput);
  renderRunTimes(state.run_seconds);
  renderWorkers(state.workers);
}

function connect() {
  events = stream("/api/events", {
    state: (e) => render(JSON.parse(e.data)),
    tasks: (e) => {
      for (const t of JSON.parse(e.data)) tasks.set(t.task_id, t);
      renderTasks();
    },
  }, (up) => {
    $("live").textContent = up ? "live" : "reconnecting…";
    $("live").className = up ? "badge live" : "badge down";
  });
}

// ---- signing in and out ---------------------------------------------------------------------

function signedOut(message) {
  session = null;
  sessionStorage.removeItem(SESSION);
  for (const s of [events, logStream]) if (s) s.close();
  events = logStream = null;
  $("dashboard").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

async function signIn(token) {
  const r = await fetch("/api/session", {
    method: "POST", credentials: "omit", cache: "no-store",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }),
  });
  const answer = await r.json().catch(() => ({ error: `the stack answered ${r.status}` }));
  if (!r.ok) return answer.error;
  session = answer.session;
  sessionStorage.setItem(SESSION, session);
  return null;
}

function signedIn() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  loadTasks().catch(() => {});
  connect();
}

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const field = $("token");
  const error = await signIn(field.value.trim());
  field.value = "";
  if (error) signedOut(error);
  else signedIn();
});

$("sign-out").addEventListener("click", async () => {
  await call("DELETE", "/api/session").catch(() => {});
  signedOut("");
});

// A stack that asks for no token signs the page in at once; otherwise a session kept from
// before this load is tried, else the form is shown.
(async () => {
  if (!session && (await signIn(""))) {
    signedOut("");
    return;
  }
  try {
    await call("GET", "/api/state");
    signedIn();
  } catch (e) {
    if (!(e instanceof SignedOut)) signedOut(String(e));
  }
})();
