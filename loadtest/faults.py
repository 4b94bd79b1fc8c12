#!/usr/bin/env python3
"""Fault tolerance, measured: one command, one table.

For each backend, a steady chat load runs through two gateway instances (A, B)
and one persistence/analytics process (W), and one fault is injected at a time:

  persist-kill   W is killed with SIGKILL and restarted 3 s later
  gateway-kill   A is killed with SIGKILL; its clients reconnect to B and resume
                 with `since` (A's publishers too)
  broker-restart the broker process goes away for 3 s and comes back: a private
                 redis-server is SIGKILLed and restarted on the same port (for
                 redis-streams with an AOF, `appendfsync always`, so the streams
                 survive; plain redis keeps nothing anyway); RabbitMQ
                 is stopped and started (`rabbitmqctl stop_app/start_app`); a
                 private tansu (Kafka protocol, SQLite storage) is SIGKILLed and
                 restarted; a private nats-server (JetStream, its own -sd store
                 directory) is SIGKILLed and restarted on the same port

Counted per run: messages acked to publishers; acked messages missing at a live
subscriber after it resumed (lost) and raw duplicate frames; acked messages
missing from the DB after recovery; rows in the DB whose sender never got an
ack ("stored, not acked" — e.g. the ack was lost with a gateway); sends answered
with `bus_unavailable`, and sends never answered at all (silence); the longest
gap in deliveries around the fault (time until delivery resumed).

    loadtest/faults.py                                  # all backends, all faults
    loadtest/faults.py --backends redis --faults broker-restart --rate 200
    loadtest/faults.py --backends redis-streams

`memory` is one process: it has no separate persistence worker, no second
gateway and no broker to restart, so its rows say n/a.
Writes loadtest/results/faults-<stamp>/{results.json,faults.md}.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import websockets  # loadtest/requirements.txt (scripts/services.sh installs it)

from relaylib import ROOT, Relay, free_port, port_open, psql
from relaylib import wait_until as wait

FAULTS = ["persist-kill", "gateway-kill", "broker-restart"]


class Broker:
    """The broker a backend runs on, and how to restart it."""

    def __init__(self, backend, logdir, stamp, durable=False):
        self.backend, self.logdir, self.proc, self.durable = backend, logdir, None, durable
        self.env = {}
        if backend in ("redis", "redis-streams"):
            self.port = free_port()
            self.env = dict(REDIS_URL=f"redis://127.0.0.1:{self.port}", REDIS_RECONNECT_MAX_MS="1000")
            if backend == "redis-streams":
                self.env["REDIS_STREAMS_PREFIX"] = f"faults-{stamp}:"
            self.start()
        elif backend == "kafka":
            self.port = free_port()
            self.env = dict(KAFKA_BROKERS=f"127.0.0.1:{self.port}", KAFKA_TOPIC=f"faults-{stamp}")
            if durable:
                # tansu's SQLite engine panics when an idempotent producer it
                # knew before a crash produces again.
                self.env["KAFKA_IDEMPOTENCE"] = "false"
            self.start()
        elif backend == "nats":
            # A private server for every run: the shared one on 4222 is never
            # killed. Its store directory survives the SIGKILL like a disk.
            self.port = free_port()
            self.store = os.path.join(logdir, f"nats-{stamp}")
            self.env = dict(NATS_URL=f"nats://127.0.0.1:{self.port}", NATS_STREAM=f"faults-{stamp}",
                            NATS_SUBJECT_PREFIX=f"faults.{stamp}", NATS_CONSUMER_PREFIX=f"faults-{stamp}-",
                            NATS_RECONNECT_MAX_MS="1000", NATS_PUBLISH_TIMEOUT_MS="2500")
            self.start()
        elif backend == "rabbitmq":
            self.env = dict(RABBITMQ_EXCHANGE=f"faults-{stamp}", RABBITMQ_QUEUE_PREFIX=f"faults-{stamp}.",
                            RABBITMQ_RECONNECT_MAX_MS="1000")

    def start(self):
        log = open(os.path.join(self.logdir, f"broker-{self.backend}.log"), "a")
        if self.backend in ("redis", "redis-streams"):
            persistence = ["--save", "", "--appendonly", "no"]
            if self.backend == "redis-streams" and self.durable:
                # Every XADD on disk before Redis answers: the streams, their
                # groups and pending entries survive the SIGKILL.
                aof = os.path.join(self.logdir, f"redis-{self.port}")
                os.makedirs(aof, exist_ok=True)
                persistence = ["--save", "", "--dir", aof, "--appendonly", "yes", "--appendfsync", "always"]
            self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                          *persistence], stdout=log, stderr=log)
            wait(lambda: port_open(self.port), 30, "redis")
        elif self.backend == "kafka":
            tansu = shutil.which("tansu") or os.path.expanduser("~/.cargo/bin/tansu")
            url = f"tcp://127.0.0.1:{self.port}"
            # SQLite storage: the log and committed offsets survive the
            # restart, as on a real Kafka broker's disk.
            # Memory storage (as in CI) unless the broker itself is restarted.
            store = os.path.join(self.logdir, f"tansu-{self.port}.db")
            engine = f"sqlite:///{store}" if self.durable else "memory://tansu/"
            self.proc = subprocess.Popen([tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                          "--storage-engine", engine], stdout=log, stderr=log)
            wait(lambda: port_open(self.port), 30, "tansu")
        elif self.backend == "nats":
            self.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                          "-sd", self.store], stdout=log, stderr=log)
            wait(lambda: port_open(self.port), 30, "nats-server")
        elif self.backend == "rabbitmq":
            subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True)
            wait(lambda: port_open(5672), 60, "rabbitmq")

    def stop(self):
        if self.backend == "rabbitmq":
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True)
        elif self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self, down_s):
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self):
        if self.backend != "rabbitmq" and self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Load:
    """Publishers and subscribers that reconnect and resume like the browser client."""

    def __init__(self, gateways, rooms, subs, rate):
        self.gateways = gateways  # list of ports, some may die
        self.rooms = rooms
        self.subs = subs
        self.rate = rate
        self.acked = {}          # id -> room
        self.sent = 0
        self.errors = {}
        self.unanswered = 0
        self.deliveries = []     # receipt times of first sight of an id, any subscriber
        self.seen = {}           # (room, sub) -> set of ids
        self.dups = 0
        self.not_recovered = 0
        self.gaps_told = 0       # `gap` frames: a gateway's live stream lost messages it could not find
        self.reconnects = 0
        self.stop_pub = asyncio.Event()
        self.stop_all = asyncio.Event()

    async def connect(self, prefer, user):
        """Connects to the preferred gateway, else any other that answers."""
        order = self.gateways[prefer % len(self.gateways):] + self.gateways[:prefer % len(self.gateways)]
        delay = 0.1
        while not self.stop_all.is_set():
            for port in order:
                try:
                    return await websockets.connect(f"ws://127.0.0.1:{port}/ws?user={user}",
                                                    open_timeout=2, max_queue=None)
                except Exception:
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return None

    async def subscriber(self, room, i):
        key = (room, i)
        self.seen[key] = set()
        last = None
        attempt = 0
        while not self.stop_all.is_set():
            ws = await self.connect(i + attempt, f"s{i}")
            if ws is None:
                return
            if attempt:
                self.reconnects += 1
            attempt += 1
            try:
                join = {"type": "join", "room": room}
                if last:
                    join["since"] = last
                await ws.send(json.dumps(join))
                while not self.stop_all.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    f = json.loads(raw)
                    if f.get("type") == "joined" and last and not f.get("recovered"):
                        self.not_recovered += 1
                    if f.get("type") == "gap":
                        self.gaps_told += 1
                    if f.get("type") != "message" or f.get("kind") == "system":
                        continue
                    mid = f["id"]
                    if mid in self.seen[key]:
                        self.dups += 1
                        continue
                    self.seen[key].add(mid)
                    self.deliveries.append(time.time())
                    if last is None or mid > last:
                        last = mid
            except Exception:
                pass
            finally:
                try:
                    await ws.close()
                except Exception:
                    pass

    async def publisher(self, room, n):
        per_s = self.rate / self.rooms
        seq = 0
        attempt = 0
        while not self.stop_pub.is_set():
            ws = await self.connect(n + attempt, f"p{n}")
            if ws is None:
                return
            attempt += 1
            pending = {}
            rtask = None
            try:
                await ws.send(json.dumps({"type": "join", "room": room}))
                next_at = time.time()

                async def reader():
                    async for raw in ws:
                        f = json.loads(raw)
                        t = f.get("type")
                        if t == "ack" and f.get("cid") in pending:
                            pending.pop(f["cid"])
                            self.acked[f["id"]] = room
                        elif t == "error" and f.get("cid") in pending:
                            pending.pop(f["cid"])
                            self.errors[f["code"]] = self.errors.get(f["code"], 0) + 1

                rtask = asyncio.create_task(reader())
                while not self.stop_pub.is_set() and not rtask.done():
                    now = time.time()
                    if now < next_at:
                        await asyncio.sleep(next_at - now)
                    next_at += 1 / per_s
                    seq += 1
                    cid = f"{n}-{seq}"
                    pending[cid] = time.time()
                    self.sent += 1
                    await ws.send(json.dumps({"type": "send", "room": room, "text": f"m{seq}", "cid": cid}))
                # Give answers in flight a moment, then count silence.
                deadline = time.time() + 6
                while pending and time.time() < deadline and not rtask.done():
                    await asyncio.sleep(0.1)
            except Exception:
                pass
            finally:
                if rtask is not None:
                    # Collected, not left for the garbage collector: a reader
                    # whose socket the fault killed ended with an exception,
                    # which asyncio would print as "never retrieved".
                    rtask.cancel()
                    await asyncio.gather(rtask, return_exceptions=True)
                self.unanswered += len(pending)
                try:
                    await ws.close()
                except Exception:
                    pass


async def drive(load, room_names, fault_at, run_s, inject):
    tasks = [asyncio.create_task(load.subscriber(r, i)) for r in room_names for i in range(load.subs)]
    await asyncio.sleep(1.5)
    tasks += [asyncio.create_task(load.publisher(r, n)) for n, r in enumerate(room_names)]
    t0 = time.time()
    await asyncio.sleep(fault_at)
    fault_t = time.time()
    await asyncio.get_running_loop().run_in_executor(None, inject)
    await asyncio.sleep(max(0, run_s - (time.time() - t0)))
    load.stop_pub.set()
    end_pub = time.time()
    await asyncio.sleep(8)  # drain: reconnects, resumes, late deliveries
    load.stop_all.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return fault_t, end_pub


def run_one(backend, fault, args, logdir, stamp, n):
    broker = Broker(backend, logdir, f"{stamp}-{n}", durable=fault == "broker-restart")
    db = f"faults_{stamp}_{n}"
    psql(f"CREATE DATABASE {db}")
    env = dict(BUS=backend, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}",
               PERSIST_GROUP=f"db-writer-{stamp}-{n}", ANALYTICS_GROUP=f"analytics-{stamp}-{n}",
               RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000", MAX_CONNS_PER_IP="0",
               PUBLISH_TIMEOUT_MS="3000", KAFKA_MESSAGE_TIMEOUT_MS="2500", **broker.env)
    procs = []
    try:
        if backend == "memory":
            a = Relay(f"{backend}-{n}-a", env, "gateway,persist,analytics", logdir)
            procs, gateways, worker, b = [a], [a.port], None, None
        else:
            a = Relay(f"{backend}-{n}-a", env, "gateway", logdir)
            b = Relay(f"{backend}-{n}-b", env, "gateway", logdir)
            worker = Relay(f"{backend}-{n}-w", env, "persist,analytics", logdir)
            procs, gateways = [a, b, worker], [a.port, b.port]
        timeline = {}

        def inject():
            timeline["fault"] = time.time()
            if fault == "persist-kill":
                worker.kill()
                time.sleep(3)
                worker.start()
            elif fault == "gateway-kill":
                a.kill()
            elif fault == "broker-restart":
                broker.restart(3)
            timeline["recovered_process"] = time.time()

        load = Load(gateways, args.rooms, args.subs, args.rate)
        rooms = [f"chat.f{stamp}{n}r{i}" for i in range(args.rooms)]
        fault_t, end_pub = asyncio.run(drive(load, rooms, 5, args.run_s, inject))
        # DB after recovery: wait until every acked message is stored (or 120 s).
        acked = load.acked
        ids_sql = ",".join(f"'{i}'" for i in acked) or "''"
        waited = time.time()
        deadline = time.time() + 120
        stored = 0
        while time.time() < deadline:
            stored = int(psql(f"SELECT COUNT(*) FROM messages WHERE id IN ({ids_sql})", db))
            if stored >= len(acked):
                break
            time.sleep(0.5)
        db_catch_up_s = round(time.time() - waited, 1)
        time.sleep(1)
        stored = int(psql(f"SELECT COUNT(*) FROM messages WHERE id IN ({ids_sql})", db))
        rows = int(psql(f"SELECT COUNT(*) FROM messages WHERE room LIKE 'chat.f{stamp}{n}r%' AND kind='chat'", db))
        # Messages gateways caught up from the DB after their own live
        # subscription was interrupted (a crashed gateway reports nothing).
        caught_up = int(sum(g.metric("live_gap_filled_total") for g in (a, b) if g and g.proc.poll() is None))
        lost_live = 0
        for (room, _), seen in load.seen.items():
            lost_live += sum(1 for mid, r in acked.items() if r == room and mid not in seen)
        d = sorted(t for t in load.deliveries if fault_t - 1 <= t <= end_pub)
        gap = max((b2 - b1 for b1, b2 in zip(d, d[1:])), default=None)
        return dict(backend=backend, fault=fault, sent=load.sent, acked=len(acked),
                    bus_unavailable=load.errors.get("bus_unavailable", 0),
                    other_errors={k: v for k, v in load.errors.items() if k != "bus_unavailable"},
                    unanswered=load.unanswered, lost_live=lost_live, dup_live=load.dups,
                    subscribers=args.rooms * args.subs, not_recovered=load.not_recovered,
                    gaps_told=load.gaps_told, caught_up_from_db=caught_up,
                    reconnects=load.reconnects, db_missing=len(acked) - stored,
                    db_unacked_rows=rows - stored, longest_gap_s=round(gap, 2) if gap else None,
                    db_complete_after_s=db_catch_up_s)
    finally:
        for p in procs:
            p.stop()
        broker.close()


def table(results):
    head = ("| backend | fault | sent | acked | `bus_unavailable` | unanswered | lost at live clients (acked) | dup frames | "
            "resumes `recovered:false` | `gap` frames told | caught up from the DB | "
            "DB missing (acked) | DB rows not acked | longest delivery gap | DB complete after the load |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if "na" in r:
            rows.append(f"| {r['backend']} | {r['fault']} | n/a: {r['na']} |||||||||||||")
            continue
        rows.append(f"| {r['backend']} | {r['fault']} | {r['sent']} | {r['acked']} | {r['bus_unavailable']} | {r['unanswered']} "
                    f"| {r['lost_live']} | {r['dup_live']} | {r['not_recovered']} | {r['gaps_told']} | {r['caught_up_from_db']} "
                    f"| {r['db_missing']} | {r['db_unacked_rows']} | "
                    f"{r['longest_gap_s']} s | {r['db_complete_after_s']} s |")
    return head + "\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="memory,redis,redis-streams,kafka,rabbitmq,nats")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--rooms", type=int, default=4)
    ap.add_argument("--subs", type=int, default=3, help="subscribers per room")
    ap.add_argument("--rate", type=float, default=100, help="messages per second in all")
    ap.add_argument("--run-s", type=float, default=20, help="publishing time per run (fault at 5 s)")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "chat-relay"], cwd=ROOT, check=True)
    stamp = time.strftime("%m%d%H%M%S")
    out = os.path.join(ROOT, "loadtest/results", f"faults-{stamp}")
    logdir = os.path.join(out, "logs")
    os.makedirs(logdir, exist_ok=True)
    results, n = [], 0
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for fault in [f.strip() for f in args.faults.split(",") if f.strip()]:
            n += 1
            if backend == "memory":
                results.append(dict(backend=backend, fault=fault,
                                    na="one process: no separate worker, second gateway or broker"))
                continue
            print(f"== {backend} / {fault}", flush=True)
            r = run_one(backend, fault, args, logdir, stamp, n)
            print("   " + json.dumps(r), flush=True)
            results.append(r)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=2)
    md = table(results)
    md += (f"\n\nLoad: {args.rooms} rooms x {args.subs} subscribers, {args.rate:g} msg/s over WebSocket for "
           f"{args.run_s:g} s, fault at 5 s; subscribers reconnect to any live gateway and resume with `since`. "
           "Two gateways + one persistence/analytics process on PostgreSQL.\n")
    with open(os.path.join(out, "faults.md"), "w") as f:
        f.write(md)
    print("\n" + md + f"\nresults: {out}")


if __name__ == "__main__":
    sys.exit(main())
