//! The status page: one HTML document that reads `status` and calls the
//! admin endpoints (relative paths, so it works wherever it is mounted).
//! The token is kept in the tab's session storage, never in the page.

pub(super) const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kontext</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:20px;margin:0 0 .3em} h2{font-size:16px;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} .ok{color:#176b2c} .bad{color:#b00020} .held{color:#a15c00;font-weight:bold}
button{margin:0 2px} #msg{margin:.5em 0;min-height:1.2em} code{font-size:12px} td.payload code{word-break:break-all}
</style></head><body>
<h1>kontext</h1>
<div id="health"></div>
<div><label>Admin token <input id="token" type="password" size="24"></label>
<label>Operator <input id="operator" size="12" value="page"></label></div>
<div id="msg"></div>
<h2>Consumed types</h2>
<table id="types"><thead><tr><th>type</th><th>topic</th><th>service</th><th>buffer</th><th>handled</th><th>handled/s</th><th>failed</th><th>dead letters</th><th>state</th><th>actions</th></tr></thead><tbody></tbody></table>
<h2>Poll services</h2>
<table id="services"><thead><tr><th>service</th><th>group</th><th>state</th><th>assigned</th><th>paused</th><th>held</th></tr></thead><tbody></tbody></table>
<h2>Partitions</h2>
<table id="partitions"><thead><tr><th>service</th><th>group</th><th>partition</th><th>committed</th><th>end</th><th>lag</th><th>state</th></tr></thead><tbody></tbody></table>
<h2>Topics</h2>
<table id="topics"><thead><tr><th>topic</th><th>partitions</th><th></th></tr></thead><tbody></tbody></table>
<h2>Recent messages <span id="recent-topic"></span></h2>
<table id="messages"><thead><tr><th>partition/offset</th><th>time</th><th>key</th><th>type</th><th>headers</th><th>payload</th></tr></thead><tbody></tbody></table>
<h2>Outbox</h2><div id="outbox"></div>
<h2>Configuration</h2>
<table id="config"><thead><tr><th>service</th><th>setting</th><th>value</th></tr></thead><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
// Relative to where the router is mounted, with or without a final slash.
const base = location.pathname.endsWith('/') ? '' : location.pathname.split('/').pop() + '/';
$('token').value = sessionStorage.getItem('kontext-token') || '';
$('token').addEventListener('change', () => sessionStorage.setItem('kontext-token', $('token').value));
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const parts = (l) => l.map((p) => p.topic + '/' + p.partition).join(', ');
async function admin(path, body) {
  const r = await fetch(base + 'admin/' + path, {method: 'POST', headers: {'content-type': 'application/json',
    'authorization': 'Bearer ' + $('token').value, 'x-kontext-operator': $('operator').value}, body: JSON.stringify(body)});
  const text = await r.text();
  $('msg').textContent = path + ': ' + r.status + ' ' + text;
  $('msg').className = r.ok ? 'ok' : 'bad';
  refresh();
}
function seek(type) {
  const to = prompt('Seek ' + type + ' to: beginning, end, an offset, or a time (ms since epoch, prefixed t)', 'beginning');
  if (!to) return;
  let target = to;
  if (/^t\d+$/.test(to)) target = {timestamp: Number(to.slice(1))};
  else if (/^\d+$/.test(to)) target = {offset: Number(to)};
  admin('seek', {type, to: target});
}
async function refresh() {
  const s = await (await fetch(base + 'status')).json();
  $('health').innerHTML = '<span class="' + (s.live && s.ready ? 'ok' : 'bad') + '">live: ' + s.live + ', ready: ' + s.ready +
    '</span> ' + esc(s.health.reasons.join('; ')) + (s.admin ? '' : ' <em>(admin endpoints off)</em>');
  $('types').tBodies[0].innerHTML = s.types.map((t) => '<tr data-type="' + esc(t.type) + '"><td>' + esc(t.type) + '</td><td>' + esc(t.topic) +
    '</td><td>' + esc(t.service) + '</td><td class="buffer">' + t.buffered + '/' + t.capacity + '</td><td class="handled">' + t.handled + '</td><td class="rate">' + esc(t.handled_per_s ?? '') + '</td><td>' + t.failed +
    '</td><td class="dead">' + t.dead_lettered + '</td><td class="state">' + (t.held ? '<span class="held">paused</span>' : (t.paused ? 'backpressure' : 'flowing')) +
    '</td><td><button class="pause">pause</button><button class="resume">resume</button><button class="seek">seek</button>' +
    '<button class="replay" data-dlt="' + esc(t.dead_letter_topic) + '">replay dead letters</button></td></tr>').join('');
  $('services').tBodies[0].innerHTML = s.services.map((v) => '<tr><td>' + esc(v.name) + '</td><td>' + esc(v.group) + '</td><td>' + esc(v.state) +
    '</td><td class="assigned">' + esc(parts(v.assigned)) + '</td><td>' + esc(parts(v.paused)) + '</td><td>' + esc(parts(v.held)) + '</td></tr>').join('');
  $('partitions').tBodies[0].innerHTML = s.services.flatMap((v) => v.partitions.map((p) => '<tr><td>' + esc(v.name) + '</td><td>' + esc(v.group) +
    '</td><td>' + esc(p.topic + '/' + p.partition) + '</td><td>' + esc(p.committed) + '</td><td>' + esc(p.end) + '</td><td>' + esc(p.lag) +
    '</td><td>' + (p.held ? 'paused by operator' : (p.paused ? 'paused' : 'flowing')) + '</td></tr>')).join('');
  const dead = [...new Set(s.types.map((t) => t.dead_letter_topic))].filter((d) => !s.topics.some((t) => t.name === d));
  $('topics').tBodies[0].innerHTML = s.topics.map((t) => [t.name, t.partitions]).concat(dead.map((d) => [d, 'dead letters']))
    .map(([name, p]) => '<tr data-topic="' + esc(name) + '"><td>' + esc(name) + '</td><td>' + esc(p) +
    '</td><td><button class="recent">recent messages</button></td></tr>').join('');
  $('outbox').textContent = s.outbox ? ('pending: ' + s.outbox.pending + ', failed: ' + s.outbox.failed) : 'no outbox in this process';
  // The client settings (secrets redacted by kontext) change only with a
  // restart: drawn once.
  if (!$('config').tBodies[0].rows.length) {
    $('config').tBodies[0].innerHTML = s.services.flatMap((v) => v.settings.map(([k, val]) => '<tr><td>' + esc(v.name) +
      '</td><td><code>' + esc(k) + '</code></td><td><code>' + esc(val) + '</code></td></tr>')).join('');
  }
  window.kontextRefreshes = (window.kontextRefreshes || 0) + 1;
}
// One listener, reading names from data attributes (escaped as HTML, never
// spliced into script).
$('types').addEventListener('click', (e) => {
  const button = e.target.closest('button');
  const row = e.target.closest('tr[data-type]');
  if (!button || !row) return;
  const type = row.dataset.type;
  if (button.classList.contains('pause')) admin('pause', {type});
  else if (button.classList.contains('resume')) admin('resume', {type});
  else if (button.classList.contains('seek')) seek(type);
  else if (button.classList.contains('replay')) admin('replay', {dead_letter_topic: button.dataset.dlt, type});
});
async function recent(topic) {
  const r = await fetch(base + 'admin/messages?limit=10&topic=' + encodeURIComponent(topic),
    {headers: {'authorization': 'Bearer ' + $('token').value, 'x-kontext-operator': $('operator').value}});
  const body = await r.json();
  if (!r.ok) { $('msg').textContent = 'recent messages: ' + r.status + ' ' + JSON.stringify(body); $('msg').className = 'bad'; return; }
  $('recent-topic').textContent = 'of ' + topic;
  $('messages').tBodies[0].innerHTML = body.records.map((m) => '<tr><td>' + m.partition + '/' + m.offset + '</td><td>' +
    esc(m.timestamp_ms == null ? '' : new Date(m.timestamp_ms).toISOString()) + '</td><td>' + esc(m.key) + '</td><td>' + esc(m.message_type) +
    '</td><td><code>' + esc(m.headers.map(([k, v]) => k + '=' + v).join('\n')).replace(/\n/g, '<br>') + '</code></td><td class="payload"><code>' +
    esc(m.value == null ? '(' + m.not_decoded + ', ' + m.bytes + ' bytes)' : JSON.stringify(m.value)) + '</code></td></tr>').join('');
}
$('topics').addEventListener('click', (e) => {
  const row = e.target.closest('tr[data-topic]');
  if (e.target.closest('button.recent') && row) recent(row.dataset.topic);
});
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;
