"""The fleet page served at GET /fleet: one self-contained HTML document (no external assets).

It opens an EventSource on /fleet/events (passing on its own `?key=`) and redraws from
each snapshot: worker tiles (with their pool role), hottest shared prefixes, last routing
decisions, the KV transfers of recent disaggregated requests and the planner's latest
decision per model (each section shown while it has rows).
"""

from __future__ import annotations

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>kvflow fleet</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#0f1419;color:#d8dee9}
 header{display:flex;gap:1.5em;align-items:baseline;padding:.8em 1.2em;background:#1b2129}
 header h1{font-size:1.2em;margin:0} .muted{color:#8a94a3} .bad{color:#ff7b72}
 main{padding:1em 1.2em} h2{font-size:1em;margin:1.2em 0 .5em;color:#9ecbff}
 #tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.8em}
 .tile{background:#1b2129;border:1px solid #2d3640;border-radius:6px;padding:.7em}
 .tile .id{font:600 1.05em ui-monospace,monospace;color:#ffd580}
 .bar{height:8px;background:#2d3640;border-radius:4px;overflow:hidden;margin:.2em 0 .4em}
 .bar i{display:block;height:100%;background:#3fb950}
 table{border-collapse:collapse;width:100%} td,th{padding:.25em .6em;text-align:left;
 border-bottom:1px solid #2d3640;vertical-align:top} th{color:#8a94a3;font-weight:500}
 code,.mono{font-family:ui-monospace,monospace} .chosen{color:#3fb950;font-weight:600}
</style></head>
<body>
<header><h1>kvflow fleet</h1>
 <span id="summary" class="muted">connecting&hellip;</span>
 <span id="status" class="muted"></span>
 <span class="muted">updates: <span id="updates">0</span></span></header>
<main>
 <h2>Workers</h2><div id="tiles"></div>
 <h2>Hottest shared prefixes</h2>
 <table><thead><tr><th>prefix</th><th>model</th><th>tokens</th><th>hits</th><th>held by</th>
 </tr></thead><tbody id="prefixes"></tbody></table>
 <h2>Last routing decisions</h2>
 <table><thead><tr><th>time</th><th>model</th><th>request</th><th>chosen</th><th>hit rate</th>
 <th>candidates (overlap blocks / cost / active)</th></tr></thead>
 <tbody id="decisions"></tbody></table>
 <section id="transfers-section" hidden><h2>KV transfers (disaggregated requests)</h2>
 <table><thead><tr><th>time</th><th>model</th><th>request</th><th>prefill &rarr; decode</th>
 <th>backend</th><th>KiB</th><th>prefill ms</th><th>transfer ms</th><th>GB/s</th></tr></thead>
 <tbody id="transfers"></tbody></table></section>
 <section id="planner-section" hidden><h2>Planner (latest decision per model)</h2>
 <table><thead><tr><th>time</th><th>model</th><th>action</th><th>workers</th><th>reason</th>
 <th>predicted load</th><th>mode</th></tr></thead><tbody id="planner"></tbody></table></section>
</main>
<script>
"use strict";
function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid));
  return node;
}
function pct(used, total) { return total > 0 ? Math.min(100, 100 * used / total) : 0; }
function tier(name, pair) {
  const [used, total] = pair;
  if (!total) return [];
  const p = pct(used, total);
  return [el("div", {}, `KV ${name} ${used}/${total} blocks (${p.toFixed(0)}%)`),
          el("div", {class: "bar"}, el("i", {style: `width:${p}%`}))];
}
function tile(w) {
  return el("div", {class: "tile", "data-worker": w.id},
    el("div", {class: "id"}, w.id),
    el("div", {class: "muted"}, `${w.role} \\u00b7 ${w.model}`),
    ...tier("gpu", w.kv.gpu), ...tier("host", w.kv.host),
    el("div", {}, `running ${w.running} \\u00b7 waiting ${w.waiting} \\u00b7 routed ${w.routed_active}`),
    el("div", {}, `${w.tokens_per_s.toFixed(1)} tok/s \\u00b7 index ${w.index_blocks} blocks`));
}
function fleetText(f) {
  return f.prefill || f.decode ? `${f.prefill}P + ${f.decode}D` : `${f.aggregated} aggregated`;
}
function row(cells) { return el("tr", {}, ...cells.map(c => el("td", {}, c))); }
function replace(id, nodes) { document.getElementById(id).replaceChildren(...nodes); }
function render(s) {
  replace("tiles", s.workers.map(tile));
  replace("prefixes", s.prefixes.map(p => row([el("code", {}, JSON.stringify(p.preview)),
    p.model, p.tokens, p.hits, p.holders.join(", ") || "(evicted)"])));
  replace("decisions", s.decisions.map(d => row([
    new Date(d.at * 1000).toLocaleTimeString(), d.model, el("span", {class: "mono"}, d.request_id),
    el("span", {class: "chosen mono"}, d.chosen), (100 * d.hit_rate).toFixed(0) + "%",
    el("span", {class: "mono"}, d.candidates.map(c =>
      `${c.id}: ${c.overlap} / ${c.cost === null ? "-" : c.cost.toFixed(2)} / ${c.active}`
    ).join("   "))])));
  document.getElementById("transfers-section").hidden = !(s.transfers && s.transfers.length);
  replace("transfers", (s.transfers || []).map(t => row([
    new Date(t.at * 1000).toLocaleTimeString(), t.model, el("span", {class: "mono"}, t.request_id),
    el("span", {class: "mono"}, `${t.prefill_worker} \\u2192 ${t.decode_worker}`),
    t.backend || "-", (t.bytes / 1024).toFixed(1), t.prefill_ms.toFixed(1),
    t.transfer_ms.toFixed(1), t.gb_per_s === null ? "-" : t.gb_per_s.toFixed(2)])));
  document.getElementById("planner-section").hidden = !s.planner;
  replace("planner", (s.planner ? s.planner.decisions : []).map(d => row([
    new Date(d.received_at * 1000).toLocaleTimeString(), d.model || "(all)", d.action,
    el("span", {class: "mono"}, `${fleetText(d.previous)} \\u2192 ${fleetText(d.target)}`), d.reason,
    d.predicted ? `${d.predicted.rate.toFixed(2)} req/s, ISL ${d.predicted.isl.toFixed(0)}, ` +
      `OSL ${d.predicted.osl.toFixed(0)}` : "-",
    d.applied ? "applied" : "advisory"])));
  document.getElementById("summary").textContent =
    `${s.workers.length} workers \\u00b7 models: ${s.models.join(", ") || "none"}`;
  const n = document.getElementById("updates");
  n.textContent = String(Number(n.textContent) + 1);
}
const source = new EventSource("fleet/events" + location.search);
const status = document.getElementById("status");
source.onmessage = (e) => { status.textContent = "live"; status.className = "muted";
                            render(JSON.parse(e.data)); };
source.onerror = () => { status.textContent = "reconnecting\\u2026"; status.className = "bad"; };
</script>
</body></html>
"""
