#!/usr/bin/env bash
# The one test command: brings up every backend on 127.0.0.1 (installing what
# is missing), then runs formatting and lint checks, every Rust test against
# the real brokers and databases, and the browser end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
mkdir -p target
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee target/test-output.txt
echo "== k6 fan-out smoke"
cargo build --quiet
RELAY_BIN="$PWD/target/debug/chat-relay" bash loadtest/smoke.sh
if [ -x e2e/run.sh ]; then
  echo "== browser end-to-end test (headless Chromium)"
  cargo build --quiet
  RELAY_BIN="$PWD/target/debug/chat-relay" bash e2e/run.sh
fi

echo "== the README's run command, verbatim: cargo run --release"
bash scripts/run-command-check.sh
