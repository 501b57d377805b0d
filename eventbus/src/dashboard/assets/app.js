// AMOSKYS dashboard: renders the pages from /api/ and keeps them current.
// Data only ever reaches the DOM through textContent, never as markup.
"use strict";

const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff7b72", "#a5d6ff"];
const app = document.getElementById("app");
const timers = [];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  if (Array.isArray(body.missing_shards)) partial(body.missing_shards);
  return body;
}

// A sharded bus answers with what the shards that answered hold; the banner
// says which did not, so a short list is not mistaken for the whole fleet.
function partial(missing) {
  const b = document.getElementById("partial");
  if (!b) return;
  b.hidden = missing.length === 0;
  b.textContent = missing.length ? `Partial results: shard${missing.length > 1 ? "s" : ""} ${missing.join(", ")} did not answer; what ${missing.length > 1 ? "they hold" : "it holds"} is missing.` : "";
}

function every(ms, f) { f(); timers.push(setInterval(f, ms)); }

const fmt = {
  n(v) { return v === undefined || v === null ? "–" : Number(v).toLocaleString("en-US"); },
  rate(v) { return v === undefined || v === null ? "–" : (v >= 100 ? Math.round(v) : Number(v).toFixed(1)).toLocaleString("en-US"); },
  bytes(v) {
    if (!v) return "0 B";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v) + " " + u[i];
  },
  ago(ms) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + "s ago"; if (s < 3600) return Math.round(s / 60) + "m ago";
    if (s < 86400) return Math.round(s / 3600) + "h ago"; return Math.round(s / 86400) + "d ago";
  },
  dur(s) {
    if (s <= 0) return "expired";
    if (s < 3600) return Math.round(s / 60) + " min"; if (s < 86400) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " days";
  },
};

function card(k, v, id) { return el("div", { class: "card" }, el("div", { class: "v", id }, v), el("div", { class: "k" }, k)); }

// A line chart of one or more series over shared times, as SVG.
function chart(t, series, unit) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("viewBox", "0 0 600 180"); svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...series.flatMap(s => s.values));
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1, span = Math.max(1, t1 - t0);
  series.forEach((s, i) => {
    if (!s.values.length) return;
    const p = document.createElementNS(ns, "polyline");
    p.setAttribute("fill", "none"); p.setAttribute("stroke", COLORS[i % COLORS.length]); p.setAttribute("stroke-width", "1.5");
    p.setAttribute("points", s.values.map((v, j) => `${((t[j] - t0) / span * 590 + 5).toFixed(1)},${(170 - v / max * 155).toFixed(1)}`).join(" "));
    svg.append(p);
  });
  // The caption is HTML: text inside a stretched SVG would be distorted.
  const caption = t.length < 2 ? "collecting samples…" : `max ${fmt.rate(max)} ${unit} · last ${Math.max(1, Math.round(span / 60000))} min`;
  const legend = el("div", { class: "legend" }, series.map((s, i) => el("span", { style: `color:${COLORS[i % COLORS.length]}` }, "■ " + s.name)),
    el("span", { class: "muted" }, caption));
  return el("div", {}, svg, legend);
}

function phaseBadge(p, why) { return el("span", { class: "phase phase-" + p, title: why || "" }, p); }

function eventRow(e, onclick) {
  return el("tr", { class: "clickable", "data-offset": e.offset, "data-collector": e.collector, "data-agent": e.agent_id, onclick },
    el("td", { class: "num" }, e.offset), el("td", {}, e.observed_at.replace("T", " ").replace("Z", "")),
    el("td", {}, e.agent_id), el("td", { class: "collector" }, e.collector), el("td", { class: "sev-" + e.severity }, e.severity),
    el("td", { class: "summary", title: e.summary }, e.summary));
}

function eventTable(id) {
  return el("table", { id }, el("thead", {}, el("tr", {}, ["Offset", "Observed", "Agent", "Collector", "Severity", "Summary"].map(h => el("th", {}, h)))), el("tbody"));
}

// ---- Overview -------------------------------------------------------------

function overview() {
  const cards = el("div", { class: "cards" });
  const charts = el("div");
  const alerts = eventTable("alerts");
  app.replaceChildren(el("h1", {}, "Overview"), cards, el("h2", {}, "Events per second, last 15 minutes"), charts,
    el("h2", {}, "Recent alerts"), alerts);
  every(5000, async () => {
    const o = await api("/api/overview");
    const phases = Object.entries(o.agents_by_phase).map(([p, n]) => `${p} ${n}`).join(" · ");
    const cert = o.certificate;
    cards.replaceChildren(
      card("events/s (all collectors)", fmt.rate(o.eps), "eps"),
      card("events stored", fmt.n(o.events_stored), "stored"),
      card("WAL on disk", fmt.bytes(o.wal_bytes), "wal"),
      card(`agents: ${phases}`, fmt.n(o.agents_total), "agents-total"),
      card(`bus certificate ${cert.serial.slice(0, 12)}… expires`, fmt.dur(cert.expires_in_seconds), "cert"),
      card(`WAL ${o.writable ? "writable" : "NOT writable"} · sync ${o.sync_policy}`, o.version, "version"),
      ...(o.backup ? [backupCard(o.backup)] : []),
      ...Object.entries(o.eps_by_collector).map(([c, v]) => card(`${c} events/s`, fmt.rate(v))));
    const series = [{ name: "total", values: o.series.total }].concat(
      Object.entries(o.series.by_collector).map(([name, values]) => ({ name, values })));
    charts.replaceChildren(chart(o.series.t, series, "events/s"));
    alerts.tBodies[0].replaceChildren(...(o.recent_alerts.length ? o.recent_alerts.map(e => eventRow(e, () => showEvent(e.offset, e.shard))) :
      [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No alerts."))]));
  });
}

function backupCard(b) {
  const failed = b.errors ? ` · ${fmt.n(b.errors)} failed` : "";
  if (b.running) return card(`backup running${failed}`, "…", "backup");
  const label = `last backup · ${fmt.n(b.count)} kept` + (b.newest_bytes ? ` · ${fmt.bytes(b.newest_bytes)}` : "") + failed;
  return card(label, b.newest_at ? fmt.ago(b.newest_at) : "none yet", "backup");
}

// ---- Agents ---------------------------------------------------------------

function collectorsText(cs) {
  return cs.map(c => `${c.name}: ${c.paused ? "paused" : c.mode}`).join(", ");
}

function agents() {
  const table = el("table", { id: "agents" }, el("thead", {}, el("tr", {},
    ["Agent", "Node", "Shard", "Phase", "Events/s", "Spool", "Dropped", "Last seen", "Collectors (mode)", "Version"].map(h => el("th", {}, h)))), el("tbody"));
  app.replaceChildren(el("h1", {}, "Agents"), table);
  every(2000, async () => {
    const { agents } = await api("/api/agents");
    table.tBodies[0].replaceChildren(...(agents.length ? agents.map(a => el("tr", { "data-agent": a.agent_id },
      el("td", {}, el("a", { href: "/agent?id=" + encodeURIComponent(a.agent_id) }, a.agent_id)),
      el("td", {}, a.node), el("td", { class: "num" }, String(a.shard)), el("td", { class: "phase-cell" }, phaseBadge(a.phase, a.phase_reason)),
      el("td", { class: "num" }, fmt.rate(a.eps)), el("td", { class: "num" }, fmt.bytes(a.spool_bytes)),
      el("td", { class: "num" + (a.dropped ? " bad" : "") }, fmt.n(a.dropped)), el("td", {}, fmt.ago(a.last_seen)),
      el("td", {}, collectorsText(a.collectors)), el("td", {}, a.version))) :
      [el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No agent has published yet."))]));
  });
}

// ---- One agent, with control ----------------------------------------------

function agentPage() {
  const id = new URLSearchParams(location.search).get("id") || "";
  const head = el("div", { class: "cards" });
  const charts = el("div");
  const coll = el("table", { id: "collectors" }, el("thead", {}, el("tr", {},
    ["Collector", "Mode", "Interval (ms)", "Produced", "Errors", "Last error", "Control"].map(h => el("th", {}, h)))), el("tbody"));
  const result = el("p", { id: "control-result", class: "muted" }, "");
  app.replaceChildren(el("h1", {}, "Agent ", el("span", { id: "agent-id" }, id)), head, el("h2", {}, "Counters over time"), charts,
    el("h2", {}, "Collectors"), coll, result);
  let waiting = null; // control_id we wait the agent to confirm
  const rows = new Map();

  async function send(collector, action, interval_ms) {
    result.className = "muted";
    result.textContent = `sending ${action} to ${collector}…`;
    try {
      const r = await api("/api/control", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ agent_id: id, collector, action, interval_ms: interval_ms || 0 }) });
      if (!r.delivered) { result.className = "bad"; result.textContent = `not delivered: ${r.message}`; return; }
      waiting = r.control_id;
      result.textContent = `control #${r.control_id} (${action} ${collector}) sent; waiting for the agent to confirm…`;
    } catch (e) { result.className = "bad"; result.textContent = "refused: " + e.message; }
  }

  every(1000, async () => {
    const a = await api("/api/agent?id=" + encodeURIComponent(id));
    head.replaceChildren(
      el("div", { class: "card" }, el("div", { class: "v", id: "agent-phase" }, phaseBadge(a.phase, a.phase_reason)), el("div", { class: "k" }, a.phase_reason)),
      card("events/s", fmt.rate(a.eps)), card("events stored", fmt.n(a.events)), card("spool", fmt.bytes(a.spool_bytes)),
      card("dropped", fmt.n(a.dropped)), card("last seen", fmt.ago(a.last_seen)),
      card(`node ${a.node} · cert ${a.cert_serial.slice(0, 12)}`, a.version),
      // Which life of the agent publishes: a wiped spool starts a new one; a
      // second host with the same id is refused, and loss is named here.
      el("div", { class: "card", id: "agent-incarnation" },
        el("div", { class: "v" }, a.incarnation.slice(0, 8) + (a.incarnations > 1 ? ` (#${fmt.n(a.incarnations)})` : "")),
        el("div", { class: "k" }, ["incarnation since " + fmt.ago(a.incarnation_started),
          a.previous_unacked ? `${fmt.n(a.previous_unacked)} lost with the previous spool` : "",
          a.bus_lost ? `${fmt.n(a.bus_lost)} acked events the bus no longer holds` : ""].filter(Boolean).join(" · "))),
      ...(a.refused_streams ? [el("div", { class: "card bad", id: "agent-refused", title: a.last_refusal },
        el("div", { class: "v" }, fmt.n(a.refused_streams)), el("div", { class: "k" }, "streams refused: another agent uses this id"))] : []));
    charts.replaceChildren(chart(a.series.t, [{ name: "events/s stored", values: a.series.eps }], "events/s"),
      chart(a.series.t, [{ name: "spool bytes", values: a.series.spool_bytes }], "bytes"));
    // Rows are made once and updated in place, so a button being clicked or
    // an interval being typed is never replaced under the user.
    for (const c of a.collectors) {
      let row = rows.get(c.name);
      if (!row) {
        const interval = el("input", { type: "number", min: "1", class: "interval", size: 6 });
        row = { mode: el("td", { class: "mode" }), iv: el("td", { class: "num" }), produced: el("td", { class: "num" }),
                errors: el("td", { class: "num" }), last: el("td"), interval };
        coll.tBodies[0].append(el("tr", { "data-collector": c.name }, el("td", {}, c.name), row.mode, row.iv, row.produced, row.errors, row.last,
          el("td", {},
            el("button", { class: "pause", onclick: () => send(c.name, "pause") }, "Pause"), " ",
            el("button", { class: "resume", onclick: () => send(c.name, "resume") }, "Resume"), " ",
            interval, " ",
            el("button", { class: "set-interval", onclick: () => send(c.name, "set_interval", Number(interval.value)) }, "Set interval"))));
        rows.set(c.name, row);
      }
      row.mode.textContent = c.paused ? "paused" : c.mode;
      row.iv.textContent = c.interval_ms || "–";
      row.produced.textContent = fmt.n(c.produced);
      row.errors.textContent = fmt.n(c.errors);
      row.last.textContent = c.last_error;
    }
    const lc = a.last_control;
    if (waiting !== null && lc && lc.control_id >= waiting) {
      result.className = lc.ok ? "ok" : "bad";
      result.textContent = `agent confirmed control #${lc.control_id}: ${lc.ok ? "applied" : "refused"} — ${lc.message}`;
      waiting = null;
    }
  });
}

// ---- Events: live tail and search ------------------------------------------

async function showEvent(offset, shard) {
  const pre = document.getElementById("event-detail");
  const e = await api("/api/event?offset=" + offset + (shard ? "&shard=" + shard : ""));
  if (pre) pre.textContent = JSON.stringify(e, null, 2);
  else alert(JSON.stringify(e, null, 2));
}

function filterInputs() {
  return {
    collector: el("input", { id: "f-collector", placeholder: "collector(s), comma-separated", size: 22 }),
    agent: el("input", { id: "f-agent", placeholder: "agent id(s)", size: 18 }),
    severity: el("select", { id: "f-severity" }, ["", "debug", "info", "notice", "warning", "error", "critical"].map(s => el("option", { value: s }, s ? "≥ " + s : "any severity"))),
    text: el("input", { id: "f-text", placeholder: "text", size: 16 }),
  };
}

function filterQuery(f) {
  const q = new URLSearchParams();
  for (const [k, input] of Object.entries(f)) if (input.value.trim()) q.set(k, input.value.trim());
  return q;
}

function events() {
  const f = filterInputs();
  const from = el("input", { id: "s-from", type: "datetime-local", step: "1" });
  const to = el("input", { id: "s-to", type: "datetime-local", step: "1" });
  const tail = eventTable("tail");
  const results = eventTable("results");
  const status = el("span", { id: "tail-status", class: "muted" }, "connecting…");
  const toggle = el("button", { id: "tail-toggle" }, "Pause view");
  const older = el("button", { id: "older", disabled: "" }, "Older →");
  const searchInfo = el("span", { id: "search-info", class: "muted" });
  const detail = el("pre", { id: "event-detail" }, "Click an event for its full detail.");
  const ago = new Date(Date.now() - 15 * 60000);
  const local = d => new Date(d - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  from.value = local(ago); // "to" empty: up to now, whenever Search is pressed

  app.replaceChildren(el("h1", {}, "Events"),
    el("div", { class: "filters" }, f.collector, f.agent, f.severity, f.text, el("button", { id: "apply", onclick: () => { openTail(); } }, "Apply filter")),
    el("div", { class: "split" },
      el("div", {}, el("h2", {}, "Live tail ", toggle, " ", status), el("div", { class: "tail-box" }, tail),
        el("h2", {}, "Search"), el("div", { class: "filters" }, "from", from, "to", to,
          el("button", { id: "search", onclick: () => search(null) }, "Search"), older, searchInfo), results),
      el("div", {}, el("h2", {}, "Detail"), detail)));

  let source = null, paused = false, held = 0;
  const MAX_ROWS = 200;
  function openTail() {
    if (source) source.close();
    tail.tBodies[0].replaceChildren();
    held = 0;
    source = new EventSource("/api/tail?" + filterQuery(f).toString());
    source.addEventListener("events", m => {
      const batch = JSON.parse(m.data);
      if (paused) { held += batch.length; status.textContent = `view paused · ${held} new events not shown`; return; }
      const body = tail.tBodies[0];
      for (const e of batch) body.prepend(eventRow(e, () => showEvent(e.offset, e.shard)));
      while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
    });
    source.addEventListener("status", m => {
      const s = JSON.parse(m.data);
      partial(s.missing_shards || []);
      if (paused) return;
      const skipped = s.skipped_rate_cap + s.skipped_slow_viewer;
      status.textContent = `live · ${fmt.n(s.sent)} shown` + (skipped || s.lagged_groups ?
        ` · sampling: ${fmt.n(skipped)} not shown (cap ${s.max_events_per_second}/s per viewer${s.skipped_slow_viewer ? ", slow connection" : ""})` : "");
    });
    source.onerror = () => { status.textContent = "disconnected; retrying…"; };
  }
  toggle.addEventListener("click", () => {
    paused = !paused; toggle.textContent = paused ? "Resume view" : "Pause view";
    if (!paused) { held = 0; status.textContent = "live"; }
    else status.textContent = "view paused";
  });

  let cursor = null;
  async function search(before) {
    const q = filterQuery(f);
    const iso = v => v ? new Date(v).toISOString() : "";
    if (from.value) q.set("from", iso(from.value));
    if (to.value) q.set("to", iso(to.value));
    if (before !== null) q.set("before", before);
    q.set("limit", "50");
    try {
      const r = await api("/api/events?" + q.toString());
      results.tBodies[0].replaceChildren(...r.events.map(e => eventRow(e, () => showEvent(e.offset, e.shard))));
      cursor = r.next_before;
      older.disabled = cursor === null;
      searchInfo.className = "muted";
      searchInfo.textContent = `${r.events.length} events (newest first, scanned ${fmt.n(r.scanned)})` + (cursor === null ? " · end of range" : "");
    } catch (e) { searchInfo.className = "bad"; searchInfo.textContent = e.message; }
  }
  older.addEventListener("click", () => { if (cursor !== null) search(cursor); });
  openTail();
  // An alert's link (Alertmanager's generatorURL, the webhook's link) opens
  // its event: /events?shard=S&offset=O.
  const linked = new URLSearchParams(location.search);
  if (linked.get("offset")) showEvent(linked.get("offset"), linked.get("shard"));
  // The Alerts page's "around it": one agent's events in a time range.
  if (linked.get("agent") || linked.get("from")) {
    if (linked.get("agent")) f.agent.value = linked.get("agent");
    if (linked.get("from")) from.value = local(new Date(linked.get("from")));
    if (linked.get("to")) to.value = local(new Date(linked.get("to")));
    search(null);
  }
}

// ---- Alerts ----------------------------------------------------------------

// The detector's alerts: facets (severity, rule, namespace) narrow the
// table; each alert links to its source event and to what the same agent
// sent around it.
function alerts() {
  const linked = new URLSearchParams(location.search);
  const sel = { since: linked.get("since") || "24h", severity: linked.get("severity") || "", rule: linked.get("rule") || "", namespace: linked.get("namespace") || "", open: linked.get("open") || "" };
  const since = el("select", { id: "a-since" }, ["1h", "24h", "7d"].map(s => el("option", { value: s }, "last " + s)));
  since.value = sel.since;
  const openOnly = el("input", { id: "a-open", type: "checkbox" });
  openOnly.checked = sel.open === "true";
  const facets = el("div", { id: "a-facets", class: "facets" });
  const info = el("span", { id: "a-info", class: "muted" });
  const table = el("table", { id: "alerts-table" }, el("thead", {}, el("tr", {}, ["Last seen", "Severity", "Rule", "Count", "Namespace / pod", "Node", "Summary", ""].map(h => el("th", {}, h)))), el("tbody"));
  const detail = el("pre", { id: "alert-detail" }, "Click an alert for its source event.");
  app.replaceChildren(el("h1", {}, "Alerts"),
    el("div", { class: "filters" }, since, el("label", {}, openOnly, " open only"), info), facets,
    el("div", { class: "split" }, el("div", {}, table), el("div", {}, el("h2", {}, "Source event"), detail)));
  since.addEventListener("change", () => { sel.since = since.value; load(); });
  openOnly.addEventListener("change", () => { sel.open = openOnly.checked ? "true" : ""; load(); });

  function chip(facet, value, n) {
    // Node-level alerts have no namespace: counted, not a filter.
    if (!value) return el("button", { class: "chip", "data-facet": facet, "data-value": value, disabled: "" }, `(none) ${n}`);
    const on = sel[facet] === value;
    return el("button", { class: "chip" + (on ? " on" : ""), "data-facet": facet, "data-value": value,
      onclick: () => { sel[facet] = on ? "" : value; load(); } }, `${value} ${n}`);
  }
  async function load() {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(sel)) if (v) q.set(k, v);
    history.replaceState(null, "", "/alerts?" + q.toString());
    try {
      const r = await api("/api/alerts?" + q.toString());
      const order = ["critical", "error", "warning", "notice", "info", "debug"];
      facets.replaceChildren(...["severity", "rule", "namespace"].map(f => {
        const entries = Object.entries(r.facets[f] || {});
        if (f === "severity") entries.sort((a, b) => order.indexOf(a[0]) - order.indexOf(b[0]));
        else entries.sort((a, b) => b[1] - a[1]);
        return el("div", { class: "facet" }, el("span", { class: "muted" }, f + ": "), entries.map(([v, n]) => chip(f, v, n)));
      }));
      table.tBodies[0].replaceChildren(...r.alerts.map(a => {
        const t = new Date(a.last_seen).toISOString();
        const around = new URLSearchParams({ agent: a.source.agent,
          from: new Date(a.last_seen - 60000).toISOString(), to: new Date(a.last_seen + 60000).toISOString() });
        return el("tr", { class: "clickable" + (a.open ? " open" : ""), "data-rule": a.rule, onclick: () => showSource(a) },
          el("td", {}, t.replace("T", " ").replace(/\.\d+Z$/, "")),
          el("td", { class: "sev-" + a.severity }, a.severity),
          el("td", {}, a.rule), el("td", { class: "num" }, a.count),
          el("td", {}, a.namespace ? `${a.namespace}/${a.pod}` : "–"), el("td", {}, a.node),
          el("td", { class: "summary", title: a.summary }, a.summary),
          el("td", {}, el("a", { href: `/events?shard=${a.source.shard}&offset=${a.source.offset}`, onclick: ev => ev.stopPropagation() }, "event"), " · ",
            el("a", { href: "/events?" + around.toString(), class: "neighbours", onclick: ev => ev.stopPropagation() }, "around it")));
      }));
      info.className = "muted";
      info.textContent = `${r.alerts.length} alert${r.alerts.length === 1 ? "" : "s"} since ${r.from.replace("T", " ").replace(/\.\d+Z$/, "")}` +
        ` · open: a match in the last ${fmt.dur(r.open_for_seconds)}` + (r.truncated ? " · only the newest 5,000 alert events were read" : "");
    } catch (e) { info.className = "bad"; info.textContent = e.message; }
  }
  async function showSource(a) {
    try { detail.textContent = JSON.stringify(await api(`/api/event?shard=${a.source.shard}&offset=${a.source.offset}`), null, 2); }
    catch (e) { detail.textContent = e.message; }
  }
  every(10000, load);
}

// ---- Router ----------------------------------------------------------------

const pages = { "/": overview, "/agents": agents, "/agent": agentPage, "/events": events, "/alerts": alerts };
for (const a of document.querySelectorAll("[data-nav]")) {
  if (a.dataset.nav === location.pathname || (location.pathname === "/agent" && a.dataset.nav === "/agents")) a.classList.add("active");
}
(pages[location.pathname] || overview)();
window.addEventListener("unhandledrejection", ev => {
  const c = document.getElementById("conn");
  if (c) c.textContent = "⚠ " + (ev.reason && ev.reason.message || ev.reason);
});
