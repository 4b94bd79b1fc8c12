#!/usr/bin/env python3
"""Stepped rate: the highest publish rate a backend sustains.

Starts the relay on BACKEND the way loadtest/compare.py does (two gateways plus a
persistence/analytics process; one process for memory), then runs the k6
fan-out script (loadtest/fanout.js) at rising fixed arrival rates. A step
passes when k6 kept the rate (no dropped iterations), every acked message
reached every subscriber exactly once and in order, and the end-to-end p99 is
under --p99-ms. It stops at the first failing step and reports the last
passing rate as the highest sustainable one.

    loadtest/stepped.py --backend redis --rooms 20 --subs 10 --start 200 --step 200 --max 4000
"""
import argparse
import json
import os
import sys

import relaylib


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="memory", choices=["memory", "redis", "kafka", "rabbitmq"])
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--subs", type=int, default=10, help="subscribers per room")
    ap.add_argument("--start", type=int, default=200, help="first rate, msg/s")
    ap.add_argument("--step", type=int, default=200, help="rate increase per step, msg/s")
    ap.add_argument("--max", type=int, default=5000, help="last rate tried, msg/s")
    ap.add_argument("--step-s", type=int, default=10, help="seconds per step")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="end-to-end p99 limit")
    ap.add_argument("--size", type=int, default=100, help="message size, bytes")
    args = ap.parse_args()

    relaylib.build()
    stamp, out = relaylib.results_dir(f"stepped-{args.backend}")
    logdir = os.path.join(out, "logs")
    os.makedirs(logdir, exist_ok=True)
    env = dict(BUS=args.backend, DATABASE_URL=relaylib.fresh_database(f"stepped_{args.backend}_{stamp}"),
               KAFKA_TOPIC=f"stepped-{stamp}", RABBITMQ_EXCHANGE=f"stepped-{stamp}",
               RABBITMQ_QUEUE_PREFIX=f"stepped-{stamp}.", PERSIST_GROUP=f"db-writer-{stamp}",
               ANALYTICS_GROUP=f"analytics-{stamp}", PERSIST_BATCH_SIZE="1000",
               RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000", MAX_CONNS_PER_IP="0")
    if args.backend == "memory":
        procs = [relaylib.Relay("memory-a", env, "gateway,persist,analytics", logdir)]
        gateways = procs
    else:
        gateways = [relaylib.Relay(f"{args.backend}-a", env, "gateway", logdir),
                    relaylib.Relay(f"{args.backend}-b", env, "gateway", logdir)]
        procs = gateways + [relaylib.Relay(f"{args.backend}-w", env, "persist,analytics", logdir)]
    steps, best = [], None
    try:
        rate = args.start
        while rate <= args.max:
            p = dict(rooms=args.rooms, subs=args.subs, rate=rate, size=args.size)
            path = os.path.join(out, f"step-{rate}.json")
            k6, _ = relaylib.k6_fanout(gateways, f"s{stamp[-6:]}r{rate}", p, args.step_s, path)
            s = json.load(open(path))
            e = s["e2e_ms"]
            problems = []
            if s["dropped_iterations"]:
                problems.append(f"{s['dropped_iterations']} dropped iterations (generator or relay too slow)")
            if s["publish_failed"]:
                problems.append(f"{s['publish_failed']} publishes failed")
            for k in ("lost", "duplicates", "reordered", "gaps"):
                if s[k]:
                    problems.append(f"{s[k]} {k}")
            if e["p99"] > args.p99_ms:
                problems.append(f"p99 {e['p99']:.1f} ms > {args.p99_ms:g} ms")
            steps.append(dict(rate=rate, deliveries_per_s=round(s["deliveries_per_s"]), p50=e["p50"], p99=e["p99"],
                              lost=s["lost"], dropped=s["dropped_iterations"], ok=not problems, problems=problems))
            print(f"rate {rate:>6} msg/s: {s['deliveries_per_s']:>9.0f} deliveries/s, p50 {e['p50']:.1f} ms, "
                  f"p99 {e['p99']:.1f} ms -> {'ok' if not problems else 'FAIL: ' + '; '.join(problems)}", flush=True)
            if problems:
                break
            best = steps[-1]
            rate += args.step
    finally:
        for r in procs:
            r.stop()
        relaylib.drop_kafka_topic(env)
    result = dict(backend=args.backend, args=vars(args), steps=steps, highest_sustainable=best)
    with open(os.path.join(out, "stepped.json"), "w") as f:
        json.dump(result, f, indent=2)
    if best:
        print(f"\n{args.backend}: highest sustainable rate {best['rate']} msg/s = {best['deliveries_per_s']} "
              f"deliveries/s ({args.rooms} rooms x {args.subs} subscribers), p99 {best['p99']:.1f} ms")
    else:
        print(f"\n{args.backend}: not even {args.start} msg/s passed")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
