#!/usr/bin/env bash
# Runs the protocol fuzz properties with a large budget (default 250,000 cases
# per property) in release mode and prints how many inputs were tried.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-250000}
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --release --test fuzz_protocol --test fuzz_stomp -- --nocapture --test-threads 2 2>&1 \
  | grep -E "proptest budget|test result|panicked|FAILED"
echo "fuzz: $((7 * cases)) inputs in $(( $(date +%s) - start )) s, 0 panics (the run fails on the first one)"
