#!/usr/bin/env python3
"""The peer run (issue #15): the relay against a Socket.IO 4 server on the
same workload, both on Redis, driven by the same Node generator.

Starts two relay gateways (BUS=redis, ROLES=gateway) plus the one
persistence/analytics process the relay needs (ROLES=persist,analytics, on a
fresh PostgreSQL database), and two Socket.IO instances
(loadtest/peers/server.mjs, @socket.io/redis-adapter with a channel prefix of
its own per run) on the same Redis. Then, for each --rates rate, --runs times
alternating relay / Socket.IO (order flipped every run), it runs
loadtest/peers/gen.mjs: --rooms x --subs subscribers spread over both
instances, one publisher per room, open loop at the fixed rate.

Server CPU is utime+stime from /proc/<pid>/stat over the publishing window
(the generator's publish-start / publish-end markers), divided by the
deliveries in that window. Compared: the relay's two gateways against the two
Socket.IO instances (the same role: sockets in, Redis, sockets out). Also
shown: every relay process (gateways + the worker that stores and counts,
which Socket.IO has no counterpart for), and redis-server's CPU (shared by
both servers' runs, and by anything else using this Redis). The worker
PSUBSCRIBEs every chat channel, so on a Redis shared with other runs the
"all server processes" column includes their messages: compare gateways.

    loadtest/peers.py                                  # 20 rooms x 25 subs at 100 and 400 msg/s, 3 runs each, 20 s
    loadtest/peers.py --rates 400 --seconds 10 --runs 1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import relaylib

GEN = os.path.join(relaylib.PEERS, "gen.mjs")
SERVER = os.path.join(relaylib.PEERS, "server.mjs")


def redis_pid():
    """redis-server's pid, as Redis itself reports it."""
    try:
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "info", "server"],
                             capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":")[1])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None


def one_run(args, server, procs, compared, urls, rate, prefix, extra_pids):
    cmd = ["node", GEN, "--server", server, "--urls", ",".join(urls), "--rooms", str(args.rooms),
           "--subs", str(args.subs), "--rate", str(rate), "--seconds", str(args.seconds),
           "--size", str(args.size), "--prefix", prefix]
    pids = {p.name: p.proc.pid for p in procs}
    pids.update(extra_pids)
    gen = relaylib.Loadgen(cmd, pids=pids)
    r = gen.result()
    for line in gen.errors[:5]:
        sys.stderr.write(f"gen: {line}\n")
    marks = gen.marks
    if "publish-start" not in marks or "publish-end" not in marks:
        raise SystemExit(f"{server}: the generator printed no publish markers: {gen.errors[-5:]}")
    (t0, c0), (t1, c1) = marks["publish-start"], marks["publish-end"]
    window = max(t1 - t0, 0.001)
    delivered = max(r["deliveries_per_s"] * window, 1)
    us = lambda names: round(1e6 * sum(c1[n] - c0[n] for n in names) / delivered, 1)
    r["cpu_pct"] = {n: round(100 * (c1[n] - c0[n]) / window) for n in gen.pids}
    r["us_per_delivery"] = us(compared)
    r["us_per_delivery_all"] = us([p.name for p in procs])
    r["redis_us_per_delivery"] = us(["redis"]) if "redis" in gen.pids else None
    r["generator_cpu_pct"] = r["cpu_pct"]["loadgen"]
    # Wake-ups of the compared processes per message sent (a cost that does
    # not shrink with batching when messages are sparse).
    s0, s1 = gen.switches["publish-start"], gen.switches["publish-end"]
    r["switches_per_msg"] = round(sum(s1[n] - s0[n] for n in compared) / max(r["sent"], 1), 1)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--subs", type=int, default=25)
    ap.add_argument("--rates", default="100,400", help="msg/s over all publishers, comma-separated")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="relay,socketio", help="which of relay,socketio to run")
    ap.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment of the relay processes (repeatable), e.g. TOKIO_WORKER_THREADS=1")
    args = ap.parse_args()
    relaylib.build()
    relaylib.npm_ci()
    stamp, out = relaylib.results_dir("peers")
    names = [s for s in args.servers.split(",") if s]
    extra = {}
    rp = redis_pid()
    if rp:
        extra["redis"] = rp
    servers, runs = {}, []
    try:
        if "relay" in names:
            env = dict(BUS="redis", DATABASE_URL=relaylib.fresh_database(f"peers_{stamp}"),
                       PERSIST_GROUP=f"db-writer-{stamp}", ANALYTICS_GROUP=f"analytics-{stamp}",
                       RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000", MAX_CONNS_PER_IP="0",
                       FLOOD_WARNINGS="false", TCP_NODELAY="true")
            env.update(kv.split("=", 1) for kv in args.relay_env)
            gws = [relaylib.Relay(f"relay-gw{i}-{stamp[-6:]}", env, "gateway", out) for i in (1, 2)]
            worker = relaylib.Relay(f"relay-w-{stamp[-6:]}", env, "persist,analytics", out)
            servers["relay"] = dict(procs=gws + [worker], compared=[g.name for g in gws],
                                    urls=[f"ws://127.0.0.1:{g.port}" for g in gws],
                                    label="relay (2 gateways, BUS=redis)")
        if "socketio" in names:
            sios = [relaylib.Server(f"socketio{i}", ["node", SERVER, "--port", "{port}", "--key", f"sio-{stamp}",
                                                     "--instance", f"s{i}"], out, cwd=relaylib.PEERS)
                    for i in (1, 2)]
            servers["socketio"] = dict(procs=sios, compared=[s.name for s in sios],
                                       urls=[f"http://127.0.0.1:{s.port}" for s in sios],
                                       label="Socket.IO 4 (2 instances, redis-adapter)")
        rates = [int(x) for x in args.rates.split(",")]
        for rate in rates:
            for i in range(args.runs):
                for name in (names if i % 2 == 0 else names[::-1]):
                    s = servers[name]
                    r = one_run(args, name, s["procs"], s["compared"], s["urls"], rate,
                                f"pe{stamp[-6:]}{name[0]}{rate}r{i}", extra)
                    r["offered_rate"], r["server"] = rate, name
                    runs.append(r)
                    e = r["e2e_ms"]
                    print(f"{name} {rate} msg/s run {i + 1}: {r['deliveries_per_s']} deliveries/s, p50 {e['p50']:.2f} ms, "
                          f"p99 {e['p99']:.2f} ms, lost {r['lost']} dup {r['duplicates']} reordered {r['reordered']}, "
                          f"late {r['late_sends']}, cross {100 * r['cross_instance_share']:.0f} %, "
                          f"{r['us_per_delivery']} µs/delivery (all processes {r['us_per_delivery_all']}), "
                          f"{r['switches_per_msg']} context switches/msg, "
                          f"CPU % {r['cpu_pct']}", flush=True)
    finally:
        for s in servers.values():
            for p in s["procs"]:
                p.stop()
    med = {}
    for rate in rates:
        for name in names:
            rs = [r for r in runs if r["server"] == name and r["offered_rate"] == rate]
            m = lambda f: statistics.median(f(r) for r in rs)
            med[(name, rate)] = dict(
                runs=len(rs), us=m(lambda r: r["us_per_delivery"]), us_all=m(lambda r: r["us_per_delivery_all"]),
                redis_us=m(lambda r: r["redis_us_per_delivery"] or 0), p50=m(lambda r: r["e2e_ms"]["p50"]),
                p99=m(lambda r: r["e2e_ms"]["p99"]), lost=m(lambda r: r["lost"]), dup=m(lambda r: r["duplicates"]),
                dps=m(lambda r: r["deliveries_per_s"]), late=m(lambda r: r["late_sends"]),
                gen_cpu=m(lambda r: r["generator_cpu_pct"]), switches=m(lambda r: r["switches_per_msg"]))
    print(f"\n{args.rooms} rooms x {args.subs} subscribers, one publisher per room, {args.seconds} s per run, "
          f"median of {args.runs} alternating runs; server CPU per delivery over the publishing window.\n")
    print("| rate | server | server CPU µs / delivery (compared) | all server processes | redis-server | p50 | p99 "
          "| lost / dup | deliveries/s | context switches / msg | generator CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for name in names:
            m = med[(name, rate)]
            print(f"| {rate} msg/s | {servers[name]['label']} | {m['us']} | {m['us_all']} | {m['redis_us']} "
                  f"| {m['p50']:.2f} ms | {m['p99']:.2f} ms | {m['lost']:.0f} / {m['dup']:.0f} | {m['dps']:.0f} "
                  f"| {m['switches']} | {m['gen_cpu']:.0f} % |")
        if len(names) == 2:
            a, b = med[("relay", rate)], med[("socketio", rate)]
            ratio = lambda x, y: f"{x / y:.2f}x" if y else "n/a"
            print(f"| {rate} msg/s | **relay / Socket.IO** | **{ratio(a['us'], b['us'])}** "
                  f"| {ratio(a['us_all'], b['us_all'])} | | {ratio(a['p50'], b['p50'])} | **{ratio(a['p99'], b['p99'])}** | | | | |")
    with open(os.path.join(out, "peers.json"), "w") as f:
        json.dump(dict(args=vars(args), runs=runs,
                       median={f"{n}@{r}": m for (n, r), m in med.items()}), f, indent=2)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.exit(main())
