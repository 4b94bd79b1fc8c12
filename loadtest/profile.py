#!/usr/bin/env python3
"""Where the relay's CPU per delivery goes, next to the floor's (issue #15).

Runs the floor workload of `loadtest/perf.py` (the one-process relay on the
memory bus + PostgreSQL, and `target/release/floor`, alternating) and samples
each server with `perf record --call-graph dwarf` while loadgen publishes.
Every sample is put in the first category whose function appears anywhere on
its stack (the task it ran for), and each category's share of the samples is
turned into CPU µs per delivery with the run's measured CPU per delivery:

* fan-out: writing a message's frame to the room's subscriber sockets
  (relay: `Rooms::dispatch` and the connections' writer tasks; floor:
  `Sub::send`) — the work the floor exists to measure;
* everything the relay does once per *message* rather than per delivery: the
  live consumer's loop, the room position and dedupe claim (the sequencer's
  PostgreSQL statement), the memory bus, the persistence and analytics
  workers, reading/parsing the publisher's frame and answering it;
* the runtime parking and waking its threads between events.

    loadtest/profile.py                       # 400 msg/s, 20 rooms x 25 subscribers
    loadtest/profile.py --rate 100 --runs 3   # median of 3 per server

perf samples at --hz (cpu-clock) and its dwarf unwinding costs the sampled
process CPU too: both servers pay it, so compare the columns, not the
absolute figures with perf.py's.
"""
import argparse
import collections
import os
import statistics
import subprocess
import sys
import threading

import perf as perfpy
import relaylib

# (category, patterns): a sample goes to the first category with a pattern
# on its stack. Order matters: the fan-out is called from the live consumer,
# the sequencer's statement from sqlx.
RELAY = [
    ("fan-out to subscriber sockets", ["gateway::rooms::Rooms::dispatch", "gateway::outbox::Outbox<S>::run"]),
    ("live consumer (bus -> decode)", ["gateway::live::"]),
    ("room position + dedupe claim (PostgreSQL)", ["gateway::sequencer::", "Store::sequence", "Store::settle_sends"]),
    ("sqlx pool: connection hand-back", ["return_to_pool"]),
    ("persistence worker", ["workers::persist"]),
    ("analytics worker", ["workers::analytics"]),
    ("memory bus", ["bus::memory"]),
    ("publisher's frame: read, parse, publish, ack", ["on_upgrade", "gateway::conn::", "Gateway::begin_chat"]),
    ("presence", ["gateway::presence"]),
    ("runtime: park / wake", ["park", "epoll_wait"]),
]
FLOOR = [
    ("fan-out to subscriber sockets", ["floor::Sub::send"]),
    ("publisher's frame: read, parse, publish, ack", ["floor::"]),
    ("runtime: park / wake", ["park", "epoll_wait"]),
]


def stacks(data):
    """Yields each sample's stack (frames joined) from `perf script`."""
    out = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True, errors="replace")
    cur = []
    for line in out.stdout.splitlines():
        if line[:1] in ("\t", " "):
            if line.strip():
                cur.append(line.strip())
        elif cur:
            yield " ".join(cur)
            cur = []
        else:
            cur = []
    if cur:
        yield " ".join(cur)


def attribute(data, cats):
    counts = collections.Counter()
    for st in stacks(data):
        counts[next((name for name, pats in cats if any(p in st for p in pats)), "other")] += 1
    total = sum(counts.values())
    return {k: v / max(total, 1) for k, v in counts.items()}, total


def one_run(args, server, cats, prefix, out):
    cmd = relaylib.loadgen_cmd([server], args.rooms, args.subs, args.publishers, args.rate, args.seconds,
                               args.size, prefix)
    gen = relaylib.Loadgen(cmd, pids={server.name: server.proc.pid})
    data = os.path.join(out, f"{prefix}.perf.data")

    def record():
        gen.events["publish-start"].wait()
        if "publish-start" not in gen.marks:
            return
        subprocess.run(["perf", "record", "-q", "-F", str(args.hz), "--call-graph", "dwarf,16384",
                        "-p", str(server.proc.pid), "-o", data, "--", "sleep", str(max(args.seconds - 2, 1))],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

    rec = threading.Thread(target=record)
    rec.start()
    r = gen.result()
    rec.join()
    us = perfpy.us_per_delivery(gen.marks, [server.name], r["deliveries_per_s"])
    shares, samples = attribute(data, cats)
    if args.keep:
        print(f"kept {data}: perf report -i {data} --no-children --sort symbol", flush=True)
    else:
        os.remove(data)
    return dict(us_per_delivery=us, shares=shares, samples=samples, p99=r["e2e_ms"]["p99"], lost=r["lost"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--subs", type=int, default=25)
    ap.add_argument("--publishers", type=int, default=20)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1, help="runs per server, alternating; medians reported")
    ap.add_argument("--hz", type=int, default=499, help="perf sampling frequency (lower: less overhead)")
    ap.add_argument("--keep", action="store_true", help="keep each run's perf.data for `perf report`")
    args = ap.parse_args()
    if subprocess.run(["perf", "--version"], capture_output=True).returncode != 0:
        raise SystemExit("perf is missing: apt-get install linux-perf")
    relaylib.build()
    stamp, out = relaylib.results_dir("profile")
    env = perfpy.relay_env("memory", relaylib.fresh_database(f"profile_{stamp}"), stamp)
    servers = {}
    runs = collections.defaultdict(list)
    try:
        servers["relay"] = relaylib.Relay("profile", env, "gateway,persist,analytics", out)
        servers["floor"] = relaylib.Server("floor", [relaylib.FLOOR, "--bind", "127.0.0.1:{port}"], out,
                                           env=dict(TCP_NODELAY=env["TCP_NODELAY"]))
        for i in range(args.runs):
            for name in (["relay", "floor"] if i % 2 == 0 else ["floor", "relay"]):
                r = one_run(args, servers[name], RELAY if name == "relay" else FLOOR,
                            f"f{stamp[-6:]}{name[0]}r{i}", out)
                runs[name].append(r)
                print(f"{name} run {i + 1}: {r['us_per_delivery']:.1f} µs CPU per delivery (under perf), "
                      f"{r['samples']} samples, p99 {r['p99']:.1f} ms, lost {r['lost']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    cats = [c for c, _ in RELAY] + ["other"]
    med = {n: {c: statistics.median(r["us_per_delivery"] * r["shares"].get(c, 0) for r in rs) for c in cats}
           for n, rs in runs.items()}
    total = {n: statistics.median(r["us_per_delivery"] for r in rs) for n, rs in runs.items()}
    per_msg = args.subs  # deliveries per message
    print(f"\nCPU µs per delivery by what it was spent on, {args.rate} msg/s, {args.rooms} rooms x {args.subs} "
          f"subscribers, median of {args.runs} run(s) under perf (x{per_msg} = µs per message)\n")
    print("| spent on | relay | floor |")
    print("|---|---|---|")
    for c in cats:
        if med["relay"][c] or med["floor"].get(c):
            print(f"| {c} | {med['relay'][c]:.2f} | {med['floor'].get(c, 0):.2f} |")
    print(f"| **all** | **{total['relay']:.2f}** | **{total['floor']:.2f}** |")
    fan = "fan-out to subscriber sockets"
    print(f"\nfan-out alone: relay / floor = {med['relay'][fan] / max(med['floor'][fan], 1e-9):.2f}x; "
          f"all: {total['relay'] / max(total['floor'], 1e-9):.2f}x; the relay's work outside the fan-out: "
          f"{(total['relay'] - med['relay'][fan]) * per_msg:.0f} µs per message against the floor's "
          f"{(total['floor'] - med['floor'][fan]) * per_msg:.0f}")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
