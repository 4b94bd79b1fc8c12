#!/usr/bin/env python3
"""Fan-out performance with the lean Rust generator (target/release/loadgen).

Starts the relay on BACKEND (one all-roles process for memory; a gateway plus
a persistence/analytics process otherwise), then runs loadgen --runs times
(default 3) with the same workload and prints every run and the median:
deliveries/s, end-to-end p50/p99/p99.9, loss/dup/reorder, relay and generator
CPU. The generator shares the machine with the relay: its CPU is reported so a
saturated generator is visible.

    loadtest/perf.py --backend memory --rooms 100 --subs 50 --rate 4000 --seconds 20

With several rates (--rate 200,400,800) each is run --runs times and the
highest rate whose median passes is reported as sustainable: end-to-end p99
under --p99-ms, 0 lost/duplicated/reordered, and the generator kept its
schedule (late sends under 1 % of sends: otherwise the generator, not the
relay, set the pace).
"""
import argparse
import json
import os
import statistics
import sys

import relaylib


def relay_env(backend, dburl, stamp):
    """The relay's settings for these runs (loadtest/profile.py uses them too):
    limits off so the generator, not a rate limit, sets the pace."""
    return dict(BUS=backend, DATABASE_URL=dburl, KAFKA_TOPIC=f"perf-{stamp}",
                RABBITMQ_EXCHANGE=f"perf-{stamp}", RABBITMQ_QUEUE_PREFIX=f"perf-{stamp}.",
                PERSIST_GROUP=f"db-writer-{stamp}", ANALYTICS_GROUP=f"analytics-{stamp}",
                PERSIST_BATCH_SIZE="2000", RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000",
                MAX_CONNS_PER_IP="0", FLOOD_WARNINGS="false", TCP_NODELAY=os.environ.get("TCP_NODELAY", "true"))


def us_per_delivery(marks, names, deliveries_per_s):
    """CPU µs per delivery of the processes `names` over the publishing
    window: loadgen's publish-start / publish-end marks (time, CPU seconds
    by process name; `relaylib.Loadgen.marks`)."""
    (t0, c0), (t1, c1) = marks["publish-start"], marks["publish-end"]
    delivered = deliveries_per_s * (t1 - t0)
    return 1e6 * sum(c1[n] - c0[n] for n in names) / max(delivered, 1)


def one_run(args, procs, rate, prefix):
    """One loadgen run. CPU is measured over the publishing window only
    (between loadgen's publish-start / publish-end markers on stderr), so
    connecting thousands of subscribers does not dilute it."""
    cmd = relaylib.loadgen_cmd(procs[:1], args.rooms, args.subs, args.publishers, rate, args.seconds,
                               args.size, prefix)
    # Sends per sequencer burst (the relay's own histogram; the floor has none).
    seq = [p for p in procs if isinstance(p, relaylib.Relay)][:1]
    bursts0 = [(p.metric("sequencer_batch_size_sum"), p.metric("sequencer_batch_size_count")) for p in seq]
    gen = relaylib.Loadgen(cmd, pids={p.name: p.proc.pid for p in procs})
    r = gen.result()
    for p, (s0, c0) in zip(seq, bursts0):
        s1, c1 = p.metric("sequencer_batch_size_sum"), p.metric("sequencer_batch_size_count")
        r["sends_per_burst"] = round((s1 - s0) / max(c1 - c0, 1), 2)
    for line in gen.errors:
        sys.stderr.write(line + "\n")
    marks = {m: v for m, v in gen.marks.items() if m in ("publish-start", "publish-end")}
    pids = gen.pids
    if len(marks) == 2:
        (t0, c0), (t1, c1) = marks["publish-start"], marks["publish-end"]
        pct = {n: round(100 * (c1[n] - c0[n]) / max(t1 - t0, 0.001)) for n in pids}
        r["relay_cpu_pct"] = {p.name: pct[p.name] for p in procs}
        r["loadgen_cpu_pct"] = pct["loadgen"]
        # Relay CPU time per delivery, over every relay process (µs).
        r["relay_us_per_delivery"] = round(us_per_delivery(marks, [p.name for p in procs], r["deliveries_per_s"]), 1)
        # The server's context switches per message sent: its thread
        # wake-ups, a cost shared by the message's deliveries.
        s0, s1 = gen.switches["publish-start"], gen.switches["publish-end"]
        sent = rate * (t1 - t0)
        r["switches_per_msg"] = round(sum(s1[p.name] - s0[p.name] for p in procs) / max(sent, 1), 2)
    else:
        r["relay_cpu_pct"], r["loadgen_cpu_pct"], r["relay_us_per_delivery"] = {}, 0, 0
        r["switches_per_msg"] = 0
    r["relay_rss_mb"] = {p.name: round(relaylib.rss_mb(p.proc.pid)) for p in procs}
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="memory", choices=["memory", "redis", "kafka", "rabbitmq"])
    ap.add_argument("--server", default="relay", choices=["relay", "floor", "both"],
                    help="relay; the floor (target/release/floor); both, alternating")
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--subs", type=int, default=50)
    ap.add_argument("--publishers", type=int, default=100)
    ap.add_argument("--rate", default="4000", help="msg/s over all publishers; comma-separated for a sweep")
    ap.add_argument("--p99-ms", type=float, default=20.0, help="end-to-end p99 limit of a sustainable rate")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--db", default="postgres", choices=["postgres", "sqlite"])
    args = ap.parse_args()
    relaylib.build()
    stamp, out = relaylib.results_dir(f"perf-{args.backend}")
    if args.db == "postgres":
        db = f"perf_{args.backend}_{stamp}"
        dburl = relaylib.fresh_database(db)
    else:
        dburl = f"sqlite://{out}/perf.db"
    env = relay_env(args.backend, dburl, stamp)
    rates = [int(x) for x in args.rate.split(",")]
    names = ["relay", "floor"] if args.server == "both" else [args.server]
    servers = {}
    runs = []
    try:
        if "relay" in names:
            if args.backend == "memory":
                servers["relay"] = [relaylib.Relay("perf", env, "gateway,persist,analytics", out)]
            else:
                servers["relay"] = [relaylib.Relay("perf-gw", env, "gateway", out),
                                    relaylib.Relay("perf-w", env, "persist,analytics", out)]
        if "floor" in names:
            servers["floor"] = [relaylib.Server("floor", [relaylib.FLOOR, "--bind", "127.0.0.1:{port}"], out,
                                                env=dict(TCP_NODELAY=env["TCP_NODELAY"]))]
        for rate in rates:
            for i in range(args.runs):
                # Alternating, and the order flipped every run: drift on the
                # shared machine (other builds, page cache) hits both alike.
                for name in (names if i % 2 == 0 else names[::-1]):
                    r = one_run(args, servers[name], rate, f"p{stamp[-6:]}{name[0]}x{rate}r{i}")
                    r["offered_rate"], r["server"] = rate, name
                    runs.append(r)
                    e = r["e2e_ms"]
                    print(f"{name} {rate} msg/s run {i + 1}: {r['deliveries_per_s']:>9.0f} deliveries/s  p50 {e['p50']:.2f} ms  "
                          f"p99 {e['p99']:.2f} ms  p99.9 {e['p999']:.2f} ms  lost {r['lost']} dup {r['duplicates']} "
                          f"reordered {r['reordered']}  late sends {r['late_sends']}  server CPU {r['relay_cpu_pct']} "
                          f"({r['relay_us_per_delivery']} µs/delivery, {r['switches_per_msg']} context switches/msg"
                          + (f", {r['sends_per_burst']} sends per sequencer burst" if "sends_per_burst" in r else "") + ")  "
                          f"loadgen CPU {r['loadgen_cpu_pct']}%", flush=True)
    finally:
        for ps in servers.values():
            for p in ps:
                p.stop()
        relaylib.drop_kafka_topic(env)
    persist = None
    if args.db == "postgres" and "relay" in names:
        # Persist lag of every stored row over all runs: stored_at - ts (ms).
        n, p50, p99, mx = relaylib.psql(
            "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY stored_at - ts), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY stored_at - ts), max(stored_at - ts) FROM messages",
            db).split("|")
        persist = dict(rows=int(n), lag_ms=dict(p50=float(p50 or 0), p99=float(p99 or 0), max=float(mx or 0)))
    all_medians = {}
    for name in names:
        medians = all_medians[name] = {}
        label = args.backend if name == "relay" else "floor"
        for rate in rates:
            rs = [r for r in runs if r["offered_rate"] == rate and r["server"] == name]
            med = lambda f: statistics.median(f(r) for r in rs)
            m = dict(deliveries_per_s=med(lambda r: r["deliveries_per_s"]),
                     p50=med(lambda r: r["e2e_ms"]["p50"]), p99=med(lambda r: r["e2e_ms"]["p99"]),
                     p999=med(lambda r: r["e2e_ms"]["p999"]), lost=med(lambda r: r["lost"]),
                     dup=med(lambda r: r["duplicates"]), reordered=med(lambda r: r["reordered"]),
                     late_pct=med(lambda r: 100 * r["late_sends"] / max(r["sent"], 1)),
                     relay_us_per_delivery=med(lambda r: r["relay_us_per_delivery"]))
            m["sustained"] = (m["p99"] < args.p99_ms and m["lost"] == 0 and m["dup"] == 0
                              and m["reordered"] == 0 and m["late_pct"] < 1)
            medians[rate] = m
            print(f"\nmedian of {len(rs)}: {label} {args.rooms} rooms x {args.subs} subs at {rate} msg/s: "
                  f"{m['deliveries_per_s']:.0f} deliveries/s, p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms, "
                  f"p99.9 {m['p999']:.2f} ms, lost {m['lost']:.0f}, dup {m['dup']:.0f}, reordered {m['reordered']:.0f}, "
                  f"late sends {m['late_pct']:.1f} %, server {m['relay_us_per_delivery']} µs CPU/delivery -> {'sustained' if m['sustained'] else 'NOT sustained'} "
                  f"(p99 < {args.p99_ms:g} ms)")
    if args.server == "both":
        print(f"\n| rate | server | CPU µs per delivery | p50 | p99 | lost | deliveries/s |")
        print("|---|---|---|---|---|---|---|")
        for rate in rates:
            for name in names:
                m = all_medians[name][rate]
                who = f"relay ({args.backend}, {'+'.join(p.name for p in servers['relay'])})" if name == "relay" else "floor"
                print(f"| {rate} | {who} | {m['relay_us_per_delivery']} | {m['p50']:.2f} ms | {m['p99']:.2f} ms "
                      f"| {m['lost']:.0f} | {m['deliveries_per_s']:.0f} |")
            rl, fl = all_medians["relay"][rate], all_medians["floor"][rate]
            print(f"| {rate} | **relay / floor** | **{rl['relay_us_per_delivery'] / max(fl['relay_us_per_delivery'], 0.001):.2f}x** "
                  f"| {rl['p50'] / max(fl['p50'], 0.001):.2f}x | {rl['p99'] / max(fl['p99'], 0.001):.2f}x | | |")
    medians = all_medians[names[0]]
    best = max((r for r in rates if medians[r]["sustained"]), default=None)
    summary = dict(backend=args.backend, args=vars(args), runs=runs, persist=persist,
                   median={str(r): m for r, m in medians.items()}, highest_sustained_rate=best,
                   medians_by_server={n: {str(r): m for r, m in ms.items()} for n, ms in all_medians.items()},
                   highest_sustained_deliveries_per_s=medians[best]["deliveries_per_s"] if best else 0)
    with open(os.path.join(out, "perf.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if len(rates) > 1:
        print(f"highest sustained: {best or 'none'} msg/s"
              + (f" = {medians[best]['deliveries_per_s']:.0f} deliveries/s" if best else ""))
    if persist:
        print(f"persisted {persist['rows']} rows, persist lag p50 {persist['lag_ms']['p50']:.0f} ms, "
              f"p99 {persist['lag_ms']['p99']:.0f} ms, max {persist['lag_ms']['max']:.0f} ms")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
