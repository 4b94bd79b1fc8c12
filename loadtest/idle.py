#!/usr/bin/env python3
"""What the relay costs per second with no traffic (issue #15: its CPU per
delivery rose at low rates, so something costs per second).

Starts --gateways relay gateways (ROLES=gateway) and one persistence/analytics
process on BUS (default redis) and a fresh PostgreSQL database, then measures
each process's CPU over --seconds:

1. empty: no connection at all;
2. joined: --conns idle WebSocket connections on the first gateway
   (target/release/loadgen --idle-conns, each joined to one of --rooms
   rooms), no message sent; the other gateway serves none.

The persistence worker PSUBSCRIBEs every chat channel: on a Redis shared
with other runs its CPU includes their messages (the gateways' does not).

Prints CPU milliseconds per second per process for both phases (from
/proc/<pid>/task/*/schedstat, in ns: /proc/<pid>/stat's 10 ms ticks are too
coarse for an idle process).

    loadtest/idle.py                       # redis, 2 gateways, 500 connections in 20 rooms, 20 s each
    loadtest/idle.py --bus memory --gateways 1
"""
import argparse
import json
import os
import sys
import time

import relaylib


def cpu(procs):
    return {p.name: cpu_ns(p.proc.pid) / 1e9 for p in procs}


def cpu_ns(pid):
    """CPU time of every thread of `pid` in ns (/proc/<pid>/task/*/schedstat):
    /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for an idle
    process."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    except OSError:
        pass
    return total


def per_sec(c0, c1, secs):
    return {n: round(1000 * (c1[n] - c0[n]) / secs, 2) for n in c0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bus", default="redis", choices=["memory", "redis", "kafka", "rabbitmq"])
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--settle", type=int, default=3, help="seconds after start / after the joins before measuring")
    args = ap.parse_args()
    relaylib.build()
    stamp, out = relaylib.results_dir(f"idle-{args.bus}")
    env = dict(BUS=args.bus, DATABASE_URL=relaylib.fresh_database(f"idle_{stamp}"), MAX_CONNS_PER_IP="0",
               PERSIST_GROUP=f"db-writer-{stamp}", ANALYTICS_GROUP=f"analytics-{stamp}",
               KAFKA_TOPIC=f"idle-{stamp}", RABBITMQ_EXCHANGE=f"idle-{stamp}",
               RABBITMQ_QUEUE_PREFIX=f"idle-{stamp}.")
    if args.bus == "memory":
        procs = [relaylib.Relay("idle", env, "gateway,persist,analytics", out)]
        gws = procs
    else:
        gws = [relaylib.Relay(f"idle-gw{i + 1}", env, "gateway", out) for i in range(args.gateways)]
        procs = gws + [relaylib.Relay("idle-w", env, "persist,analytics", out)]
    res = {}
    try:
        time.sleep(args.settle)
        c0, t0 = cpu(procs), time.time()
        time.sleep(args.seconds)
        res["empty"] = per_sec(c0, cpu(procs), time.time() - t0)
        print(f"empty, {args.seconds} s: CPU ms per second {res['empty']}", flush=True)
        hold = args.seconds + args.settle + 2
        gen = relaylib.Loadgen([relaylib.LOADGEN, "--url", f"ws://127.0.0.1:{gws[0].port}",
                                "--idle-conns", str(args.conns), "--rooms", str(args.rooms),
                                "--hold", str(hold), "--prefix", f"idle{stamp[-6:]}"],
                               pids={p.name: p.proc.pid for p in procs})
        gen.events["all joined"].wait(120)
        time.sleep(args.settle)
        c0, t0 = cpu(procs), time.time()
        time.sleep(args.seconds)
        res["joined"] = per_sec(c0, cpu(procs), time.time() - t0)
        r = gen.result(check=False)
        print(f"{r.get('joined')} idle joined connections in {args.rooms} rooms, {args.seconds} s: "
              f"CPU ms per second {res['joined']}", flush=True)
    finally:
        for p in procs:
            p.stop()
        relaylib.drop_kafka_topic(env)
    with open(os.path.join(out, "idle.json"), "w") as f:
        json.dump(dict(args=vars(args), cpu_ms_per_s=res), f, indent=2)
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
