#!/usr/bin/env bash
# A/B of two relay builds on the same workload, alternating old/new so the
# machine's drift hits both alike; prints p50/p99, refused sends, live loss and
# duplication, PostgreSQL deadlocks of each run's database, and the CPU of the
# relays (summed, then per process), the broker and PostgreSQL.
#
#   loadtest/ab.sh OLD_BIN NEW_BIN [BACKENDS] [SECONDS] [ROUNDS]
#   loadtest/ab.sh /tmp/chat-relay-old target/release/chat-relay rabbitmq,kafka 30 2
#
# AB_OLD_ENV / AB_NEW_ENV add environment to one side (the same binary twice
# makes it an A/B of a setting):
#   AB_NEW_ENV="KAFKA_WORKER_FETCH_WAIT_MAX_MS=50" loadtest/ab.sh target/release/chat-relay target/release/chat-relay kafka 30 2
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p loadtest/results
old=$1 new=$2 backends=${3:-rabbitmq,kafka} secs=${4:-30} rounds=${5:-2}
for i in $(seq 1 "$rounds"); do
  for v in old new; do
    bin=$old extra=${AB_OLD_ENV:-}
    [ "$v" = new ] && bin=$new extra=${AB_NEW_ENV:-}
    out=loadtest/results/ab-$v-$i
    # shellcheck disable=SC2086 # word splitting of NAME=VALUE pairs is the point
    env $extra CHAT_RELAY_BIN=$(realpath "$bin") python3 loadtest/compare.py --profile full --generator loadgen \
      --backends "$backends" --no-fault --no-ceiling --seconds "$secs" --out "$out" >"$out.log" 2>&1
    d=$(ls -d "$out"/*/ | tail -1)
    python3 - "$d" "$v" "$backends" <<'PY'
import json, subprocess, sys
d, v, backends = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
run = d.rstrip("/").split("/")[-1]
for b in backends:
    j = json.load(open(f"{d}/{b}.json"))
    f = j["fanout"]
    raw = f.get("raw", f)
    db = f"bench_{b.replace('-', '_')}_{run}"
    dl = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc",
                         f"SELECT coalesce(sum(deadlocks),0) FROM pg_stat_database WHERE datname = '{db}'"],
                        capture_output=True, text=True).stdout.strip()
    e = raw["e2e_ms"]
    print(f"{v} {b}: p50 {e['p50']} ms, p99 {e['p99']} ms, acked {raw.get('acked')}, refused {raw.get('errors')}, "
          f"lost {raw.get('lost')}, dup {raw.get('duplicates')}, deadlocks {dl}; CPU % relay "
          f"{sum(j.get('relay_cpu_pct', {}).values()):.1f} ({', '.join(f'{k} {c}' for k, c in j.get('relay_cpu_pct', {}).items())}), broker {j.get('broker_cpu_pct')}, "
          f"PostgreSQL {j.get('db_cpu_pct')}", flush=True)
PY
  done
done
