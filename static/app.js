// chat-relay browser client: a plain ES module, no build step, no CDN.
// Rule: anything that came from a user or the server is written with
// textContent or attributes, never innerHTML, so chat text always stays text.
import {
  parseRoom, parseName, latencySummary, fmtMs, errorLabel, closeLabel, backoffMs,
} from './util.js';

const $ = (id) => document.getElementById(id);
const sendButton = document.querySelector('#composer [type=submit]');
/** Join refusals after which keeping the tab would only repeat the error. */
const JOIN_REFUSALS = new Set(['forbidden', 'too_many_rooms', 'room_full', 'bad_room']);

const S = {
  user: '',
  token: localStorage.getItem('token'),
  rooms: new Map(), // room name -> room state (see roomState)
  current: null,
  ws: null,
  attempt: 0, // reconnect attempts since the last successful open
  timer: null,
  joining: [], // rooms whose `join` awaits `joined`, in send order (join errors name no room)
  pending: new Map(), // cid -> own send not acked yet
  awaitingEcho: new Map(), // id -> acked own send whose `message` echo is still to come
  samples: [], // own latency samples, ms
  stats: null,
  seq: 0,
};

/** Creates an element; text always goes through textContent. */
function el(tag, cls, text, attrs = {}) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
const hhmm = (ts) => new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });

// ---- rooms and lines

/** Per-room state, created on first use. Each room owns its list (a tab panel)
 * so switching tabs keeps every room's lines and scroll position. */
function roomState(name) {
  if (!S.rooms.has(name)) {
    const list = el('ul', 'panel', null, { id: `panel-${name}`, role: 'tabpanel', tabindex: '0',
      'aria-labelledby': `tab-${name}`, 'aria-live': 'polite', 'aria-relevant': 'additions' });
    list.hidden = true;
    $('messages').append(list);
    S.rooms.set(name, { name, list, ids: new Set(), lastId: null, members: new Set(),
      joined: false, resumeFrom: null, hasOlder: true });
  }
  return S.rooms.get(name);
}

/** Inserts a line by its sort key: messages use their ULID id (sorts by time),
 * presence lines "<last id>+" (just after what was on screen then), pending
 * sends "~" (after everything). So history, live traffic, "Load older" and
 * late acks all interleave correctly without re-rendering the list. */
function place(r, li) {
  const stick = r.list.scrollHeight - r.list.scrollTop - r.list.clientHeight < 60;
  let at = r.list.lastElementChild;
  while (at && at.dataset.key > li.dataset.key) at = at.previousElementSibling;
  if (at) at.after(li);
  else r.list.prepend(li);
  if (stick || li.classList.contains('own')) r.list.scrollTop = r.list.scrollHeight;
}

/** A message line. Its textContent is exactly user + text: the time lives in
 * a data attribute that CSS displays, so it is visible but not "text". */
function messageLine(user, text, ts, cls, key) {
  const li = el('li', `msg ${cls}${user === S.user ? ' own' : ''}`, null,
    { 'data-time': hhmm(ts), 'data-key': key, title: new Date(ts).toLocaleString() });
  li.append(el('span', 'user', user), el('span', 'text', text));
  return li;
}

function draw(r, m) {
  r.ids.add(m.id);
  const li = messageLine(m.user, m.text, m.ts, m.kind === 'system' ? 'system' : 'chat', m.id);
  li.dataset.id = m.id;
  place(r, li);
}

/** Forgets what a room shows, when a resume left a gap: the history that
 * follows `joined` then redraws it without holes or duplicates. */
function clearRoom(r) {
  r.list.replaceChildren();
  r.ids.clear();
  r.lastId = null;
  r.lastSeq = null;
  r.hasOlder = true;
}

// ---- own sends: pending until the ack, latency measured at the echo

/** Sends `text`; a Retry passes the failed send's `cid` again, so a send
 * the server did publish (its ack was lost) is not published twice. */
function post(room, text, retryCid) {
  const r = S.rooms.get(room);
  if (!r) return;
  const cid = retryCid ?? `c${Date.now().toString(36)}-${(S.seq++).toString(36)}`;
  const li = messageLine(S.user, text, Date.now(), 'chat pending', '~');
  li.setAttribute('aria-busy', 'true');
  place(r, li);
  const p = { room, text, cid, li, sentAt: performance.now(), echo: null };
  if (wsSend({ type: 'send', room, text, cid })) S.pending.set(cid, p);
  else fail(p, 'offline');
}

function fail(p, code) {
  p.li.classList.replace('pending', 'failed');
  p.li.removeAttribute('aria-busy');
  const retry = el('button', 'link retry', 'Retry', { type: 'button' });
  retry.onclick = () => { p.li.remove(); post(p.room, p.text, p.cid); };
  p.li.append(el('span', 'error', errorLabel(code)), retry);
}

/** Pending → sent: the line takes its real id and moves to its sorted place. */
function settle(r, p, id) {
  p.li.classList.remove('pending');
  p.li.removeAttribute('aria-busy');
  p.li.dataset.id = p.li.dataset.key = id;
  p.li.remove();
  place(r, p.li);
}

function onAck(f) {
  const p = S.pending.get(f.cid);
  const r = p && S.rooms.get(p.room);
  S.pending.delete(f.cid);
  if (!r) return;
  if (p.echo && p.echo.msg.id !== f.id) {
    // The echo we adopted was someone else's identical text (same name in
    // another tab): give it its own line back.
    r.ids.delete(p.echo.msg.id);
    draw(r, p.echo.msg);
    p.echo = null;
  }
  if (p.echo) {
    sample(p.echo.at - p.sentAt);
    settle(r, p, f.id);
  } else if (r.ids.has(f.id)) {
    p.li.remove(); // its echo is already drawn: show the message once
  } else {
    r.ids.add(f.id);
    settle(r, p, f.id);
    S.awaitingEcho.set(f.id, p);
  }
}

// ---- server frames

function onMessage(m) {
  const r = S.rooms.get(m.room);
  if (!r) return; // a late frame for a room we already left
  if (!r.lastId || m.id > r.lastId) r.lastId = m.id;
  // The room cursor: positions are ordered per room across server instances.
  if (Number.isInteger(m.seq) && !(r.lastSeq >= m.seq)) r.lastSeq = m.seq;
  const acked = S.awaitingEcho.get(m.id);
  if (acked) {
    S.awaitingEcho.delete(m.id);
    sample(performance.now() - acked.sentAt);
    return;
  }
  if (r.ids.has(m.id)) return; // history and live traffic overlap: show once
  if (m.user === S.user) {
    // The echo can overtake its ack: adopt the oldest pending line with the
    // same text rather than drawing the message twice.
    const p = [...S.pending.values()].find((x) => x.room === m.room && !x.echo && x.text === m.text);
    if (p) {
      p.echo = { msg: m, at: performance.now() };
      r.ids.add(m.id);
      return;
    }
  }
  draw(r, m);
}

function onJoined(f) {
  S.joining = S.joining.filter((n) => n !== f.room);
  const r = S.rooms.get(f.room);
  if (!r) return;
  r.joined = true;
  if (f.epoch !== r.epoch) r.lastSeq = null; // another counter: positions do not carry over
  r.epoch = f.epoch ?? null;
  if (r.resumeFrom && !f.recovered) {
    banner(`Some messages in ${f.room} could not be recovered after the reconnect; showing the latest history instead.`);
    clearRoom(r);
  }
  r.members = new Set(f.members);
  if (r.name === S.current) renderRoom();
}

function onPresence(f) {
  const r = S.rooms.get(f.room);
  if (!r) return;
  if (f.event === 'join') r.members.add(f.user);
  else if (f.user !== S.user) r.members.delete(f.user);
  if (f.user !== S.user) { // own joins (one per reconnect) would only be noise
    place(r, el('li', 'presence', `${f.user} ${f.event === 'join' ? 'joined' : 'left'}`,
      { 'data-key': `${r.lastId ?? '0'}+`, 'data-time': hhmm(Date.now()) }));
  }
  if (r.name === S.current) renderMembers();
}

function onError(f) {
  const p = f.cid != null && S.pending.get(f.cid);
  if (p) {
    S.pending.delete(f.cid);
    return fail(p, f.code);
  }
  const detail = `${errorLabel(f.code)}${f.message ? ` (${f.message})` : ''}`;
  if (JOIN_REFUSALS.has(f.code) && (f.room || S.joining.length)) {
    const room = f.room || S.joining.shift();
    banner(`Could not join ${room}: ${detail}`);
    return removeRoom(room);
  }
  banner(detail);
}

/** The server's live stream of a room was interrupted and it could not find
 * every missed message: say so and rejoin, which redraws the room. */
function onGap(f) {
  const r = S.rooms.get(f.room);
  if (!r) return;
  banner(`Some messages in ${f.room} could not be delivered live; reloading the room.`);
  clearRoom(r);
  sendJoin(r);
}

const HANDLERS = { message: onMessage, ack: onAck, joined: onJoined, presence: onPresence, error: onError, gap: onGap };

// ---- connection

function wsSend(obj) {
  if (S.ws?.readyState !== WebSocket.OPEN) return false;
  S.ws.send(JSON.stringify(obj));
  return true;
}

/** (Re)joins a room; `since` resumes right after the last message we saw. */
function sendJoin(r) {
  r.resumeFrom = r.lastId;
  S.joining.push(r.name);
  const cursor = r.lastSeq != null && r.epoch ? { since_seq: r.lastSeq, epoch: r.epoch } : {};
  wsSend({ type: 'join', room: r.name, ...(r.lastId ? { since: r.lastId } : {}), ...cursor });
}

function status(cls, text) {
  $('status').className = `pill ${cls}`;
  $('status').textContent = text;
}

function connect() {
  clearTimeout(S.timer);
  $('reconnect').hidden = true;
  const q = S.token ? `token=${encodeURIComponent(S.token)}` : `user=${encodeURIComponent(S.user)}`;
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws?${q}`);
  S.ws = ws;
  status('connecting', 'connecting…');
  ws.onopen = () => {
    S.attempt = 0;
    S.joining = [];
    status('online', 'online');
    for (const r of S.rooms.values()) sendJoin(r);
    renderComposer();
  };
  ws.onmessage = (e) => {
    let f;
    try { f = JSON.parse(e.data); } catch { return; }
    if (Object.hasOwn(HANDLERS, f?.type)) HANDLERS[f.type](f);
  };
  ws.onclose = (e) => {
    if (S.ws !== ws) return; // dropped on purpose
    S.ws = null;
    for (const r of S.rooms.values()) r.joined = false;
    for (const p of S.pending.values()) {
      if (p.echo) settle(S.rooms.get(p.room), p, p.echo.msg.id); // the echo proved delivery
      else fail(p, 'lost'); // may or may not have arrived: say so rather than guess
    }
    S.pending.clear();
    S.awaitingEcho.clear(); // their ids stay in `ids`, so resumed copies are skipped
    const wait = backoffMs(S.attempt++);
    status('offline', `${closeLabel(e.code)} · retrying in ${Math.ceil(wait / 1000)} s`);
    if ([1008, 1009, 1013].includes(e.code)) banner(`Disconnected: ${closeLabel(e.code)}.`);
    $('reconnect').hidden = false;
    S.timer = setTimeout(connect, wait);
    renderComposer();
  };
}

// ---- rendering

function renderTabs() {
  $('tabs').replaceChildren(...[...S.rooms.values()].map((r) => {
    const on = r.name === S.current;
    return el('button', 'tab', r.name, { type: 'button', role: 'tab', id: `tab-${r.name}`,
      'data-testid': `tab-${r.name}`, 'data-room': r.name, 'aria-controls': r.list.id,
      'aria-selected': String(on), tabindex: on ? '0' : '-1' }); // roving tabindex
  }));
}

function renderMembers() {
  const r = S.rooms.get(S.current);
  const names = [...(r?.members ?? [])].sort((a, b) => a.localeCompare(b));
  $('members').replaceChildren(...names.map((n) => el('li', n === S.user ? 'me' : '', n)));
  $('members-count').textContent = r ? `(${names.length})` : '';
  $('room-count').textContent = r ? `${names.length} online` : '';
}

function renderComposer() {
  const ta = $('composer-text');
  ta.disabled = sendButton.disabled = !S.current;
  ta.placeholder = !S.current ? 'Join a room to chat'
    : S.ws?.readyState === WebSocket.OPEN ? `Message ${S.current}` : 'Offline: reconnecting…';
}

function renderRoom() {
  const r = S.rooms.get(S.current);
  for (const x of S.rooms.values()) x.list.hidden = x !== r;
  $('roombar').hidden = !r;
  $('empty').hidden = !!r;
  $('room-title').textContent = r?.name ?? '';
  $('load-older').disabled = !r?.hasOlder;
  $('load-older').textContent = r && !r.hasOlder ? 'No older messages' : 'Load older';
  renderMembers();
  renderComposer();
  renderRoomStats();
}

function select(name) {
  S.current = S.rooms.has(name) ? name : null;
  const r = S.rooms.get(S.current);
  localStorage.setItem('rooms', JSON.stringify([...S.rooms.keys()]));
  if (r) localStorage.setItem('current', r.name);
  renderTabs();
  renderRoom();
  if (r) r.list.scrollTop = r.list.scrollHeight;
}

function banner(text) {
  $('banner').hidden = !text;
  $('banner-text').textContent = text || '';
}

/** One latency sample: numbers via util.latencySummary plus a sparkline. */
function sample(ms) {
  S.samples.push(ms);
  if (S.samples.length > 200) S.samples.shift();
  const s = latencySummary(S.samples);
  $('lat-last').textContent = fmtMs(s.last);
  $('lat-avg').textContent = fmtMs(s.avg);
  $('lat-p95').textContent = fmtMs(s.p95);
  $('lat-n').textContent = `${s.n} sample${s.n === 1 ? '' : 's'}`;
  const pts = S.samples.slice(-50);
  if (pts.length === 1) pts.push(pts[0]); // a lone sample still draws a line
  const max = Math.max(...pts, 1);
  const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
  line.setAttribute('points', pts.map((v, i) =>
    `${((i * 100) / (pts.length - 1)).toFixed(1)},${(23 - (v / max) * 22).toFixed(1)}`).join(' '));
  $('spark').replaceChildren(line);
}

function kv(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el('dt', '', k), el('dd', '', v ?? '–')]));
}

function renderRoomStats() {
  $('stats-room').textContent = S.current ?? '';
  const r = S.stats?.rooms?.find((x) => x.room === S.current);
  kv($('roomstats'), !S.current || !S.stats ? [] : !r ? [['messages', 'none stored yet']] : [
    ['messages', r.messages],
    ['last minute', r.per_min],
    ['active (5 min)', r.active_users],
    ['top talkers', (r.top_talkers ?? []).map((t) => `${t.user} (${t.messages})`).join(', ') || '–'],
    ['flagged', (r.flagged ?? []).join(', ') || '–'],
  ]);
}

/** Live numbers from the server every ~2 s (not while the tab is hidden). */
async function pollStats() {
  if (document.hidden && S.stats) return;
  try {
    const headers = S.token ? { Authorization: `Bearer ${S.token}` } : {};
    const res = await fetch('/api/stats', { cache: 'no-store', headers });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const s = (S.stats = await res.json());
    $('backend').textContent = s.backend;
    kv($('serverstats'), [['instance', s.instance], ['database', s.db],
      ['connections', s.connections], ['local rooms', s.local_rooms]]);
    $('caps').replaceChildren(...Object.entries(s.capabilities ?? {}).map(([k, v]) =>
      el('li', `chip ${v ? 'yes' : 'no'}`, k.replace(/_/g, ' '), { title: v ? 'supported' : 'not supported' })));
    const names = new Set([...(s.rooms ?? []).map((x) => x.room), ...S.rooms.keys()]);
    $('room-suggestions').replaceChildren(...[...names].sort().map((n) => el('option', '', null, { value: n })));
    renderRoomStats();
    $('stats-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $('stats-updated').textContent = `stats unavailable (${e.message})`;
  }
}

/** Fetches the page of history before the oldest message shown. */
async function loadOlder() {
  const r = S.rooms.get(S.current);
  if (!r) return;
  $('load-older').disabled = true;
  const oldest = r.list.querySelector('li[data-id]')?.dataset.id;
  try {
    const q = `limit=50${oldest ? `&before=${encodeURIComponent(oldest)}` : ''}`;
    // With auth on, history needs the same token as the socket (header, not URL).
    const headers = S.token ? { Authorization: `Bearer ${S.token}` } : {};
    const res = await fetch(`/api/rooms/${encodeURIComponent(r.name)}/messages?${q}`, { headers });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const { messages = [] } = await res.json();
    const fromBottom = r.list.scrollHeight - r.list.scrollTop;
    for (const m of messages) if (!r.ids.has(m.id)) draw(r, m);
    r.list.scrollTop = r.list.scrollHeight - fromBottom; // keep the reader's place
    r.hasOlder = messages.length === 50;
  } catch (e) {
    banner(`Could not load older messages: ${e.message}`);
  }
  if (r.name === S.current) renderRoom();
}

// ---- session

function join(name) {
  const known = S.rooms.has(name);
  const r = roomState(name);
  if (!known && S.ws?.readyState === WebSocket.OPEN) sendJoin(r); // else: joined on open
  select(name);
}

function removeRoom(name) {
  const r = S.rooms.get(name);
  if (!r) return;
  if (r.joined) wsSend({ type: 'leave', room: name });
  r.list.remove();
  S.rooms.delete(name);
  for (const [cid, p] of S.pending) if (p.room === name) S.pending.delete(cid);
  select(S.current === name ? [...S.rooms.keys()][0] : S.current);
}

/** The `sub` claim of a JWT, for display and own-message detection only
 * (the server verifies the token and takes the name from it). */
function tokenUser(token) {
  try {
    return JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sub || null;
  } catch { return null; }
}

function start(user, rooms, current) {
  S.user = user;
  localStorage.setItem('user', user);
  document.body.classList.replace('logged-out', 'logged-in');
  $('login-view').hidden = true;
  $('chat-view').hidden = false;
  $('me').hidden = $('logout').hidden = false;
  $('me').textContent = user;
  for (const n of rooms) if (parseRoom(n).room === n) roomState(n);
  select(S.rooms.has(current) ? current : [...S.rooms.keys()][0]);
  connect();
  (S.current ? $('composer-text') : $('room')).focus();
}

/** Shows a field's error (or clears it); returns whether the field is fine. */
function fieldOk(input, errorEl, msg) {
  errorEl.textContent = msg || '';
  if (msg) input.setAttribute('aria-invalid', 'true');
  else input.removeAttribute('aria-invalid');
  if (msg) input.focus();
  return !msg;
}

// ---- wiring

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  const n = S.token ? { name: tokenUser(S.token) || $('name').value.trim() } : parseName($('name').value);
  const r = parseRoom($('login-room').value);
  if (fieldOk($('name'), $('login-error'), n.error) && fieldOk($('login-room'), $('login-error'), r.error)) {
    start(n.name, [r.room], r.room);
  }
});
$('join').addEventListener('submit', (e) => {
  e.preventDefault();
  const r = parseRoom($('room').value);
  if (!fieldOk($('room'), $('room-error'), r.error)) return;
  $('room').value = '';
  join(r.room);
  $('composer-text').focus();
});
$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const ta = $('composer-text');
  if (!S.current || !ta.value.trim()) return;
  post(S.current, ta.value);
  ta.value = '';
  ta.style.height = '';
});
$('composer-text').addEventListener('keydown', (e) => {
  // Enter sends, Shift+Enter is a new line; never while an IME is composing.
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});
$('composer-text').addEventListener('input', (e) => { // grow with the text, up to a limit
  e.target.style.height = '';
  e.target.style.height = `${Math.min(e.target.scrollHeight, 160)}px`;
});
$('tabs').addEventListener('click', (e) => {
  const b = e.target.closest('[role=tab]');
  if (b) select(b.dataset.room);
});
$('tabs').addEventListener('keydown', (e) => { // arrow keys move between tabs (WAI-ARIA tabs)
  const names = [...S.rooms.keys()];
  const i = names.indexOf(S.current);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: names.length - 1 }[e.key];
  if (next === undefined || !names.length) return;
  e.preventDefault();
  select(names[(next + names.length) % names.length]);
  $(`tab-${S.current}`)?.focus();
});
$('leave').addEventListener('click', () => removeRoom(S.current));
$('load-older').addEventListener('click', loadOlder);
$('banner-close').addEventListener('click', () => banner(''));
$('reconnect').addEventListener('click', () => { if (!S.ws) { S.attempt = 0; connect(); } });
$('logout').addEventListener('click', () => {
  // Forget the session and start from a clean page: simplest way to reset everything.
  for (const k of ['user', 'rooms', 'current', 'token']) localStorage.removeItem(k);
  location.reload();
});
$('toggle-side').addEventListener('click', () => {
  $('toggle-side').setAttribute('aria-expanded', String(document.body.classList.toggle('side-open')));
});
// Back online after a network drop: do not wait for the backoff timer.
window.addEventListener('online', () => { if (S.user && !S.ws) connect(); });

// A token in the URL fragment wins; keep it for reloads and drop it from the
// address bar so it does not end up in screenshots or shared links.
const hashToken = new URLSearchParams(location.hash.slice(1)).get('token');
if (hashToken) {
  localStorage.setItem('token', (S.token = hashToken));
  history.replaceState(null, '', location.pathname + location.search);
}
const tokenName = S.token && tokenUser(S.token);
$('name').value = tokenName || localStorage.getItem('user') || '';
$('name').readOnly = !!tokenName;

// A reload resumes the session: same name, same rooms, history from the server.
let savedRooms = null;
try { savedRooms = JSON.parse(localStorage.getItem('rooms')); } catch { /* start fresh */ }
const savedUser = tokenName || localStorage.getItem('user');
if (savedUser && Array.isArray(savedRooms)) {
  start(savedUser, savedRooms, localStorage.getItem('current'));
} else {
  $('name').focus();
}
pollStats();
setInterval(pollStats, 2000);
