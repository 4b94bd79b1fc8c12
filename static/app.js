// chat-relay browser client: plain ES module, no build step.
// Every piece of user text goes through textContent, never innerHTML.
const $ = (id) => document.getElementById(id);
const state = {
  user: localStorage.getItem('user') || '',
  rooms: new Map(), // room -> { lastId, ids:Set, items:[], members:Set }
  current: null,
  ws: null,
  pending: new Map(), // cid -> { li, sentAt, room }
  backoff: 500,
  latencies: [],
  cid: 0,
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function saveRooms() {
  localStorage.setItem('rooms', JSON.stringify([...state.rooms.keys()]));
}

function room(name) {
  if (!state.rooms.has(name)) {
    state.rooms.set(name, { lastId: null, ids: new Set(), items: [], members: new Set() });
  }
  return state.rooms.get(name);
}

function renderTabs() {
  const tabs = $('tabs');
  tabs.replaceChildren();
  for (const name of state.rooms.keys()) {
    const b = el('button', 'tab', name);
    b.setAttribute('role', 'tab');
    b.dataset.testid = `tab-${name}`;
    b.setAttribute('aria-selected', String(name === state.current));
    b.onclick = () => select(name);
    const x = el('button', 'close', '×');
    x.setAttribute('aria-label', `leave ${name}`);
    x.onclick = () => leave(name);
    tabs.append(b, x);
  }
}

function select(name) {
  state.current = name;
  renderTabs();
  const list = $('messages');
  list.replaceChildren(...(state.rooms.get(name)?.items || []));
  list.scrollTop = list.scrollHeight;
  renderMembers();
}

function renderMembers() {
  const r = state.rooms.get(state.current);
  $('members').replaceChildren(...[...(r?.members || [])].sort().map((m) => el('li', '', m)));
}

function addItem(name, li) {
  const r = room(name);
  r.items.push(li);
  if (r.items.length > 500) r.items.shift();
  if (name === state.current) {
    const list = $('messages');
    list.append(li);
    while (list.children.length > 500) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
  }
}

function showMessage(m) {
  const r = room(m.room);
  if (r.ids.has(m.id)) return; // history + live overlap: show once
  r.ids.add(m.id);
  if (!r.lastId || m.id > r.lastId) r.lastId = m.id;
  // Our own message coming back: it replaces the pending line.
  for (const [cid, p] of state.pending) {
    if (p.id === m.id) {
      p.li.classList.remove('pending');
      state.pending.delete(cid);
      recordLatency(performance.now() - p.sentAt);
      return;
    }
  }
  const li = el('li', m.kind === 'system' ? 'system' : '');
  li.dataset.id = m.id;
  li.append(el('span', 'user', m.user), el('span', 'text', m.text));
  li.title = new Date(m.ts).toLocaleString();
  addItem(m.room, li);
}

function recordLatency(ms) {
  state.latencies.push(ms);
  if (state.latencies.length > 100) state.latencies.shift();
  const s = [...state.latencies].sort((a, b) => a - b);
  const p95 = s[Math.floor(s.length * 0.95)] ?? s[s.length - 1];
  const avg = s.reduce((a, b) => a + b, 0) / s.length;
  $('latency').textContent = `last ${ms.toFixed(1)} ms · avg ${avg.toFixed(1)} ms · p95 ${p95.toFixed(1)} ms`;
}

function banner(text) {
  const b = $('banner');
  b.hidden = !text;
  b.textContent = text || '';
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(obj));
    return true;
  }
  return false;
}

function join(name) {
  room(name);
  if (!state.current) state.current = name;
  saveRooms();
  renderTabs();
  const r = state.rooms.get(name);
  send({ type: 'join', room: name, ...(r.lastId ? { since: r.lastId } : {}) });
}

function leave(name) {
  send({ type: 'leave', room: name });
  state.rooms.delete(name);
  if (state.current === name) state.current = state.rooms.keys().next().value || null;
  saveRooms();
  renderTabs();
  if (state.current) select(state.current);
  else $('messages').replaceChildren();
}

function onFrame(f) {
  switch (f.type) {
    case 'joined': {
      const r = room(f.room);
      r.members = new Set(f.members);
      if (r.lastId && !f.recovered) {
        banner(`Some messages in ${f.room} could not be recovered after the reconnect.`);
      }
      renderMembers();
      break;
    }
    case 'message':
      showMessage(f);
      break;
    case 'ack': {
      const p = state.pending.get(f.cid);
      if (p) {
        p.id = f.id;
        p.li.dataset.id = f.id;
        const r = room(p.room);
        if (r.ids.has(f.id)) {
          // The echo arrived before the ack and is already on screen: drop
          // the pending copy so the message shows once.
          p.li.remove();
          r.items = r.items.filter((x) => x !== p.li);
          state.pending.delete(f.cid);
          recordLatency(performance.now() - p.sentAt);
        } else {
          r.ids.add(f.id);
        }
      }
      break;
    }
    case 'presence': {
      const r = room(f.room);
      if (f.event === 'join') r.members.add(f.user);
      else r.members.delete(f.user);
      addItem(f.room, el('li', 'presence', `${f.user} ${f.event === 'join' ? 'joined' : 'left'}`));
      renderMembers();
      break;
    }
    case 'error': {
      const p = f.cid && state.pending.get(f.cid);
      if (p) {
        p.li.classList.remove('pending');
        p.li.classList.add('failed');
        p.li.append(el('span', 'error', ` — not sent: ${f.code}`));
        state.pending.delete(f.cid);
      } else {
        banner(`${f.code}: ${f.message}`);
      }
      break;
    }
  }
}

// Own messages: shown as pending at once, confirmed by the ack + echo. The
// echo (a normal `message`) is matched by id once the ack told us the id.
function sendText(text) {
  if (!state.current || !text.trim()) return;
  const cid = `c${Date.now().toString(36)}${(state.cid++).toString(36)}`;
  const li = el('li', 'pending');
  li.append(el('span', 'user', state.user), el('span', 'text', text));
  addItem(state.current, li);
  const p = { li, sentAt: performance.now(), room: state.current, id: null };
  state.pending.set(cid, p);
  if (!send({ type: 'send', room: state.current, text, cid })) {
    li.classList.replace('pending', 'failed');
    li.append(el('span', 'error', ' — not sent: offline'));
    state.pending.delete(cid);
  }
}

function connect() {
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${proto}://${location.host}/ws?user=${encodeURIComponent(state.user)}`);
  state.ws = ws;
  ws.onopen = () => {
    $('status').textContent = 'online';
    $('status').className = 'online';
    state.backoff = 500;
    banner('');
    for (const name of state.rooms.keys()) join(name);
  };
  ws.onmessage = (e) => {
    let f;
    try { f = JSON.parse(e.data); } catch { return; }
    if (f.type === 'message') {
      // An own message whose ack came first: drop the duplicate line.
      for (const [cid, p] of state.pending) {
        if (p.id && p.id === f.id) {
          p.li.classList.remove('pending');
          state.pending.delete(cid);
          recordLatency(performance.now() - p.sentAt);
          const r = room(f.room);
          if (!r.lastId || f.id > r.lastId) r.lastId = f.id;
          return;
        }
      }
    }
    onFrame(f);
  };
  ws.onclose = (e) => {
    $('status').textContent = `offline (${e.code}) — reconnecting`;
    $('status').className = 'offline';
    for (const [cid, p] of state.pending) {
      p.li.classList.replace('pending', 'failed');
      p.li.append(el('span', 'error', ' — connection lost'));
      state.pending.delete(cid);
    }
    setTimeout(connect, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 10000);
  };
}

async function pollStats() {
  try {
    const s = await (await fetch('/api/stats')).json();
    $('backend').textContent = s.backend;
    const r = (s.rooms || []).find((x) => x.room === state.current);
    const dl = $('roomstats');
    dl.replaceChildren();
    const row = (k, v) => dl.append(el('dt', '', k), el('dd', '', String(v)));
    row('connections (this instance)', s.connections);
    if (r) {
      row('messages', r.messages);
      row('last minute', r.per_min);
      row('active users (5 min)', r.active_users);
      row('top talkers', (r.top_talkers || []).map((t) => `${t.user} (${t.messages})`).join(', ') || '–');
      row('flagged', (r.flagged || []).join(', ') || '–');
    }
  } catch { /* offline: keep the last numbers */ }
}

function start() {
  state.user = $('name').value.trim();
  if (!state.user) return;
  localStorage.setItem('user', state.user);
  $('login').hidden = true;
  $('chat').hidden = false;
  for (const r of JSON.parse(localStorage.getItem('rooms') || '[]')) room(r);
  state.current = state.rooms.keys().next().value || null;
  renderTabs();
  connect();
  if (state.current) select(state.current);
  $('room').focus();
}
$('login').onsubmit = (e) => {
  e.preventDefault();
  start();
};
$('join').onsubmit = (e) => {
  e.preventDefault();
  const name = $('room').value.trim();
  join(name);
  select(name);
  $('room').value = '';
  $('text').focus();
};
$('composer').onsubmit = (e) => {
  e.preventDefault();
  sendText($('text').value);
  $('text').value = '';
};
$('name').value = state.user;
// A reload resumes the session: same name, same rooms, history from the server.
if (state.user && localStorage.getItem('rooms')) start();
pollStats();
setInterval(pollStats, 3000);
