#!/usr/bin/env bash
# Browser end-to-end test: installs what is missing (Debian chromium,
# playwright-core from npm), starts a relay on a free port, runs the test.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund --silent
BIN=${RELAY_BIN:-../target/debug/chat-relay}
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BIND=127.0.0.1:$port DATABASE_URL=sqlite://$tmp/e2e.db STATIC_DIR="$PWD/../static" RUST_LOG=warn "$BIN" >"$tmp/relay.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
RELAY_URL=http://127.0.0.1:$port ARTIFACTS="$PWD/../artifacts" node --test chat.test.mjs
