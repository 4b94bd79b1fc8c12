// Fan-out load test for chat-relay.
//
// R rooms x S subscribers (WebSockets) receive what P publishers send at a
// fixed arrival rate (open model: k6's constant-arrival-rate executor posts
// through POST /api/rooms/<room>/messages, the same bus path as a WebSocket
// send). Every message carries its publisher id, a per-publisher sequence
// number and the send time, so each subscriber measures end-to-end latency and
// counts duplicates, reordering and gaps.
//
//   k6 run -e K6_RELAYS=http://127.0.0.1:8080 -e K6_ROOMS=10 -e K6_SUBS=10 \
//          -e K6_RATE=200 -e K6_RUN=30s loadtest/fanout.js
//
// K6_RELAYS may list several instances (comma-separated): subscribers and
// publishers are spread over them, so deliveries cross instances.
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';

const RELAYS = (__ENV.K6_RELAYS || 'http://127.0.0.1:8080').split(',').map((s) => s.trim());
const ROOMS = parseInt(__ENV.K6_ROOMS || '10');
const SUBS = parseInt(__ENV.K6_SUBS || '10');
const RATE = parseInt(__ENV.K6_RATE || '100');
const PUBLISHERS = parseInt(__ENV.K6_PUBLISHERS || '20');
const DURATION = __ENV.K6_RUN || '20s'; // not K6_DURATION: k6 reads that itself
const SIZE = parseInt(__ENV.K6_SIZE || '100');
const WARMUP = parseInt(__ENV.K6_WARMUP_S || '3');
const DRAIN = parseInt(__ENV.K6_DRAIN_S || '5');

function seconds(d) {
  const m = /^(\d+)(ms|s|m)$/.exec(d);
  if (!m) return parseInt(d);
  const n = parseInt(m[1]);
  return m[2] === 'ms' ? n / 1000 : m[2] === 'm' ? n * 60 : n;
}
const RUN_S = seconds(DURATION);

const e2e = new Trend('e2e_latency', true);
const delivered = new Counter('deliveries');
const duplicates = new Counter('duplicates');
const reordered = new Counter('reordered');
const gaps = new Counter('gaps');
const acked = new Counter('publish_acked');
const failed = new Counter('publish_failed');
const subsConnected = new Counter('subscribers_joined');
const crossInstance = new Counter('cross_instance_deliveries');

// Placement over several relays: the k-th subscriber of a room (subscriber i
// is in room i % ROOMS) on relay k % n, a room's publishers rotated too, so
// every room spans instances (i % n would put a whole room on one relay
// whenever n divides ROOMS). The same rule as loadgen's.
const subRelay = (i) => Math.floor(i / ROOMS) % RELAYS.length;
const pubRelay = (p) => ((p % ROOMS) + Math.floor(p / ROOMS)) % RELAYS.length;

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      exec: 'subscriber',
      vus: ROOMS * SUBS,
      iterations: 1,
      maxDuration: `${WARMUP + RUN_S + DRAIN + 30}s`,
    },
    publishers: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: PUBLISHERS,
      maxVUs: PUBLISHERS,
      startTime: `${WARMUP}s`,
    },
  },
  thresholds: {
    // Delivery must be complete, unique and in order; the rate must be kept.
    duplicates: ['count==0'],
    reordered: ['count==0'],
    gaps: ['count==0'],
    publish_failed: ['count==0'],
    dropped_iterations: ['count==0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(95)', 'p(99)', 'p(99.9)', 'max'],
};

// One room prefix for the whole run (init code runs once per VU, so it comes
// from setup()), keeping runs apart on a shared broker.
export function setup() {
  return { prefix: __ENV.K6_ROOM_PREFIX || `k6${Date.now() % 1000000}` };
}

function roomOf(prefix, i) {
  return `chat.${prefix}-${i % ROOMS}`;
}

export function subscriber(data) {
  const PREFIX = data.prefix;
  // 0..R*S-1, unique per subscriber: exactly S subscribers per room.
  const vu = exec.scenario.iterationInTest;
  const room = roomOf(PREFIX, vu);
  const mine = subRelay(vu);
  const relay = RELAYS[mine].replace(/^http/, 'ws');
  const ws = new WebSocket(`${relay}/ws?user=sub${vu}`);
  const last = {}; // publisher -> highest seq seen
  const seen = {}; // publisher -> Set of seqs
  ws.onopen = () => ws.send(JSON.stringify({ type: 'join', room }));
  ws.onmessage = (e) => {
    const f = JSON.parse(e.data);
    if (f.type === 'joined') {
      subsConnected.add(1);
      return;
    }
    if (f.type !== 'message' || f.user === 'system') return;
    let body;
    try {
      body = JSON.parse(f.text);
    } catch (_) {
      return; // not a load-test message
    }
    if (body.r !== PREFIX) return;
    e2e.add(Date.now() - body.t);
    delivered.add(1);
    if (pubRelay(body.p) !== mine) crossInstance.add(1);
    const p = body.p;
    const s = seen[p] || (seen[p] = new Set());
    if (s.has(body.s)) {
      duplicates.add(1);
      return;
    }
    s.add(body.s);
    if (last[p] !== undefined && body.s < last[p]) reordered.add(1);
    last[p] = Math.max(last[p] === undefined ? -1 : last[p], body.s);
  };
  ws.onerror = (e) => console.error(`subscriber ${vu}: ${e.error}`);
  setTimeout(() => {
    // Gaps: per publisher, sequence numbers missing between the first and last seen.
    for (const p of Object.keys(seen)) {
      const s = seen[p];
      let min = Infinity;
      let max = -Infinity;
      for (const v of s) {
        if (v < min) min = v;
        if (v > max) max = v;
      }
      const missing = max - min + 1 - s.size;
      if (missing > 0) gaps.add(missing);
    }
    ws.close();
  }, (WARMUP + RUN_S + DRAIN) * 1000);
}

// Each publisher VU sends only into one room, so its sequence numbers in that
// room are consecutive: a subscriber can tell a gap from reordering.
const seqs = {};
const pad = 'x'.repeat(Math.max(0, SIZE - 80));
export function publisher(data) {
  const PREFIX = data.prefix;
  const vu = exec.vu.idInTest;
  const room = roomOf(PREFIX, vu);
  const seq = (seqs[vu] = (seqs[vu] === undefined ? -1 : seqs[vu]) + 1);
  const relay = RELAYS[pubRelay(vu)];
  const text = JSON.stringify({ r: PREFIX, p: vu, s: seq, t: Date.now(), x: pad });
  const res = http.post(`${relay}/api/rooms/${room}/messages`, JSON.stringify({ user: `pub${vu}`, text }), {
    headers: { 'Content-Type': 'application/json' },
    tags: { name: 'publish' },
  });
  if (res.status === 202) acked.add(1);
  else failed.add(1);
}

export function handleSummary(data) {
  const v = (m, k) => (data.metrics[m] && data.metrics[m].values[k]) || 0;
  const ackedN = v('publish_acked', 'count');
  const deliveredN = v('deliveries', 'count');
  const dups = v('duplicates', 'count');
  const expected = ackedN * SUBS;
  const lost = Math.max(0, expected - (deliveredN - dups));
  const out = {
    rooms: ROOMS,
    subscribers_per_room: SUBS,
    rate: RATE,
    duration_s: RUN_S,
    size: SIZE,
    relays: RELAYS,
    publish_acked: ackedN,
    publish_failed: v('publish_failed', 'count'),
    dropped_iterations: v('dropped_iterations', 'count'),
    subscribers_joined: v('subscribers_joined', 'count'),
    deliveries: deliveredN,
    expected_deliveries: expected,
    lost,
    duplicates: dups,
    reordered: v('reordered', 'count'),
    gaps: v('gaps', 'count'),
    deliveries_per_s: deliveredN / RUN_S,
    cross_instance_share: deliveredN > 0 ? v('cross_instance_deliveries', 'count') / deliveredN : 0,
    e2e_ms: {
      p50: v('e2e_latency', 'med'),
      p95: v('e2e_latency', 'p(95)'),
      p99: v('e2e_latency', 'p(99)'),
      p999: v('e2e_latency', 'p(99.9)'),
      max: v('e2e_latency', 'max'),
    },
  };
  const line =
    `fan-out: ${ackedN} published, ${deliveredN}/${expected} delivered (${out.deliveries_per_s.toFixed(0)}/s), ` +
    `lost ${lost}, dup ${dups}, reordered ${out.reordered}, gaps ${out.gaps}, dropped iterations ${out.dropped_iterations}, ` +
    `e2e p50 ${out.e2e_ms.p50.toFixed(1)} ms p99 ${out.e2e_ms.p99.toFixed(1)} ms\n`;
  const files = { stdout: line };
  if (__ENV.K6_SUMMARY_JSON) files[__ENV.K6_SUMMARY_JSON] = JSON.stringify(out, null, 2);
  if (lost > 0) {
    files.stdout += `FAIL: ${lost} deliveries missing\n`;
  }
  return files;
}
