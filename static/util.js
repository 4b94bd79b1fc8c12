// Pure helpers (no DOM): validation, latency statistics, labels. Imported by
// app.js in the browser and by the e2e suite's unit tests in node.

export const ROOM_RE = /^(chat|ai)\.[A-Za-z0-9_-]{1,64}$/;

/** Normalises what a person typed into a room id, or returns {error}. */
export function parseRoom(input) {
  let s = String(input ?? '').trim();
  if (!s) return { error: 'Type a room name, e.g. chat.lobby or ai.quest.' };
  if (!s.includes('.')) s = `chat.${s}`;
  if (!ROOM_RE.test(s)) {
    return {
      error: 'Rooms are chat.<name> or ai.<name>; <name> is 1–64 letters, digits, _ or -.',
    };
  }
  return { room: s };
}

/** Validates a user name like the server: 1–32 characters, no control characters. */
export function parseName(input) {
  const s = String(input ?? '').trim();
  const n = [...s].length;
  if (n === 0) return { error: 'Pick a name.' };
  if (n > 32) return { error: 'Names are at most 32 characters.' };
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(s)) return { error: 'Names cannot contain control characters.' };
  return { name: s };
}

export function utf8Length(s) {
  return new TextEncoder().encode(s).length;
}

/** last / avg / p95 (nearest rank) of a list of samples in ms. */
export function latencySummary(samples) {
  if (!samples.length) return null;
  const s = [...samples].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil(0.95 * s.length));
  return {
    last: samples[samples.length - 1],
    avg: s.reduce((a, b) => a + b, 0) / s.length,
    p95: s[rank - 1],
    n: s.length,
  };
}

export function fmtMs(ms) {
  if (ms == null || !Number.isFinite(ms)) return '–';
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

const ERROR_TEXT = {
  rate_limited: 'rate limited — slow down',
  bus_unavailable: 'message bus unavailable',
  text_too_long: 'message too long',
  empty_text: 'message is empty',
  not_joined: 'not in this room',
  bad_room: 'bad room name',
  invalid_json: 'invalid frame',
  offline: 'not connected',
  lost: 'connection lost — it may not have been delivered',
};

export function errorLabel(code) {
  return ERROR_TEXT[code] || String(code || 'error').replace(/_/g, ' ');
}

const CLOSE_TEXT = {
  1000: 'closed',
  1001: 'server restarting',
  1006: 'connection lost',
  1008: 'refused by server policy',
  1009: 'a frame was too big',
  1011: 'server error',
  1012: 'server restarting',
  1013: 'too slow to keep up',
};

export function closeLabel(code) {
  return CLOSE_TEXT[code] || `closed (${code})`;
}

/** Reconnect delay for attempt n (0-based): exponential, capped, with jitter. */
export function backoffMs(attempt, random = Math.random) {
  const base = Math.min(10000, 500 * 2 ** Math.min(attempt, 8));
  return Math.round(base * (0.75 + random() * 0.5));
}
