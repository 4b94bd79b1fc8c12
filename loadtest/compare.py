#!/usr/bin/env python3
"""The backend comparison, one command.

For each backend (memory redis redis-streams kafka rabbitmq nats, selectable with --backends):
start the relay on that bus — two gateway instances plus a separate
persistence+analytics process (one all-roles process for `memory`, which is
single-process by nature) — warm up, run the same fan-out scenario (k6's
fanout.js, or with --generator loadgen the lean Rust generator when k6 would
saturate the machine first), then a
fault scenario (the persistence process is stopped for a few seconds under load
and restarted; rows missing from / duplicated in the DB are counted), and
collect: deliveries/s, end-to-end p50/p95/p99/p99.9, loss/dup/reorder for live
clients, persistence catch-up time and DB completeness, relay CPU and RSS, and
the load generator's CPU (so a saturated generator is visible).

Then, for each broker backend and with the relays stopped, the broker's ceiling
for the same traffic (`brokerbench e2e`: same rate, rooms, size and seconds,
two instances' producers and live consumers plus the two worker groups, with
the raw client libraries and the relay's settings, no relay): its acked/s and
p50/p99 go into <backend>.json ("ceiling") and a second table in summary.md,
beside the relay's figures. --no-ceiling skips it. A second broker-alone run
holds the broker's processes to the CPU share they got under the relay run
(a cgroup quota; "ceiling_capped", a third table; --no-capped-ceiling skips
it): on a machine the relays, PostgreSQL and the generator share with the
broker, it tells how much of the relay's latency the broker has by itself
with the CPU it had.

Output: loadtest/results/<run>/<backend>.json, summary.md (table + how to read
it) and chart.svg.

    loadtest/compare.py --profile short                 # < 10 minutes, CI-style
    loadtest/compare.py --profile full --backends kafka,rabbitmq
    loadtest/compare.py --profile full --generator loadgen   # the README's table
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from relaylib import ROOT, TANSU_PROFILE, CpuCap, Relay, build, cpu_seconds, drop_kafka_topic, fanout, psql, rss_mb
BROKERBENCH = os.path.join(ROOT, "target/release/brokerbench")
PROFILES = {
    # rooms, subscribers per room, msgs/s, seconds, fault seconds
    "short": dict(rooms=20, subs=10, rate=400, run_s=15, fault_run_s=12, fault_stop_s=4, size=100),
    "full": dict(rooms=100, subs=20, rate=1000, run_s=60, fault_run_s=30, fault_stop_s=8, size=100),
}
DURABILITY = {
    "memory": "in-process bounded queues; nothing survives a restart",
    "redis": "Redis Pub/Sub (at-most-once), no persistence (--save '' --appendonly no)",
    "kafka": "acks=all, idempotent producer, lz4; tansu memory storage (single broker), commits after DB commit",
    "rabbitmq": "publisher confirms, persistent messages, durable classic queues with x-max-priority, manual acks after DB commit",
    "nats": "JetStream acks (file storage, 1 replica), Nats-Msg-Id dedupe, durable pull consumers with explicit acks after DB commit; live delivery on core subscriptions",
    "redis-streams": "XADD to 8 shard streams (MAXLEN ~ 100000), consumer groups with XACK after DB commit and XAUTOCLAIM; "
                     "the shared Redis has no persistence (--save '' --appendonly no): an XADD is acked from memory",
}

# Short tags for room names: the first two letters, except where they collide.
TAGS = {"redis-streams": "rs"}


def tag(backend):
    return TAGS.get(backend, backend[:2])


def drop_streams(prefix):
    """Deletes a redis-streams run's keys from the shared Redis."""
    import subprocess
    keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True).stdout.split()
    if keys:
        subprocess.run(["redis-cli", "DEL", *keys], capture_output=True)


def drop_queues(prefix):
    """Deletes a rabbitmq run's durable worker queues: left behind, each run
    leaves its unconsumed messages on the shared broker for the next runs."""
    names = subprocess.run(["rabbitmqctl", "list_queues", "name", "-q"], capture_output=True, text=True).stdout.split()
    for q in names:
        if q.startswith(prefix):
            subprocess.run(["rabbitmqctl", "delete_queue", q], capture_output=True)


def drop_nats_stream(name, url=("127.0.0.1", 4222)):
    """Deletes a nats run's JetStream stream (its file storage) from the
    shared server, with JetStream's own API request over the plain NATS
    protocol; a PING answered by PONG means the server has handled it."""
    import socket
    try:
        with socket.create_connection(url, timeout=5) as s:
            s.recv(4096)  # INFO
            s.sendall(f'CONNECT {{"verbose":false}}\r\nPUB $JS.API.STREAM.DELETE.{name} 0\r\n\r\nPING\r\n'.encode())
            got = b""
            while b"PONG" not in got and b"-ERR" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
    except OSError as e:
        print(f"   could not delete NATS stream {name}: {e}", flush=True)


def db_rows(db, prefix):
    return int(psql(f"SELECT COUNT(*) FROM messages WHERE room LIKE 'chat.{prefix}-%'", db))


# The broker's server process per backend, for its CPU during the run.
BROKER_PROCESS = {"redis": "redis-server", "redis-streams": "redis-server", "kafka": "tansu", "rabbitmq": "beam.smp",
                  "nats": "nats-server"}


def broker_pids(backend):
    name = BROKER_PROCESS.get(backend)
    if not name:
        return []
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def db_pids():
    """PostgreSQL's processes (a backend per connection: the set changes as
    pools open and close, so CPU is counted per process from when it was
    first seen)."""
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def ceiling(backend, p, outdir, inflight=None, cap_pct=None):
    """The broker alone with the profile's traffic (`brokerbench e2e`), run
    with the same tansu profile as the relays. Returns its JSON plus the
    command, or an error entry: a failed ceiling must not lose the relay's run.

    With `cap_pct` the broker's processes are held to that share of a core
    for the run (`relaylib.CpuCap`): the broker alone with the CPU it got
    under the relay run, where the relays, PostgreSQL and the generator
    share the same cores. Set beside the relay's latency, it tells how much
    of the relay's tail the broker has at that share by itself."""
    cmd = [BROKERBENCH, "e2e", "--backend", backend, "--rate", str(p["rate"]), "--seconds", str(p["run_s"]),
           "--rooms", str(p["rooms"]), "--instances", str(p.get("gateways", 2)), "--size", str(p["size"]),
           "--publishers", str(max(50, p["rate"] // 8))]
    if inflight:
        cmd += ["--inflight-per-room", str(inflight)]
    capped = f", broker held to {cap_pct} % of a core" if cap_pct else ""
    print(f"== {backend}: broker alone, same traffic{capped}: {' '.join(cmd[1:])}", flush=True)
    env = dict(TANSU_PROFILE, **os.environ)
    # The broker's CPU over the ceiling run (setup and teardown included:
    # a few seconds of the run's length), to set beside its share of the
    # machine under the relay run.
    brokers = broker_pids(backend)
    bcpu0, t0 = sum(cpu_seconds(pid) for pid in brokers), time.time()
    try:
        with CpuCap(brokers, cap_pct) if cap_pct else contextlib.nullcontext():
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=p["run_s"] + 120)
    except subprocess.TimeoutExpired:
        return dict(error="brokerbench e2e timed out", command=" ".join(cmd[1:]))
    except OSError as e:
        return dict(error=f"cannot cap the broker's CPU: {e}", command=" ".join(cmd[1:]))
    broker_cpu = round(100 * (sum(cpu_seconds(pid) for pid in brokers) - bcpu0) / max(time.time() - t0, 1), 1)
    log = f"{backend}-ceiling-capped.log" if cap_pct else f"{backend}-ceiling.log"
    with open(os.path.join(outdir, "logs", log), "w") as f:
        f.write(out.stderr)
    if out.returncode != 0:
        return dict(error=f"brokerbench e2e exited {out.returncode}: {out.stderr.strip()[-300:]}", command=" ".join(cmd[1:]))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["command"] = " ".join(cmd[1:])
    if cap_pct:
        r["broker_capped_at_pct"] = cap_pct
    if brokers:
        r["broker_cpu_pct"] = broker_cpu
    print(f"   {out.stderr.strip().splitlines()[-1]}", flush=True)
    return r


def run_backend(backend, p, outdir, stamp, gen="k6", ceiling_opts=None):
    logdir = os.path.join(outdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    db = f"bench_{backend.replace('-', '_')}_{stamp}"
    psql(f"CREATE DATABASE {db}")
    env = dict(BUS=backend, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}",
               KAFKA_TOPIC=f"bench-{stamp}", RABBITMQ_EXCHANGE=f"bench-{stamp}",
               RABBITMQ_QUEUE_PREFIX=f"bench-{stamp}", NATS_STREAM=f"bench-{stamp}",
               NATS_SUBJECT_PREFIX=f"bench.{stamp}", NATS_CONSUMER_PREFIX=f"bench-{stamp}-",
               REDIS_STREAMS_PREFIX=f"bench-{stamp}:",
               PERSIST_GROUP=f"db-writer-{stamp}",
               ANALYTICS_GROUP=f"analytics-{stamp}", PERSIST_BATCH_SIZE="1000",
               RATE_LIMIT_PER_SEC="100000", RATE_LIMIT_BURST="100000", MAX_CONNS_PER_IP="0")
    print(f"== {backend}: starting relays", flush=True)
    if backend == "memory":
        a = Relay(f"{backend}-a", env, "gateway,persist,analytics", logdir)
        gateways, worker = [a], None
    else:
        gateways = [Relay(f"{backend}-{chr(ord('a') + i)}", env, "gateway", logdir)
                    for i in range(p.get("gateways", 2))]
        worker = Relay(f"{backend}-w", env, "persist,analytics", logdir)
    procs = gateways + ([worker] if worker else [])
    result = dict(backend=backend, durability=DURABILITY[backend], profile=p, generator=gen)
    try:
        # Warm-up (JIT-free, but connections, topic metadata, pools).
        fanout(gen, gateways, f"warm{stamp}", dict(p, rate=min(p["rate"], 100)), 3, os.path.join(outdir, f"{backend}-warm.json"))
        print(f"== {backend}: fan-out {p['rooms']}x{p['subs']} at {p['rate']} msg/s for {p['run_s']}s", flush=True)
        prefix = f"f{stamp}{tag(backend)}"
        cpu0 = {r.name: cpu_seconds(r.proc.pid) for r in procs}
        brokers = broker_pids(backend)
        bcpu0 = sum(cpu_seconds(pid) for pid in brokers)
        # PostgreSQL (room positions, dedupe claims, the db-writer) shares the machine too.
        dcpu0 = {pid: cpu_seconds(pid) for pid in db_pids()}
        import resource
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        summary_path = os.path.join(outdir, f"{backend}-fanout.json")
        load, out = fanout(gen, gateways, prefix, p, p["run_s"], summary_path)
        elapsed = time.time() - t0
        # CPU of the generator's run alone (children's usage grows across runs).
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        fan = json.load(open(summary_path))
        result["fanout"] = fan
        # A message the bus handed over twice is dropped by each gateway
        # before its sockets, so the clients' duplicate count no longer
        # shows it: the gateways' own count does (the backend's nature).
        result["live_repeats_dropped"] = dropped = sum(g.metric("live_duplicates_dropped_total") for g in gateways)
        # Offsets a gateway's Kafka live consumer jumped over: records that
        # reached none of its sockets (0 on the other backends).
        result["live_offsets_skipped"] = skipped = sum(g.metric("kafka_live_offsets_skipped_total") for g in gateways)
        result["generator_exit"] = load.returncode
        result["relay_cpu_pct"] = {r.name: round(100 * (cpu_seconds(r.proc.pid) - cpu0[r.name]) / elapsed, 1) for r in procs}
        result["relay_rss_mb"] = {r.name: round(rss_mb(r.proc.pid), 1) for r in procs}
        if brokers:
            result["broker_cpu_pct"] = round(100 * (sum(cpu_seconds(pid) for pid in brokers) - bcpu0) / elapsed, 1)
        result["db_cpu_pct"] = round(100 * sum(cpu_seconds(pid) - dcpu0.get(pid, 0) for pid in db_pids()) / elapsed, 1)
        result["generator_cpu_pct"] = round(100 * gen_cpu / max(elapsed, 1), 1)
        # Persistence catch-up after the load.
        t1 = time.time()
        acked = fan["publish_acked"]
        rows = 0
        while time.time() - t1 < 60:
            rows = db_rows(db, prefix)
            if rows >= acked:
                break
            time.sleep(0.2)
        result["persist"] = dict(rows=rows, acked=acked, catch_up_s=round(time.time() - t1, 2),
                                 lag_p99_s=None)
        print(f"   {out.strip()}", flush=True)

        # Fault: stop the persistence role under load, restart it.
        if p.get("no_fault"):
            result["fault"] = dict(note="not run (--no-fault)")
        elif worker is None:
            result["fault"] = dict(note="memory is single-process: stopping persistence means stopping the process (and its queue)")
        else:
            print(f"== {backend}: fault: persistence stopped for {p['fault_stop_s']}s under load", flush=True)
            fprefix = f"x{stamp}{tag(backend)}"
            fpath = os.path.join(outdir, f"{backend}-fault.json")
            load, started = fanout(gen, gateways, fprefix, p, p["fault_run_s"], fpath, wait=False)
            started.wait(120)
            time.sleep(2)
            worker.stop()
            time.sleep(p["fault_stop_s"])
            worker = Relay(f"{backend}-w2", env, "persist,analytics", logdir)
            procs.append(worker)
            load.finish()
            ffan = json.load(open(fpath))
            t2 = time.time()
            frows = 0
            while time.time() - t2 < 60:
                frows = db_rows(db, fprefix)
                if frows >= ffan["publish_acked"]:
                    break
                time.sleep(0.5)
            time.sleep(2)
            frows = db_rows(db, fprefix)
            result["fault"] = dict(acked=ffan["publish_acked"], rows=frows,
                                   missing=max(0, ffan["publish_acked"] - frows),
                                   duplicates_written=0,  # primary key: a redelivery writes nothing
                                   redelivered_to_db_writer=worker.metric("persist_duplicates_total"),
                                   catch_up_s=round(time.time() - t2, 2),
                                   error_frames=ffan.get("raw", {}).get("error_codes", {}),
                                   live=dict(lost=ffan["lost"], dup=ffan["duplicates"], reordered=ffan["reordered"],
                                             seq_inversions=ffan.get("seq_inversions", 0),
                                             repeats_dropped=sum(g.metric("live_duplicates_dropped_total")
                                                                 for g in gateways) - dropped,
                                             offsets_skipped=sum(g.metric("kafka_live_offsets_skipped_total")
                                                                 for g in gateways) - skipped))
            print(f"   fault: {result['fault']}", flush=True)
    finally:
        for r in procs:
            r.stop()
        if backend == "redis-streams":
            drop_streams(f"bench-{stamp}:")
        if backend == "rabbitmq":
            drop_queues(f"bench-{stamp}")
        if backend == "nats":
            drop_nats_stream(f"bench-{stamp}")
        if backend == "kafka":
            drop_kafka_topic(env)
    if ceiling_opts is not None and backend != "memory":
        opts = dict(ceiling_opts)
        capped = opts.pop("capped", True)
        result["ceiling"] = ceiling(backend, p, outdir, **opts)
        if capped and result.get("broker_cpu_pct"):
            result["ceiling_capped"] = ceiling(backend, p, outdir, cap_pct=result["broker_cpu_pct"], **opts)
    with open(os.path.join(outdir, f"{backend}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def p_of(result):
    return result.get("profile", {})


def repeats(r):
    """The repeats the gateways dropped before their sockets, when any."""
    n, k = r.get("live_repeats_dropped", 0), r.get("live_offsets_skipped", 0)
    told = [f"+{n:.0f} bus repeats dropped"] * bool(n) + [f"{k:.0f} Kafka offsets skipped"] * bool(k)
    return f" ({', '.join(told)})" if told else ""


def inversions(f):
    """Deliveries whose room position was below one the client already had
    (two publishers' messages crossed between the sequencer and the sockets),
    when any."""
    n = f.get("seq_inversions", 0)
    return f" ({n} out of room order)" if n else ""


def fault_live(fault):
    """The fault run's live clients, when they did not get every acked
    message exactly once and in order (the main run has its own column)."""
    live = fault.get("live") or {}
    bad = {k: live.get(k, 0) for k in ("lost", "dup", "reordered", "seq_inversions")}
    told = repeats(dict(live_repeats_dropped=live.get("repeats_dropped", 0),
                        live_offsets_skipped=live.get("offsets_skipped", 0)))
    if not any(bad.values()) and not told:
        return ""
    return (f"; live clients: {bad['lost']} lost / {bad['dup']} dup / {bad['reordered']} reordered"
            f"{inversions(bad)}{told}")


def markdown(results, args, outdir):
    gen = results[0].get("generator", "k6")
    missed = "k6 dropped" if gen == "k6" else "sent late"
    rows = [f"| backend | published / offered ({missed}) | delivered msg/s | cross-instance deliveries | e2e p50 | p95 | p99 | p99.9 | lost / dup / reordered (live) | DB rows / acked after load | DB rows / acked, persistence stopped under load | relay CPU | relay RSS | broker CPU | PostgreSQL CPU | {gen} CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["fanout"]
        e = f["e2e_ms"]
        fault = r.get("fault", {})
        fault_s = (f"{fault['rows']}/{fault['acked']} ({fault['missing']} missing){fault_live(fault)}" if "acked" in fault
                   else "not run" if p_of(r).get("no_fault") else "n/a (single process)")
        rows.append(
            f"| {r['backend']} | {f['publish_acked']} / {f['rate'] * f['duration_s']} ({f['dropped_iterations']}) | {f['deliveries_per_s']:.0f} | {100 * f.get('cross_instance_share', 0):.0f}% | {e['p50']:.1f} ms | {e['p95']:.1f} ms | {e['p99']:.1f} ms | {e['p999']:.1f} ms "
            f"| {f['lost']} / {f['duplicates']} / {f['reordered']}{inversions(f)}{repeats(r)} | {r['persist']['rows']}/{r['persist']['acked']} in {r['persist']['catch_up_s']} s "
            f"| {fault_s} | {', '.join(f'{v}%' for v in r['relay_cpu_pct'].values())} "
            f"| {', '.join(f'{v:.0f} MB' for v in r['relay_rss_mb'].values())} "
            f"| {str(r['broker_cpu_pct']) + '%' if 'broker_cpu_pct' in r else 'n/a'} | {r.get('db_cpu_pct', 'n/a')}% "
            f"| {r.get('generator_cpu_pct', r.get('k6_cpu_pct'))}% |")
    p = results[0]["profile"]
    text = "\n".join(rows)
    how = ("k6 fanout.js, HTTP publishers" if gen == "k6" else "loadgen, WebSocket publishers")
    text += (f"\n\nWorkload ({how}): {p['rooms']} rooms x {p['subs']} subscribers, {p['rate']} msg/s for {p['run_s']} s "
             f"({p['size']}-byte messages), {p.get('gateways', 2)} gateway instance(s) + one persistence/analytics process per broker backend; "
             + ("no fault run" if p.get("no_fault") else f"fault: persistence stopped {p['fault_stop_s']} s under load") + ".\n\nDurability settings:\n")
    text += "".join(f"- **{r['backend']}**: {r['durability']}\n" for r in results)
    text += split_table(results)
    text += ceiling_table(results)
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(text + "\n")
    return text


def split_table(results):
    """Where the latency goes (loadgen only): the gateway stamps `ts` on a
    message after its room position is taken, just before the bus, so each
    delivery splits into ingress (client → gateway → position) and egress
    (bus → live consumer → socket → generator), to the millisecond."""
    split = [(r["backend"], r["fanout"].get("raw", {})) for r in results]
    split = [(b, raw) for b, raw in split if "ingress_ms" in raw]
    if not split:
        return ""
    rows = ["", "Where the time goes (loadgen; `ts` is stamped by the gateway once the room position is taken, "
            "just before the bus; millisecond resolution):", "",
            "| backend | ingress p50 / p99 (client → gateway → position) | egress p50 / p99 (bus → live consumer → socket) |",
            "|---|---|---|"]
    for b, raw in split:
        i, o = raw["ingress_ms"], raw["egress_ms"]
        rows.append(f"| {b} | {i['p50']:.1f} / {i['p99']:.1f} ms | {o['p50']:.1f} / {o['p99']:.1f} ms |")
    return "\n".join(rows) + "\n"


def table_head(caption, columns):
    """A summary.md table's caption, header and separator lines."""
    return ["", caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def ceiling_table(results):
    """The relay beside the broker alone with the same traffic (empty when no
    run has a ceiling)."""
    with_c = [r for r in results if "ceiling" in r]
    if not with_c:
        return ""
    rows = table_head("Relay vs. the broker alone with the same traffic (`brokerbench e2e`, relays stopped): "
                      "acked/s = confirmed publishes per second of the run; latency at the relay's WebSocket "
                      "subscribers vs. at the broker's live consumers.",
                      ["backend", "relay acked/s", "relay e2e p50 / p99", "broker alone (same traffic) acked/s",
                       "broker alone (same traffic) p50 / p99", "relay / broker acked/s", "relay / broker p99",
                       "broker CPU: under the relay run / alone"])
    for r in with_c:
        f, c = r["fanout"], r["ceiling"]
        relay_rate = f["publish_acked"] / max(f["duration_s"], 1)
        e = f["e2e_ms"]
        if "error" in c:
            rows.append(f"| {r['backend']} | {relay_rate:.0f} | {e['p50']:.1f} / {e['p99']:.1f} ms | failed: {c['error'][:80]} | | | | |")
            continue
        ce = c["e2e_ms"]
        ratio = relay_rate / c["acked_per_s"] if c["acked_per_s"] else float("nan")
        p99 = e["p99"] / ce["p99"] if ce["p99"] else float("nan")
        rows.append(f"| {r['backend']} | {relay_rate:.0f} | {e['p50']:.1f} / {e['p99']:.1f} ms | {c['acked_per_s']:.0f} "
                    f"| {ce['p50']:.1f} / {ce['p99']:.1f} ms | {ratio:.2f} | {p99:.1f}x "
                    f"| {r.get('broker_cpu_pct', 'n/a')}% / {c.get('broker_cpu_pct', 'n/a')}% |")
    inflight = {str(r["ceiling"].get("inflight_per_room") or "unlimited") for r in with_c}
    rows.append(f"\nBroker alone: publishes in flight per room per instance: {', '.join(sorted(inflight))}; "
                "producers, consumers and workers in one process (`ceiling.command` in each <backend>.json).\n")
    return "\n".join(rows) + capped_table(results)


def capped_table(results):
    """The relay beside the broker alone held to the CPU share the broker
    got under the relay run (empty when no run has one)."""
    with_c = [r for r in results if "ceiling_capped" in r]
    if not with_c:
        return ""
    rows = table_head("The broker alone with the CPU it got under the relay run (`brokerbench e2e`, same traffic, "
                      "the broker's processes held to that share of a core with a cgroup CPU quota, 10 ms period; "
                      "the rest of the machine idle but for brokerbench):",
                      ["backend", "broker CPU under the relay run = cap", "relay e2e p50 / p99",
                       "broker alone at the cap: acked/s", "p50 / p99", "relay / capped broker p99"])
    for r in with_c:
        e, c = r["fanout"]["e2e_ms"], r["ceiling_capped"]
        if "error" in c:
            rows.append(f"| {r['backend']} | {r.get('broker_cpu_pct')}% | {e['p50']:.1f} / {e['p99']:.1f} ms | failed: {c['error'][:80]} | | |")
            continue
        ce = c["e2e_ms"]
        p99 = e["p99"] / ce["p99"] if ce["p99"] else float("nan")
        rows.append(f"| {r['backend']} | {c['broker_capped_at_pct']}% (used {c.get('broker_cpu_pct', 'n/a')}%) "
                    f"| {e['p50']:.1f} / {e['p99']:.1f} ms | {c['acked_per_s']:.0f} | {ce['p50']:.1f} / {ce['p99']:.1f} ms "
                    f"| {p99:.1f}x |")
    return "\n".join(rows) + "\n"


def svg_chart(results, outdir):
    w, h, pad = 720, 320, 60
    names = [r["backend"] for r in results]
    p99 = [r["fanout"]["e2e_ms"]["p99"] for r in results]
    p50 = [r["fanout"]["e2e_ms"]["p50"] for r in results]
    # Log scale: backends differ by orders of magnitude (1 ms vs seconds),
    # and a linear axis would flatten every fast backend to nothing.
    import math
    lo, hi = 0.1, max(p99 + [1]) * 2
    scale = lambda v: max(0.0, math.log10(max(v, lo) / lo) / math.log10(hi / lo))
    bw = (w - 2 * pad) / max(len(names), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">End-to-end latency by backend (ms, log scale, lower is better)</text>',
             f'<line x1="{pad}" y1="{h-pad}" x2="{w-pad}" y2="{h-pad}" stroke="black"/>']
    for i, n in enumerate(names):
        x = pad + i * bw
        for j, (val, color) in enumerate([(p50[i], "#4c78a8"), (p99[i], "#f58518")]):
            bh = (h - 2 * pad) * scale(val)
            bx = x + bw * (0.15 + 0.35 * j)
            parts.append(f'<rect x="{bx:.0f}" y="{h-pad-bh:.0f}" width="{bw*0.3:.0f}" height="{bh:.0f}" fill="{color}"/>')
            parts.append(f'<text x="{bx + bw*0.15:.0f}" y="{h-pad-bh-4:.0f}" text-anchor="middle">{val:.1f}</text>')
        parts.append(f'<text x="{x + bw/2:.0f}" y="{h-pad+18}" text-anchor="middle">{n}</text>')
    parts.append(f'<rect x="{w-pad-120}" y="30" width="10" height="10" fill="#4c78a8"/><text x="{w-pad-105}" y="39">p50</text>')
    parts.append(f'<rect x="{w-pad-70}" y="30" width="10" height="10" fill="#f58518"/><text x="{w-pad-55}" y="39">p99</text>')
    parts.append("</svg>")
    with open(os.path.join(outdir, "chart.svg"), "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="memory,redis,redis-streams,kafka,rabbitmq,nats")
    ap.add_argument("--profile", choices=PROFILES, default="short")
    ap.add_argument("--out", default=os.path.join(ROOT, "loadtest/results"))
    ap.add_argument("--render", metavar="RUN_DIR", help="only re-render summary.md and chart.svg of a finished run")
    ap.add_argument("--generator", choices=["k6", "loadgen"], default="k6",
                    help="k6 (fanout.js) or the lean Rust generator, for rates k6 cannot offer on this machine")
    ap.add_argument("--gateways", type=int, default=2,
                    help="gateway instances per broker backend (same total subscribers, spread over all)")
    ap.add_argument("--no-fault", action="store_true", help="skip the persistence-stopped run")
    ap.add_argument("--seconds", type=int, help="override the profile's run length")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the broker-alone run (brokerbench e2e) after each broker backend")
    ap.add_argument("--no-capped-ceiling", action="store_true",
                    help="skip the second broker-alone run, with the broker held to the CPU share it got "
                         "under the relay run")
    ap.add_argument("--ceiling-inflight-per-room", type=int, metavar="N",
                    help="brokerbench e2e --inflight-per-room (default: pipelined, no limit)")
    args = ap.parse_args()
    if args.render:
        order = ["memory", "redis", "redis-streams", "kafka", "rabbitmq", "nats"]
        results = [json.load(open(os.path.join(args.render, f"{b}.json"))) for b in order
                   if os.path.exists(os.path.join(args.render, f"{b}.json"))]
        print(markdown(results, args, args.render))
        svg_chart(results, args.render)
        return 0
    build()
    stamp = time.strftime("%Y%m%d%H%M%S")
    outdir = os.path.join(args.out, stamp)
    os.makedirs(outdir, exist_ok=True)
    p = dict(PROFILES[args.profile], gateways=args.gateways, no_fault=args.no_fault)
    if args.seconds:
        p["run_s"] = args.seconds
    ceiling_opts = None if args.no_ceiling else dict(inflight=args.ceiling_inflight_per_room,
                                                       capped=not args.no_capped_ceiling)
    results = [run_backend(b.strip(), p, outdir, stamp, args.generator, ceiling_opts)
               for b in args.backends.split(",") if b.strip()]
    text = markdown(results, args, outdir)
    svg_chart(results, outdir)
    print("\n" + text)
    print(f"\nresults: {outdir}")


if __name__ == "__main__":
    sys.exit(main())
