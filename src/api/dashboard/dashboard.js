// Kiln's dashboard. Every value from the server is put into the page as text
// (textContent), never parsed as HTML: log lines, Dockerfile text, references and
// messages are written by users.
"use strict";

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function fillBody(table, rows, empty, columns) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = el("td", empty, "muted");
    td.colSpan = columns;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const r of rows) body.appendChild(r);
}

function statusPill(status) {
  return el("span", status, "pill status-" + status.replace(/[^a-z_]/g, ""));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  const m = Math.floor(seconds / 60);
  if (m < 60) return m + " min " + Math.floor(seconds % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function rate(hits, misses) {
  const total = hits + misses;
  return total === 0 ? "–" : (100 * hits / total).toFixed(1) + " %";
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}

// ---- the index page -------------------------------------------------------------------

async function refreshBuilds() {
  const builds = await getJson("/api/builds");
  const rows = builds.map((b) => {
    const link = el("a", b.id);
    link.href = "/builds/" + encodeURIComponent(b.id);
    return row([statusPill(b.status), link, b.source, b.ref, when(b.started_at_ms), duration(b.duration_s), b.message]);
  });
  fillBody(document.getElementById("builds"), rows, "no builds yet", 7);
}

async function refreshOverview() {
  const o = await getJson("/api/overview");
  const health = document.getElementById("health");
  health.textContent = o.healthy ? "healthy" : "unhealthy";
  health.className = "pill status-" + (o.healthy ? "healthy" : "unhealthy");
  fillBody(document.getElementById("actors"),
    o.actors.map((a) => row([a.name, a.kind, a.restarts, a.mailbox])), "the actors do not answer", 4);
  fillBody(document.getElementById("caches"), [
    row(["resolver", o.cache_entries.resolver, o.resolver.hit, o.resolver.miss, rate(o.resolver.hit, o.resolver.miss)]),
    row(["steps (layers)", o.cache_entries.layer_store + " layers", o.step_cache.hit, o.step_cache.miss,
      rate(o.step_cache.hit, o.step_cache.miss)]),
    row(["plan", o.cache_entries.plan, "", "", ""]),
  ], "", 5);
}

async function refreshStorage() {
  const response = await fetch("/metrics", { cache: "no-store" });
  const text = response.ok ? await response.text() : "";
  const rows = text.split("\n")
    .filter((line) => line.startsWith("kiln_storage_"))
    .map((line) => {
      const cut = line.lastIndexOf(" ");
      return row([line.slice(0, cut), line.slice(cut + 1)]);
    });
  fillBody(document.getElementById("storage"), rows,
    "this Kiln exports no storage metrics (kiln_storage_bytes, kiln_storage_budget_bytes)", 2);
}

async function indexLoop() {
  for (;;) {
    try {
      await Promise.all([refreshBuilds(), refreshOverview(), refreshStorage()]);
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("updated").textContent = String(e.message || e);
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---- the build page -------------------------------------------------------------------

// The engine's line after each step: "[<stage> <n>/<steps>] <instruction> (<time>s|cached)".
const STEP_LINE = /^\[([^\]\n]*?) (\d+)\/(\d+)\] (.*) \((cached|\d+(?:\.\d+)?s)\)$/;

function drawTimeline(logText) {
  const steps = [];
  for (const line of logText.split("\n")) {
    const m = STEP_LINE.exec(line);
    if (m) {
      const cached = m[5] === "cached";
      steps.push({ label: "[" + m[1] + " " + m[2] + "/" + m[3] + "] " + m[4], cached,
        seconds: cached ? 0 : parseFloat(m[5]) });
    }
  }
  const timeline = document.getElementById("timeline");
  if (steps.length === 0) return;
  const longest = Math.max(0.001, ...steps.map((s) => s.seconds));
  timeline.replaceChildren();
  for (const s of steps) {
    const line = el("div", null, "step");
    const label = el("span", s.label, "label");
    label.title = s.label;
    const bar = el("div", null, "bar" + (s.cached ? " cached" : ""));
    bar.style.width = (s.cached ? 0 : (100 * s.seconds / longest)) + "%";
    const track = el("div");
    track.appendChild(bar);
    line.append(label, track, el("span", s.cached ? "cached" : s.seconds.toFixed(2) + " s", "note"));
    timeline.appendChild(line);
  }
  // FROM is no cacheable step: its image is pulled or found, never built.
  const cacheable = steps.filter((s) => !/^\[[^\]]*\] FROM /.test(s.label));
  const cached = cacheable.filter((s) => s.cached).length;
  document.getElementById("cache-hits").textContent = cached + " of " + cacheable.length;
}

function showBuild(b) {
  document.title = "Kiln build " + b.id;
  document.getElementById("build-id").textContent = b.id;
  const status = document.getElementById("status");
  status.textContent = b.status;
  status.className = "pill status-" + b.status.replace(/[^a-z_]/g, "");
  document.getElementById("source").textContent = b.source;
  document.getElementById("ref").textContent = b.ref;
  document.getElementById("base-ref").textContent = b.base_ref;
  document.getElementById("started").textContent = when(b.started_at_ms);
  document.getElementById("duration").textContent = duration(b.duration_s);
  document.getElementById("message").textContent = b.message;
  const history = document.getElementById("history");
  history.replaceChildren(...b.history.map((u) => el("li", u.status + ": " + u.message)));
}

async function buildLoop() {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const api = "/api/builds/" + encodeURIComponent(id);
  const log = document.getElementById("log");
  const state = document.getElementById("log-state");
  let offset = 0;
  let text = "";
  let lastInfo = 0;
  for (;;) {
    try {
      if (Date.now() - lastInfo > 2000) {
        showBuild(await getJson(api));
        lastInfo = Date.now();
      }
      const chunk = await getJson(api + "/log?offset=" + offset);
      if (chunk.text.length > 0) {
        const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.appendChild(document.createTextNode(chunk.text));
        text += chunk.text;
        drawTimeline(text);
        if (follow) log.scrollTop = log.scrollHeight;
      }
      offset = chunk.next;
      if (chunk.ended) {
        state.textContent = "(complete)";
        showBuild(await getJson(api));
        return;
      }
      state.textContent = "(following)";
      // A breath between requests: fewer, larger chunks while a build writes fast.
      await new Promise((r) => setTimeout(r, 250));
    } catch (e) {
      state.textContent = "(" + String(e.message || e) + ")";
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

if (document.body.dataset.page === "index") indexLoop();
if (document.body.dataset.page === "build") buildLoop();
