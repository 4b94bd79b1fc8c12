#!/usr/bin/env python3
"""Soak: moderate load for a long time; memory and open files must stay flat.

Starts one relay (all roles, BUS as given, PostgreSQL), runs the k6 fan-out
script at a moderate rate for --minutes, and every --every seconds samples the
relay's RSS and open file descriptors (/proc). Prints the samples and the
growth between the first and the second half of the run (a leak shows as a
steady climb; warm-up growth in the first minutes is expected).

    loadtest/soak.py --minutes 30 --backend memory --rate 200
"""
import argparse
import json
import os
import sys
import time

import relaylib


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="memory", choices=["memory", "redis", "kafka", "rabbitmq"])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--subs", type=int, default=10)
    ap.add_argument("--every", type=int, default=30, help="sampling interval, s")
    args = ap.parse_args()
    relaylib.build()
    stamp, out = relaylib.results_dir("soak")
    env = dict(BUS=args.backend, DATABASE_URL=relaylib.fresh_database(f"soak_{stamp}"),
               KAFKA_TOPIC=f"soak-{stamp}", RABBITMQ_EXCHANGE=f"soak-{stamp}",
               RABBITMQ_QUEUE_PREFIX=f"soak-{stamp}.", PERSIST_GROUP=f"db-writer-{stamp}",
               ANALYTICS_GROUP=f"analytics-{stamp}",
               RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000", MAX_CONNS_PER_IP="0")
    relay = relaylib.Relay("soak", env, "gateway,persist,analytics", out)
    run_s = int(args.minutes * 60)
    p = dict(rooms=args.rooms, subs=args.subs, rate=args.rate, size=100)
    samples = []
    try:
        k6, _ = relaylib.k6_fanout([relay], f"soak{stamp[-6:]}", p, run_s, os.path.join(out, "k6.json"), wait=False)
        t0 = time.time()
        while k6.poll() is None:
            s = dict(t=round(time.time() - t0), rss_mb=round(relaylib.rss_mb(relay.proc.pid), 1),
                     fds=fds(relay.proc.pid), cpu_s=round(relaylib.cpu_seconds(relay.proc.pid), 1))
            samples.append(s)
            print(f"t={s['t']:>5}s rss={s['rss_mb']:>7} MB fds={s['fds']:>5} cpu={s['cpu_s']} s", flush=True)
            time.sleep(args.every)
        k6.communicate()
        fan = json.load(open(os.path.join(out, "k6.json")))
    finally:
        relay.stop()
        relaylib.drop_kafka_topic(env)
    half = [s for s in samples if s["t"] >= run_s / 2]
    first = [s for s in samples if 60 <= s["t"] < run_s / 2] or samples[:1]
    avg = lambda xs, k: sum(x[k] for x in xs) / max(len(xs), 1)
    result = dict(args=vars(args), samples=samples, fanout=fan,
                  rss_first_half_mb=round(avg(first, "rss_mb"), 1), rss_second_half_mb=round(avg(half, "rss_mb"), 1),
                  fds_first_half=round(avg(first, "fds"), 1), fds_second_half=round(avg(half, "fds"), 1))
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nsoak {args.minutes:g} min, {args.backend}, {args.rooms}x{args.subs} at {args.rate} msg/s: "
          f"RSS {result['rss_first_half_mb']} -> {result['rss_second_half_mb']} MB, "
          f"fds {result['fds_first_half']} -> {result['fds_second_half']} (first half from 60 s vs second half); "
          f"delivered {fan['deliveries']}/{fan['expected_deliveries']}, lost {fan['lost']}")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
