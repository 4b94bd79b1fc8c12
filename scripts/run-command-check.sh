#!/usr/bin/env bash
# Proves the README's first command works verbatim on this checkout: runs
# `cargo run --release` from the repository root (memory bus, SQLite file
# chat-relay.db in the working directory — the defaults), waits for /healthz,
# loads the page at /, then stops the server with SIGTERM and checks it exited
# cleanly. Fails loudly on any step.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
fail() { printf '\033[31m[run-command] FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
  fail "something already listens on 127.0.0.1:8080 (the README command's default BIND)"
fi
log=target/run-command.log
mkdir -p target
cargo run --release >"$log" 2>&1 &
cargo_pid=$!
cleanup() { pkill -TERM -P "$cargo_pid" 2>/dev/null || true; kill "$cargo_pid" 2>/dev/null || true; }
trap cleanup EXIT

# The first run compiles the release build: allow for it.
for _ in $(seq 1 900); do
  curl -fsS http://127.0.0.1:8080/healthz >/dev/null 2>&1 && break
  kill -0 "$cargo_pid" 2>/dev/null || { tail -20 "$log" >&2; fail "cargo run --release exited"; }
  sleep 1
done
curl -fsS http://127.0.0.1:8080/healthz >/dev/null || { tail -20 "$log" >&2; fail "/healthz did not answer within 15 minutes"; }
page=$(curl -fsS http://127.0.0.1:8080/) || fail "GET / failed"
grep -q "<title>chat-relay</title>" <<<"$page" || fail "GET / did not return the browser client"
echo "[run-command] /healthz ok, / serves the browser client"

# On Unix `cargo run` replaces itself with the program (exec); an older cargo
# keeps running as its parent.
server_pid=$(pgrep -P "$cargo_pid" -f "release/chat-relay" | head -n1 || true)
kill -TERM "${server_pid:-$cargo_pid}"
status=0
wait "$cargo_pid" || status=$?
trap - EXIT
[ "$status" = 0 ] || { tail -20 "$log" >&2; fail "the server did not exit cleanly on SIGTERM (cargo exit $status)"; }
echo "[run-command] stopped cleanly"
