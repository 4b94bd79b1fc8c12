#!/usr/bin/env python3
"""Connection density: server RSS per idle WebSocket connection.

Starts one relay (BUS=memory, SQLite), reads its RSS, opens --conns idle
connections with the lean generator (target/release/loadgen --idle-conns; each
joins one of --rooms rooms), samples the relay's RSS every second while they
are held and prints (peak RSS - empty RSS) / connections. Connections are
spread over --source-ips loopback addresses (127.0.0.1..N) to get past the
~28,000 ephemeral ports one source address has towards one port.

    loadtest/density.py --conns 10000
    loadtest/density.py --conns 50000 --source-ips 4
"""
import argparse
import json
import os
import resource
import sys
import time

import relaylib


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--hold", type=int, default=15)
    ap.add_argument("--source-ips", type=int, default=1)
    args = ap.parse_args()
    # Both processes need a descriptor per connection (plus headroom).
    want = args.conns + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        except (ValueError, OSError):
            # Raising the hard limit needs CAP_SYS_RESOURCE (containers often drop it).
            sys.exit(f"need {want} open files per process but the hard limit is {hard} and cannot be "
                     f"raised here: at most --conns {hard - 512} on this machine")
    relaylib.build()
    stamp, out = relaylib.results_dir("density")
    env = dict(BUS="memory", DATABASE_URL=f"sqlite://{out}/density.db", MAX_CONNS_PER_IP="0",
               MAX_MEMBERS_PER_ROOM=str(args.conns), HISTORY_ON_JOIN="0")
    relay = relaylib.Relay("density", env, "gateway,persist,analytics", out)
    try:
        time.sleep(2)
        empty = relaylib.rss_mb(relay.proc.pid)
        gen = relaylib.Loadgen([relaylib.LOADGEN,
                                "--url", f"ws://127.0.0.1:{relay.port}", "--idle-conns", str(args.conns),
                                "--rooms", str(args.rooms), "--hold", str(args.hold),
                                "--source-ips", str(args.source_ips), "--prefix", f"d{stamp[-6:]}"])
        held = gen.events["all joined"]
        peak = empty
        samples = []
        while gen.proc.poll() is None:
            time.sleep(1)
            if held.is_set():
                rss = relaylib.rss_mb(relay.proc.pid)
                samples.append(rss)
                peak = max(peak, rss)
        res = gen.result(check=False)
        errors = gen.errors
    finally:
        relay.stop()
    joined = res["joined"]
    per_conn_kb = (peak - empty) * 1024 / max(joined, 1)
    summary = dict(res, empty_rss_mb=round(empty, 1), peak_rss_mb=round(peak, 1),
                   held_rss_samples_mb=[round(s, 1) for s in samples], kb_per_conn=round(per_conn_kb, 2),
                   generator_errors=errors[:5])
    with open(os.path.join(out, "density.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{joined} of {args.conns} connections joined ({res['failed']} failed, ramp {res['ramp_s']} s, "
          f"connect+join p99 {res['connect_join_ms']['p99']} ms); relay RSS {empty:.1f} MB empty -> "
          f"{peak:.1f} MB held = {per_conn_kb:.2f} KB per connection")
    for e in errors[:5]:
        print("generator:", e)
    print(f"results: {out}")
    return 0 if joined == args.conns else 1


if __name__ == "__main__":
    sys.exit(main())
