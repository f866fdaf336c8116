// Towalink web UI: the fleet map and table, a node's page, activation with a canary.
// Served by `tlm serve` on its operator listener; talks only to the operator API with the
// bearer token the operator logs in with (kept in this tab's sessionStorage). Everything a
// node or the directory says is put in the page as text (textContent), never as markup.
'use strict';

const POLL_MS = 2000;
const TOKEN_KEY = 'towalink-token';
const STATES = ['up', 'degraded', 'down', 'unknown'];
let timer = null;

function el(tag, attributes, ...children) {
  const svg = ['svg', 'line', 'circle', 'text', 'g'].includes(tag);
  const node = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, body) {
  const headers = { Authorization: 'Bearer ' + token() };
  const options = { headers };
  if (body !== undefined) {
    options.method = 'POST';
    headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const reply = await response.json().catch(() => ({}));
  if (response.status === 401) {
    logout(reply.error || 'the token was refused');
    throw new Error(reply.error || 'unauthorized');
  }
  if (!response.ok) throw new Error((reply.error || 'HTTP ' + response.status) + (reply.hint ? ' (' + reply.hint + ')' : ''));
  return reply;
}

function show(...children) {
  const main = document.getElementById('main');
  main.replaceChildren(...children);
}

function logout(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer) clearTimeout(timer);
  document.getElementById('nav').hidden = true;
  const error = el('p', { class: 'error', id: 'login-error' }, reason || '');
  const input = el('input', { id: 'token', type: 'password', autocomplete: 'off', placeholder: 'tlo_…', required: true });
  const form = el('form', {
    id: 'login',
    onsubmit: async (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try {
        await api('/api/v1/sites');
        route();
      } catch (e) {
        error.textContent = e.message;
      }
    },
  },
  el('h2', {}, 'Log in'),
  el('p', { class: 'muted' }, 'An operator API token (tlm token add NAME --file FILE).'),
  input, el('p', {}, el('button', { type: 'submit', id: 'login-submit' }, 'Log in')), error);
  show(form);
}

function version(v) { return v === null || v === undefined ? '-' : 'v' + v; }

function age(seconds) {
  if (seconds === null || seconds === undefined) return 'never';
  if (seconds < 120) return seconds + 's';
  if (seconds < 7200) return Math.floor(seconds / 60) + 'm';
  if (seconds < 172800) return Math.floor(seconds / 3600) + 'h' + Math.floor((seconds % 3600) / 60) + 'm';
  return Math.floor(seconds / 86400) + 'd';
}

// One end of a link: its tunnel, its BFD sessions on the link's interface, its BGP
// sessions to the peer (the default template names them peer<id>_v4/_v6).
function endState(node, iface, peerId) {
  if (!node || !node.reachable) return 'unknown';
  const tunnel = (node.tunnels || []).find((t) => t.interface === iface);
  const bfd = (node.bfd || []).filter((s) => s.interface === iface);
  const bgp = (node.bgp || []).filter((s) => s.name.startsWith('peer' + peerId + '_'));
  const heard = tunnel && tunnel.last_rx_age_s !== null && tunnel.last_rx_age_s < 30;
  const established = bgp.filter((s) => s.info.startsWith('Established')).length;
  if (!heard || bfd.some((s) => s.state !== 'Up') || (bgp.length && !established)) return 'down';
  if (established < bgp.length) return 'degraded';
  return 'up';
}

function linkState(link, byName) {
  const a = byName[link.a];
  const b = byName[link.b];
  const ends = [
    endState(a, link.a_interface, b && b.id),
    endState(b, link.b_interface, a && a.id),
  ];
  for (const state of ['down', 'degraded', 'unknown']) if (ends.includes(state)) return state;
  return 'up';
}

function drawMap(nodes, links) {
  const width = 1000;
  const height = 460;
  const sites = [...new Set(nodes.map((n) => n.node.split('.').slice(1).join('.')))];
  const position = {};
  sites.forEach((site, i) => {
    const angle = (2 * Math.PI * i) / Math.max(sites.length, 1) - Math.PI / 2;
    const radius = sites.length > 1 ? 170 : 0;
    const cx = width / 2 + radius * 1.9 * Math.cos(angle);
    const cy = height / 2 + radius * Math.sin(angle);
    const members = nodes.filter((n) => n.node.split('.').slice(1).join('.') === site);
    members.forEach((n, j) => {
      const offset = (j - (members.length - 1) / 2) * 70;
      position[n.node] = { x: cx + offset, y: cy, site, first: j === 0 };
    });
  });
  const byName = Object.fromEntries(nodes.map((n) => [n.node, n]));
  const svg = el('svg', { id: 'map', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'topology map' });
  for (const link of links) {
    const a = position[link.a];
    const b = position[link.b];
    if (!a || !b) continue;
    const state = linkState(link, byName);
    svg.append(el('line', {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y, 'data-link': link.a + '--' + link.b, 'data-state': state,
    }, el('title', {}, `${link.a} ↔ ${link.b}: ${state}`)));
  }
  for (const n of nodes) {
    const p = position[n.node];
    const group = el('g', { 'data-node': n.node });
    group.append(el('circle', { cx: p.x, cy: p.y, r: 18, 'data-reachable': String(!!n.reachable) }));
    group.append(el('text', {
      x: p.x, y: p.y + 34, class: 'node', onclick: () => { location.hash = '#/node/' + encodeURIComponent(n.node); },
    }, n.node));
    if (p.first) group.append(el('text', { class: 'site', x: p.x, y: p.y - 28 }, 'site ' + p.site));
    svg.append(group);
  }
  return svg;
}

function legend() {
  return el('p', { class: 'legend muted' }, STATES.map((s) =>
    el('span', {}, el('i', { class: 'legend-' + s }), s)));
}

function fleetTable(nodes) {
  const head = ['Node', 'Reachable', 'Last seen', 'Active', 'State', 'Desired', 'Latest', 'Uptime', 'Last rollback'];
  return el('table', { id: 'fleet' },
    el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
    el('tbody', {}, nodes.map((n) => el('tr', { 'data-node': n.node },
      el('td', {}, el('a', { href: '#/node/' + encodeURIComponent(n.node) }, n.node)),
      el('td', { class: n.reachable ? 'yes' : 'no' }, n.reachable ? 'yes' : 'no'),
      el('td', {}, n.last_seen_age_s === null ? 'never' : age(n.last_seen_age_s) + ' ago'),
      el('td', {}, version(n.active_version)),
      el('td', {}, n.state || '-'),
      el('td', {}, version(n.desired_version)),
      el('td', {}, version(n.latest_version)),
      el('td', {}, n.uptime_s === null ? '-' : age(n.uptime_s)),
      el('td', {}, n.last_rollback
        ? `${version(n.last_rollback.from_version)} → ${version(n.last_rollback.to_version)}: ${n.last_rollback.reason}`
        : '-')))));
}

function activationForm(preset) {
  const output = el('pre', { id: 'activate-output', hidden: true });
  const field = (label, input) => el('label', {}, label, input);
  const scope = el('select', { name: 'scope' }, ['all', 'site', 'node'].map((s) =>
    el('option', { value: s, selected: s === (preset ? 'node' : 'all') }, s)));
  const target = el('input', { name: 'target', placeholder: 'site or node', value: preset || '' });
  const versionInput = el('input', { name: 'version', type: 'number', min: 1, placeholder: 'latest' });
  const canary = el('input', { name: 'canary', placeholder: 'node or site first' });
  const confirm = el('input', { name: 'confirm', type: 'number', min: 1, placeholder: 'seconds' });
  const button = el('button', { type: 'submit', id: 'activate-submit' }, 'Activate');
  const form = el('form', {
    class: 'inline',
    id: 'activate',
    onsubmit: async (event) => {
      event.preventDefault();
      const request = { scope: scope.value, wait_blessed: true, timeout: 120 };
      if (scope.value !== 'all') request.target = target.value.trim();
      if (versionInput.value) request.version = Number(versionInput.value);
      if (canary.value.trim()) request.canary = canary.value.trim();
      if (confirm.value) request.confirm = Number(confirm.value);
      button.disabled = true;
      output.hidden = false;
      output.textContent = 'activating…';
      try {
        const reply = await api('/api/v1/activate', request);
        output.textContent = reply.output;
        output.dataset.ok = String(reply.ok);
      } catch (e) {
        output.textContent = e.message;
        output.dataset.ok = 'false';
      } finally {
        button.disabled = false;
      }
    },
  },
  field('Scope', scope), field('Site or node', target), field('Version', versionInput),
  field('Canary', canary), field('Confirm within (s)', confirm), button);
  return el('section', {}, el('h2', {}, 'Activate'), form, output);
}

async function fleetView() {
  const mapSection = el('section', {}, el('h2', {}, 'Topology'), el('p', { class: 'muted' }, 'loading…'));
  const tableSection = el('section', {}, el('h2', {}, 'Fleet'));
  show(mapSection, tableSection, activationForm(null));
  const refresh = async () => {
    try {
      const [status, links] = await Promise.all([api('/api/v1/status'), api('/api/v1/links')]);
      mapSection.replaceChildren(el('h2', {}, 'Topology'), drawMap(status.nodes, links), legend());
      tableSection.replaceChildren(el('h2', {}, 'Fleet'),
        el('p', { class: 'muted' }, status.service ? `controller service: running (pid ${status.service.pid})` : 'controller service: not running'),
        fleetTable(status.nodes));
      document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    } catch (e) {
      if (token()) tableSection.append(el('p', { class: 'error' }, e.message));
    }
    if (token() && location.hash.replace(/^#\/?/, '') === '') timer = setTimeout(refresh, POLL_MS);
  };
  await refresh();
}

function diffView(text) {
  return el('pre', { class: 'diff' }, text.split('\n').map((line) => el('span', {
    class: line.startsWith('+') && !line.startsWith('+++') ? 'diff-add' : line.startsWith('-') && !line.startsWith('---') ? 'diff-del' : null,
  }, line + '\n')));
}

async function nodeView(name) {
  const path = '/api/v1/nodes/' + encodeURIComponent(name);
  const [status, attributes, versions, links] = await Promise.all([
    api(path + '/status'), api(path + '/attributes'), api(path + '/versions'), api('/api/v1/links'),
  ]);
  const node = (status.nodes || [])[0] || {};
  const rows = Object.entries(attributes).map(([key, entry]) => el('tr', {},
    el('td', { class: 'mono' }, key),
    el('td', { class: 'mono' }, JSON.stringify(entry.value)),
    el('td', {}, entry.level), el('td', { class: 'mono muted' }, entry.file || '')));
  const diffOutput = el('div', { id: 'diff' });
  const versionRows = versions.map((v) => el('tr', { 'data-version': v.version },
    el('td', {}, version(v.version)), el('td', {}, version(v.parent)), el('td', {}, v.created), el('td', {}, v.files),
    el('td', {}, v.parent ? el('button', {
      type: 'button',
      onclick: async () => {
        const diff = await api(`${path}/diff?from=${v.parent}&to=${v.version}`);
        const files = diff.files.length ? diff.files.map((f) => diffView(f.diff)) : [el('p', { class: 'muted' }, 'no file differs')];
        diffOutput.replaceChildren(el('h2', {}, `${version(v.parent)} → ${version(v.version)}`), ...files);
      },
    }, 'diff') : '')));
  const mine = links.filter((l) => l.a === name || l.b === name);
  const byName = { [name]: Object.assign({ reachable: true }, node) };
  show(
    el('h2', {}, name),
    el('section', {},
      el('p', {}, `Reachable: ${node.reachable ? 'yes' : 'no'} · active ${version(node.active_version)} (${node.state || '-'}) · desired ${version(node.desired_version)} · latest ${version(node.latest_version)} · uptime ${age(node.uptime_s)}`),
      node.last_rollback ? el('p', { class: 'error' }, `last rollback: ${version(node.last_rollback.from_version)} → ${version(node.last_rollback.to_version)}: ${node.last_rollback.reason}`) : null),
    el('section', {}, el('h2', {}, 'Links'), el('table', { id: 'links' },
      el('thead', {}, el('tr', {}, ['Peer', 'Interface', 'Port', 'Received', 'Sent', 'Last received', 'This end'].map((h) => el('th', {}, h)))),
      el('tbody', {}, mine.map((l) => {
        const here = l.a === name;
        const iface = here ? l.a_interface : l.b_interface;
        const tunnel = (node.tunnels || []).find((t) => t.interface === iface) || {};
        // The interface is named after the peer's id: tlwg<peer id>.
        const state = endState(byName[name], iface, iface.replace(/^tlwg/, ''));
        return el('tr', {}, el('td', {}, here ? l.b : l.a), el('td', { class: 'mono' }, iface),
          el('td', {}, here ? l.a_port : l.b_port), el('td', {}, tunnel.rx_bytes ?? '-'), el('td', {}, tunnel.tx_bytes ?? '-'),
          el('td', {}, tunnel.last_rx_age_s === undefined ? '-' : age(tunnel.last_rx_age_s) + ' ago'), el('td', {}, state));
      })))),
    el('section', {}, el('h2', {}, 'Versions'), el('table', { id: 'versions' },
      el('thead', {}, el('tr', {}, ['Version', 'Parent', 'Created', 'Files', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, versionRows)), diffOutput),
    activationForm(name),
    el('section', {}, el('h2', {}, 'Attributes'), el('table', { id: 'attributes' },
      el('thead', {}, el('tr', {}, ['Attribute', 'Value', 'Set at', 'File'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows))));
}

async function route() {
  if (timer) clearTimeout(timer);
  if (!token()) return logout('');
  document.getElementById('nav').hidden = false;
  const hash = location.hash.replace(/^#\/?/, '');
  try {
    if (hash.startsWith('node/')) await nodeView(decodeURIComponent(hash.slice(5)));
    else await fleetView();
  } catch (e) {
    if (token()) show(el('p', { class: 'error' }, e.message));
  }
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('logout').addEventListener('click', () => logout('logged out'));
  route();
});
