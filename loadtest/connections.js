// Connection density: ramp to K6_CONNS idle WebSocket connections, each joined
// to a room, and hold them. The relay's RSS per connection is read from
// /proc by the driver (loadtest/compare.py) before and during the hold.
//
//   k6 run -e K6_RELAYS=http://127.0.0.1:8080 -e K6_CONNS=10000 loadtest/connections.js
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';

const RELAYS = (__ENV.K6_RELAYS || 'http://127.0.0.1:8080').split(',');
const CONNS = parseInt(__ENV.K6_CONNS || '10000');
const ROOMS = parseInt(__ENV.K6_ROOMS || '100');
const RAMP = parseInt(__ENV.K6_RAMP_S || '30');
const HOLD = parseInt(__ENV.K6_HOLD_S || '20');

const joined = new Counter('conns_joined');
const failures = new Counter('conn_failures');
const joinTime = new Trend('connect_join_ms', true);

export const options = {
  scenarios: {
    conns: {
      executor: 'ramping-vus',
      exec: 'conn',
      startVUs: 0,
      stages: [
        { duration: `${RAMP}s`, target: CONNS },
        { duration: `${HOLD}s`, target: CONNS },
      ],
      gracefulRampDown: '5s',
      gracefulStop: '10s',
    },
  },
  thresholds: { conn_failures: ['count==0'] },
};

export function conn() {
  const id = exec.vu.idInTest;
  const relay = RELAYS[id % RELAYS.length].trim().replace(/^http/, 'ws');
  const started = Date.now();
  const ws = new WebSocket(`${relay}/ws?user=idle${id}`);
  ws.onopen = () => ws.send(JSON.stringify({ type: 'join', room: `chat.idle-${id % ROOMS}` }));
  ws.onmessage = (e) => {
    if (JSON.parse(e.data).type === 'joined') {
      joined.add(1);
      joinTime.add(Date.now() - started);
    }
  };
  ws.onerror = () => failures.add(1);
  // Stay connected until the end of the test (the VU is stopped then).
  setTimeout(() => ws.close(), (RAMP + HOLD) * 1000);
}

export function handleSummary(data) {
  const v = (m, k) => (data.metrics[m] && data.metrics[m].values[k]) || 0;
  const out = {
    target: CONNS,
    joined: v('conns_joined', 'count'),
    failures: v('conn_failures', 'count'),
    connect_join_p50_ms: v('connect_join_ms', 'med'),
    connect_join_p99_ms: v('connect_join_ms', 'p(99)'),
  };
  return {
    stdout: `connections: ${out.joined}/${CONNS} joined, ${out.failures} failures, connect+join p50 ${out.connect_join_p50_ms} ms\n`,
    ...(__ENV.K6_SUMMARY_JSON ? { [__ENV.K6_SUMMARY_JSON]: JSON.stringify(out, null, 2) } : {}),
  };
}
