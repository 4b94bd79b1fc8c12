#!/usr/bin/env bash
# The measurements behind the README's comparison section, in one go (about
# 55 minutes on the 2-core CI machine; run it on a quiet machine):
# the full comparison of every backend with its broker-alone ceiling, the
# scaling runs (1, 2 and 4 gateways), the floor and the Socket.IO peer run,
# the last two also with one runtime thread per process.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-loadtest/results/final-$(date +%Y%m%d%H%M%S)}
mkdir -p "$out"
echo "== full comparison"; python3 loadtest/compare.py --profile full --generator loadgen --out "$out/compare" 2>&1 | tee "$out/compare.log"
echo "== faults (the two newest backends)"; python3 loadtest/faults.py --backends redis-streams,nats --run-s 12 2>&1 | tee "$out/faults.log"
for g in 1 4; do
  echo "== scaling: $g gateway(s)"
  python3 loadtest/compare.py --profile full --generator loadgen --backends redis,redis-streams,kafka,rabbitmq,nats \
    --gateways $g --no-fault --no-ceiling --seconds 15 --out "$out/scaling-g$g" 2>&1 | tee "$out/scaling-g$g.log"
done
echo "== floor"; python3 loadtest/perf.py --server both --backend memory --rooms 20 --subs 25 --publishers 20 --rate 100,400 --seconds 10 --runs 3 2>&1 | tee "$out/floor.log"
echo "== peers"; python3 loadtest/peers.py --seconds 10 2>&1 | tee "$out/peers.log"
# The same two runs with one runtime thread per process (the relay's and the
# floor's WORKER_THREADS; Node is one thread per Socket.IO instance anyway).
echo "== floor, one worker thread"; WORKER_THREADS=1 python3 loadtest/perf.py --server both --backend memory --rooms 20 --subs 25 --publishers 20 --rate 100,400 --seconds 10 --runs 3 2>&1 | tee "$out/floor-1thread.log"
echo "== peers, one worker thread"; python3 loadtest/peers.py --seconds 10 --relay-env WORKER_THREADS=1 2>&1 | tee "$out/peers-1thread.log"
echo "results: $out"
