#!/usr/bin/env bash
# End-to-end tests: installs what is missing (Debian chromium, playwright-core,
# @stomp/stompjs and ws from npm), then
#  1. the browser test of the native client on one relay (memory bus);
#  2. for every bus: @stomp/stompjs against /stomp of one relay and a browser
#     user of the native client on another relay of the same bus (one relay
#     for memory), then once with auth on.
# A backend that is unreachable fails the run: the relay does not get ready.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -d node_modules/@stomp/stompjs ] && [ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund --silent
BIN=${RELAY_BIN:-../target/debug/chat-relay}
BUSES=${E2E_BUSES:-memory redis redis-streams kafka rabbitmq nats}
tmp=$(mktemp -d)
pids=()
dbs=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for d in "${dbs[@]}"; do
    psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME PORT ENV... : a relay in the background, waited for until ready.
start() {
  local name=$1 port=$2
  shift 2
  env BIND=127.0.0.1:$port INSTANCE_ID="$name" STATIC_DIR="$PWD/../static" RUST_LOG=warn "$@" \
    "$BIN" >"$tmp/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "relay $name did not become ready:" >&2
  cat "$tmp/$name.log" >&2
  curl -s "http://127.0.0.1:$port/readyz" >&2 || true
  return 1
}

echo "-- browser test of the native client (memory)"
port=$(free_port)
start native "$port" DATABASE_URL="sqlite://$tmp/e2e.db"
RELAY_URL=http://127.0.0.1:$port ARTIFACTS="$PWD/../artifacts" node --test chat.test.mjs

stamp=$(date +%s)$$
for bus in $BUSES; do
  echo "-- @stomp/stompjs and the browser client through BUS=$bus"
  a=$(free_port)
  b=$(free_port)
  # Unique names per run, so runs on a shared broker do not see each other.
  common=(BUS="$bus" STOMP_HEARTBEAT_MS=1000 KAFKA_FETCH_WAIT_MAX_MS=5
    KAFKA_TOPIC="e2e-$stamp-$bus" RABBITMQ_EXCHANGE="e2e-$stamp-$bus"
    RABBITMQ_QUEUE_PREFIX="e2e-$stamp-$bus." NATS_STREAM="e2e-$stamp-$bus"
    NATS_SUBJECT_PREFIX="e2e.$stamp.$bus" NATS_CONSUMER_PREFIX="e2e-$stamp-$bus-"
    REDIS_STREAMS_PREFIX="e2e-$stamp-$bus:" PERSIST_GROUP="db-writer-$stamp"
    ANALYTICS_GROUP="analytics-$stamp")
  if [ "$bus" = memory ]; then
    start "stomp-$bus" "$a" "${common[@]}" DATABASE_URL="sqlite://$tmp/stomp-$bus.db"
    b=$a
  else
    # Two instances share one PostgreSQL database (cluster presence).
    db="e2e_${stamp}_${bus//-/_}"
    psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $db" >/dev/null
    dbs+=("$db")
    url="postgres://postgres@127.0.0.1:5432/$db"
    start "a-$bus" "$a" "${common[@]}" DATABASE_URL="$url"
    start "b-$bus" "$b" "${common[@]}" DATABASE_URL="$url" ROLES=gateway
  fi
  BUS=$bus RELAY_A=http://127.0.0.1:$a RELAY_B=http://127.0.0.1:$b node --test stomp.test.mjs
done

echo "-- @stomp/stompjs with auth on (memory)"
secret="an-e2e-secret-that-is-at-least-32-bytes-long"
port=$(free_port)
start auth "$port" DATABASE_URL="sqlite://$tmp/auth.db" AUTH_JWT_SECRET="$secret" STOMP_HEARTBEAT_MS=1000
AUTH_SECRET=$secret RELAY_A=http://127.0.0.1:$port node --test stomp.test.mjs
