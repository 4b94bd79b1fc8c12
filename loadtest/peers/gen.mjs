// One load generator for both servers of the peer run (loadtest/peers.py):
// the relay (its WebSocket protocol, through `ws`) and the Socket.IO peer
// (socket.io-client, WebSocket transport only). Same workload, same code path
// for timing and counting, so neither server is measured by a different
// generator:
//
//   R rooms x S subscribers, the k-th subscriber of a room on instance k % n
//   (every room spans instances); one publisher per room, room p's publisher
//   on instance p % n; open loop at a fixed total rate, publishers staggered
//   over one period; every message text carries run prefix, publisher,
//   sequence and send time (µs, this process's monotonic clock), so each
//   subscriber measures end-to-end latency and counts duplicates, reordering
//   and loss (acked x S - unique deliveries).
//
// The same output contract as target/release/loadgen: `publish-start` and
// `publish-end` on stderr when publishing starts and ends (drivers sample
// server CPU there), one JSON summary line on stdout.
//
//   node gen.mjs --server relay --urls ws://127.0.0.1:9301,ws://127.0.0.1:9302 --rooms 20 --subs 25 --rate 400 --seconds 10
//   node gen.mjs --server socketio --urls http://127.0.0.1:9401,http://127.0.0.1:9402 ...
import { parseArgs } from "node:util";
import WebSocket from "ws";
import { io } from "socket.io-client";

const { values: opt } = parseArgs({
  options: {
    server: { type: "string", default: "relay" },
    urls: { type: "string", default: "ws://127.0.0.1:8080" },
    rooms: { type: "string", default: "20" },
    subs: { type: "string", default: "25" },
    rate: { type: "string", default: "400" },
    seconds: { type: "string", default: "10" },
    size: { type: "string", default: "100" },
    drain: { type: "string", default: "2" },
    prefix: { type: "string" },
  },
});
const ROOMS = Number(opt.rooms), SUBS = Number(opt.subs), RATE = Number(opt.rate);
const SECONDS = Number(opt.seconds), SIZE = Number(opt.size), DRAIN = Number(opt.drain);
const URLS = opt.urls.split(",").map((s) => s.trim());
const PREFIX = opt.prefix ?? `pg${Date.now() % 1e9}`;
const room = (i) => `chat.${PREFIX}-${i % ROOMS}`;
const nowUs = () => Number(process.hrtime.bigint() / 1000n);
const pad = "x".repeat(Math.max(0, SIZE - 60));

// Latency samples (µs) of every delivery; sorted once at the end.
let lat = new Float64Array(1 << 16);
let nLat = 0;
const record = (us) => {
  if (nLat === lat.length) {
    const bigger = new Float64Array(lat.length * 2);
    bigger.set(lat);
    lat = bigger;
  }
  lat[nLat++] = us;
};
const totals = { received: 0, dups: 0, reordered: 0, cross: 0 };
let joined = 0, acked = 0, errors = 0, sent = 0, late = 0;

/// A subscriber's view of one message text: counts and latency.
function subscriberSaw(st, text, instance) {
  let b;
  try {
    b = JSON.parse(text);
  } catch {
    return;
  }
  if (b.r !== PREFIX) return;
  record(Math.max(1, nowUs() - b.t));
  totals.received += 1;
  if (b.p % URLS.length !== instance) totals.cross += 1;
  let seen = st.seen.get(b.p);
  if (!seen) st.seen.set(b.p, (seen = new Set()));
  if (seen.has(b.s)) {
    totals.dups += 1;
    return;
  }
  seen.add(b.s);
  const last = st.last.get(b.p);
  if (last !== undefined && b.s < last) totals.reordered += 1;
  if (last === undefined || b.s > last) st.last.set(b.p, b.s);
}

// A client of either server behind one small interface: join, send, close;
// callbacks for a delivered message text, an ack and an error.
function relayClient(url, user, on) {
  const ws = new WebSocket(`${url}/ws?user=${user}`, { perMessageDeflate: false });
  ws.on("message", (data) => {
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (f.type === "message") on.message?.(f.text);
    else if (f.type === "ack") on.ack?.();
    else if (f.type === "error") on.error?.();
    else if (f.type === "joined") on.joined?.();
  });
  ws.on("error", (e) => console.error(`relay client: ${e.message}`));
  const opened = new Promise((res) => ws.once("open", res));
  return {
    join: (r) => opened.then(() => ws.send(JSON.stringify({ type: "join", room: r }))),
    send: (r, text, cid) => ws.send(JSON.stringify({ type: "send", room: r, text, cid })),
    close: () => ws.terminate(),
  };
}

function socketioClient(url, user, on) {
  // forceNew: one connection per client (the default shares one per URL).
  const s = io(url, { transports: ["websocket"], query: { user }, forceNew: true, reconnection: false });
  s.on("message", (m) => on.message?.(m.text));
  s.on("connect_error", (e) => console.error(`socket.io client: ${e.message}`));
  return {
    join: (r) => s.emit("join", r, () => on.joined?.()),
    send: (r, text, cid) =>
      s.emit("send", { room: r, text, cid }, (a) => (a && a.error ? on.error?.() : on.ack?.())),
    close: () => s.disconnect(),
  };
}

const client = { relay: relayClient, socketio: socketioClient }[opt.server];
if (!client) {
  console.error(`--server must be relay or socketio, not ${opt.server}`);
  process.exit(2);
}

const clients = [];
for (let i = 0; i < ROOMS * SUBS; i++) {
  const instance = Math.floor(i / ROOMS) % URLS.length;
  const st = { seen: new Map(), last: new Map() };
  const c = client(URLS[instance], `s${i}`, {
    joined: () => (joined += 1),
    message: (text) => subscriberSaw(st, text, instance),
  });
  c.join(room(i));
  clients.push(c);
}
const deadline = Date.now() + 30_000;
while (joined < ROOMS * SUBS && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
const joinedN = joined;

// Publishers: one per room, open loop, staggered over one period.
const pubs = [];
for (let p = 0; p < ROOMS; p++) {
  const c = client(URLS[p % URLS.length], `p${p}`, { ack: () => (acked += 1), error: () => (errors += 1) });
  c.join(room(p));
  pubs.push(c);
  clients.push(c);
}
const periodMs = (1000 * ROOMS) / RATE;
const startAt = performance.now() + 500;
let sending = ROOMS;
let publishStart = 0, publishEnd = 0;
setTimeout(() => {
  publishStart = performance.now();
  console.error("publish-start");
}, 500);
for (let p = 0; p < ROOMS; p++) {
  const first = startAt + (periodMs * p) / ROOMS;
  const stop = first + SECONDS * 1000;
  let seq = 0;
  const tick = () => {
    const due = first + seq * periodMs;
    if (due >= stop) {
      if (--sending === 0) {
        publishEnd = performance.now();
        console.error("publish-end");
      }
      return;
    }
    if (performance.now() - due > 10) late += 1;
    const text = JSON.stringify({ r: PREFIX, p, s: seq, t: nowUs(), x: pad });
    pubs[p].send(room(p), text, String(seq));
    sent += 1;
    seq += 1;
    setTimeout(tick, Math.max(0, first + seq * periodMs - performance.now()));
  };
  setTimeout(tick, Math.max(0, first - performance.now()));
}
while (sending > 0) await new Promise((r) => setTimeout(r, 50));
await new Promise((r) => setTimeout(r, DRAIN * 1000));
for (const c of clients) c.close();

const sorted = lat.subarray(0, nLat).sort();
const q = (x) => (nLat ? sorted[Math.min(nLat - 1, Math.floor(x * nLat))] / 1000 : 0);
const sendSecs = Math.max(0.001, (publishEnd - publishStart) / 1000);
const expected = acked * SUBS;
console.log(
  JSON.stringify({
    server: opt.server, rooms: ROOMS, subs: SUBS, publishers: ROOMS, rate: RATE, seconds: SECONDS, size: SIZE,
    subscribers_joined: joinedN, sent, acked, errors, late_sends: late,
    deliveries: totals.received, expected_deliveries: expected,
    lost: Math.max(0, expected - (totals.received - totals.dups)), duplicates: totals.dups, reordered: totals.reordered,
    deliveries_per_s: Math.round(totals.received / sendSecs),
    cross_instance_share: totals.received ? totals.cross / totals.received : 0,
    e2e_ms: { p50: q(0.5), p95: q(0.95), p99: q(0.99), p999: q(0.999), max: nLat ? sorted[nLat - 1] / 1000 : 0 },
  }),
);
process.exit(0);
