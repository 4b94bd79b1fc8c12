"""Shared pieces of the load tools in loadtest/: the relay process, the
generators (k6's fanout.js and the lean Rust loadgen, one interface), and the
small helpers every script needs. Imported by compare.py, faults.py, perf.py,
density.py, soak.py and stepped.py (run them from anywhere: Python puts this
directory on the import path).

Dependencies are declared in loadtest/requirements.txt (installed by
scripts/services.sh); nothing is installed at run time.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "target/release/loadgen")
FLOOR = os.path.join(ROOT, "target/release/floor")
BROKERBENCH = os.path.join(ROOT, "target/release/brokerbench")
PEERS = os.path.join(ROOT, "loadtest/peers")


# The tansu test profile. The relay's defaults are right for Apache Kafka,
# where a fetch returns as soon as data arrives however long
# `fetch.wait.max.ms` is; tansu holds every fetch for the whole wait, so the
# load tools (which run against tansu on this machine) shorten it. The
# caller's environment wins, so a run against real Kafka can unset it.
TANSU_PROFILE = dict(KAFKA_FETCH_WAIT_MAX_MS="5")


def build():
    """Release builds of the relay and the bench tools (the bench/ workspace member),
    niced: the machine's 2 cores are shared with whatever else runs."""
    subprocess.run(["nice", "-n", "10", "cargo", "build", "--release", "--quiet", "--workspace", "--bins"],
                   cwd=ROOT, check=True)


def drop_kafka_topic(env):
    """Deletes a Kafka run's topic (`KAFKA_TOPIC` in the relays' `env`) once
    its relays stopped: tansu keeps every topic's records in memory, so a
    topic left behind makes every later run on the same tansu slower. Best
    effort: a failure is printed, not raised. Nothing for other backends."""
    if env.get("BUS") != "kafka":
        return
    try:
        r = subprocess.run([BROKERBENCH, "drop-kafka-topic"], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"   kafka: topic {env.get('KAFKA_TOPIC')} not deleted: {e}", flush=True)
        return
    if r.returncode != 0:
        print(f"   {r.stderr.strip()[-300:]}", flush=True)


def npm_ci():
    """The Node side of the peer run (loadtest/peers/: socket.io, the redis
    adapter, ws), installed from its lock file when missing."""
    if not os.path.isdir(os.path.join(PEERS, "node_modules")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=PEERS, check=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_ready(port, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"relay on :{port} not ready after {secs}s")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class CpuCap:
    """Holds processes to `pct` % of one core with the kernel's CPU
    bandwidth control (a cgroup of their own: cgroup v1's `cpu` controller,
    or v2's `cpu.max`), for as long as the `with` block lasts, then moves
    each back to the group it was in (a service manager's, say), not to the
    root. The period is 10 ms, not the default 100 ms, so the cap throttles
    in short slices (closer to sharing a busy core than to running 75 ms and
    stopping 25). Needs root;
    `CpuCap.available()` says whether this machine has a controller to use."""

    V1, V2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"
    PERIOD_US = 10_000

    @classmethod
    def available(cls):
        if os.access(os.path.join(cls.V1, "cgroup.procs"), os.W_OK):
            return "v1"
        try:
            with open(os.path.join(cls.V2, "cgroup.controllers")) as f:
                if "cpu" in f.read().split() and os.access(cls.V2, os.W_OK):
                    return "v2"
        except OSError:
            pass
        return None

    def __init__(self, pids, pct, name="chat-relay-cap"):
        self.pids, self.pct, self.kind = list(pids), pct, self.available()
        if self.kind is None:
            raise OSError("no writable cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2 cpu.max)")
        self.root = self.V1 if self.kind == "v1" else self.V2
        self.dir = os.path.join(self.root, name)

    def _write(self, path, value):
        with open(path, "w") as f:
            f.write(str(value))

    def _group_of(self, pid):
        """`pid`'s group under this controller, from /proc/<pid>/cgroup."""
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if (controllers == "" if self.kind == "v2" else "cpu" in controllers.split(",")):
                    return path
        return "/"

    def __enter__(self):
        self.homes = {pid: self._group_of(pid) for pid in self.pids}
        os.makedirs(self.dir, exist_ok=True)
        quota = max(1000, round(self.PERIOD_US * self.pct / 100))
        if self.kind == "v1":
            self._write(os.path.join(self.dir, "cpu.cfs_period_us"), self.PERIOD_US)
            self._write(os.path.join(self.dir, "cpu.cfs_quota_us"), quota)
        else:
            self._write(os.path.join(self.dir, "cpu.max"), f"{quota} {self.PERIOD_US}")
        for pid in self.pids:
            self._write(os.path.join(self.dir, "cgroup.procs"), pid)
        return self

    def __exit__(self, *exc):
        for pid, home in self.homes.items():
            try:
                self._write(os.path.join(self.root, home.lstrip("/"), "cgroup.procs"), pid)
            except OSError:
                pass  # the process is gone
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def context_switches(pid):
    """Voluntary + involuntary context switches of every thread of `pid`: a
    count of wake-ups (a thread that sleeps and is woken switches once)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            total += int(line.split()[1])
            except OSError:
                pass
    except OSError:
        pass
    return total


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def psql(sql, db="test"):
    out = subprocess.run(
        ["psql", f"postgres://postgres@127.0.0.1:5432/{db}", "-qtAc", sql],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def results_dir(kind):
    """A fresh run directory, loadtest/results/<kind>-<stamp>: (stamp, path).
    The stamp also names the run's database, topic, queues and groups."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    out = os.path.join(ROOT, "loadtest/results", f"{kind}-{stamp}")
    os.makedirs(out, exist_ok=True)
    return stamp, out


def fresh_database(name):
    """Creates PostgreSQL database `name` (a run's own, so no run reads
    another's rows) and returns its URL."""
    psql(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def k6_fanout(relays, prefix, p, run_s, out_json, wait=True):
    """Runs loadtest/fanout.js. With wait=True returns (proc, k6's output);
    with wait=False (proc, started): an Event set once publishing began, and
    proc.finish() waits for the end. loadgen_fanout has the same interface."""
    env = dict(os.environ,
               K6_RELAYS=",".join(f"http://127.0.0.1:{r.port}" for r in relays),
               K6_ROOMS=str(p["rooms"]), K6_SUBS=str(p["subs"]), K6_RATE=str(p["rate"]),
               K6_RUN=f"{run_s}s", K6_SIZE=str(p["size"]), K6_WARMUP_S="3", K6_DRAIN_S="5",
               K6_PUBLISHERS=str(max(50, p["rate"] // 8)),
               K6_ROOM_PREFIX=prefix, K6_SUMMARY_JSON=out_json)
    proc = subprocess.Popen(["k6", "run", "-q", "--no-usage-report", os.path.join(ROOT, "loadtest/fanout.js")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.finish = lambda: proc.communicate()[0]
    if wait:
        return proc, proc.finish()
    # Publishing starts after the K6_WARMUP_S above.
    started = threading.Event()
    threading.Timer(3, started.set).start()
    return proc, started


def loadgen_cmd(relays, rooms, subs, publishers, rate, seconds, size, prefix):
    """The lean generator's fan-out command line (loadtest/perf.py uses it too)."""
    return [LOADGEN, "--url", ",".join(f"ws://127.0.0.1:{r.port}" for r in relays),
            "--rooms", str(rooms), "--subs", str(subs), "--publishers", str(publishers),
            "--rate", str(rate), "--seconds", str(seconds), "--size", str(size), "--prefix", prefix]


def loadgen_fanout(relays, prefix, p, run_s, out_json, wait=True):
    """The same fan-out with the lean Rust generator (target/release/loadgen):
    WebSocket publishers instead of k6's HTTP posts, for rates at which k6
    saturates the machine first. Writes its result in the k6 summary's shape
    (late sends stand in for dropped iterations: loadgen never drops, it
    sends late). With wait=False returns (proc, started) where `started` is an
    Event set when publishing begins."""
    cmd = loadgen_cmd(relays, p["rooms"], p["subs"], max(50, p["rate"] // 8), p["rate"], run_s, p["size"], prefix)
    gen = Loadgen(cmd + ["--drain", "5"])

    def finish():
        r = gen.result()
        summary = dict(generator="loadgen", publish_acked=r["acked"], lost=r["lost"], duplicates=r["duplicates"],
                       reordered=r["reordered"], e2e_ms=r["e2e_ms"], deliveries_per_s=r["deliveries_per_s"],
                       rate=p["rate"], duration_s=run_s, dropped_iterations=r["late_sends"],
                       cross_instance_share=r.get("cross_instance_share", 0.0),
                       seq_inversions=r.get("seq_inversions", 0), raw=r)
        with open(out_json, "w") as f:
            json.dump(summary, f, indent=2)
        return (f"loadgen: acked {r['acked']}, {r['deliveries_per_s']:.0f} deliveries/s, p50 {r['e2e_ms']['p50']} ms, "
                f"p99 {r['e2e_ms']['p99']} ms, lost {r['lost']} dup {r['duplicates']} reordered {r['reordered']}, "
                f"out of room order {r.get('seq_inversions', 0)}, late sends {r['late_sends']}, cross-instance {100 * r.get('cross_instance_share', 0):.0f} %"
                + (f", error frames {r.get('error_codes')}" if r.get("errors") else ""))

    gen.proc.finish = finish
    if wait:
        return gen.proc, finish()
    return gen.proc, gen.events["publish-start"]


def fanout(gen, *a, **kw):
    return (loadgen_fanout if gen == "loadgen" else k6_fanout)(*a, **kw)




def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_until(pred, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {secs}s")


class Relay:
    """One relay process (target/release/chat-relay, or CHAT_RELAY_BIN for an
    A/B of another build) with its roles and environment, on its own port.
    It can be stopped (SIGTERM), killed (SIGKILL) and started again on the
    same port (a restart in place)."""

    def __init__(self, name, env, roles, logdir, port=None):
        self.name, self.env, self.roles, self.logdir = name, env, roles, logdir
        self.port = port or free_port()
        self.binary = os.environ.get("CHAT_RELAY_BIN", os.path.join(ROOT, "target/release/chat-relay"))
        self.start()

    def start(self):
        e = dict(TANSU_PROFILE, **os.environ)
        e.update(self.env)
        e.update(BIND=f"127.0.0.1:{self.port}", ROLES=self.roles, INSTANCE_ID=self.name, RUST_LOG="warn")
        self.log = open(os.path.join(self.logdir, f"{self.name}.log"), "a")
        self.proc = subprocess.Popen([self.binary], env=e, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_ready(self.port)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def metric(self, name):
        try:
            _, body = get(f"http://127.0.0.1:{self.port}/metrics")
        except Exception:
            return 0.0
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        return total


class Server:
    """Any other server process a driver compares the relay with (the floor,
    a Socket.IO instance): started with `cmd` on its own port, ready when the
    port accepts connections; the same `name`, `port`, `proc`, `stop()` as
    Relay, so the generators and CPU sampling treat both alike."""

    def __init__(self, name, cmd, logdir, port=None, env=None, cwd=ROOT):
        self.name, self.logdir = name, logdir
        self.port = port or free_port()
        self.log = open(os.path.join(logdir, f"{name}.log"), "a")
        cmd = [a.replace("{port}", str(self.port)) for a in cmd]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=cwd)
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 30, f"{name} on :{self.port}")
        if self.proc.poll() is not None:
            raise SystemExit(f"{name} exited at start ({self.proc.returncode}); see {self.log.name}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Loadgen:
    """A running loadgen: its stderr markers (publish-start, publish-end, all
    joined) are recorded with their time — and, when `pids` is given, the CPU
    seconds of those processes at that moment, and their context switches in
    `switches` — other stderr lines are kept; `result()` waits for the end and
    parses the JSON summary it prints last."""

    MARKERS = ("publish-start", "publish-end", "all joined")

    def __init__(self, cmd, pids=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pids = dict(pids or {})
        self.pids["loadgen"] = self.proc.pid
        self.marks, self.errors, self.switches = {}, [], {}
        self.events = {m: threading.Event() for m in self.MARKERS}
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self):
        for line in self.proc.stderr:
            mark = next((m for m in self.MARKERS if line.startswith(m)), None)
            if mark:
                self.marks[mark] = (time.time(), {n: cpu_seconds(p) for n, p in self.pids.items()})
                self.switches[mark] = {n: context_switches(p) for n, p in self.pids.items()}
                self.events[mark].set()
            else:
                self.errors.append(line.rstrip())
        for e in self.events.values():
            e.set()

    def result(self, check=True):
        out = self.proc.stdout.read()
        self.proc.wait()
        self.watcher.join()
        if check and self.proc.returncode != 0:
            raise SystemExit(f"loadgen failed ({self.proc.returncode}): {self.errors[-5:]}")
        return json.loads(out.strip().splitlines()[-1])
