//! `brokerbench e2e`: the relay's broker traffic without the relay, to know
//! the broker's own ceiling for the work the comparison asks of it.
//!
//! Reproduced, per backend, with the raw client libraries and the relay's own
//! settings structs (`KafkaConfig`, `RabbitConfig`, `RedisConfig`,
//! `RedisStreamsConfig`, `NatsConfig`: same
//! defaults, same environment variables, so `KAFKA_FETCH_WAIT_MAX_MS=5`
//! applies to both) but none of the relay's bus code:
//! * `--instances` relay instances, each with its own producer (connection)
//!   and its own live consumer that receives every room;
//! * the two shared worker groups (`db-writer`, `analytics`), which decode
//!   each message and ack / store its offset — no database;
//! * open-loop publishers at a fixed total rate, staggered over one period
//!   like loadgen's, each on one room and one instance (loadgen's placement),
//!   every message keyed by its room and carrying publisher, sequence and
//!   send time inside the relay's own message frame.
//!
//! Everything runs in this one process (the relay spreads it over three), so
//! the figures include this process's CPU share on the same machine.
//!
//! Latency is measured at the live consumers, from the send stamp (taken when
//! the publish was due, before any wait for the per-room limit) to decoding.
//! Loss = acked messages a live consumer had not received by the end of the
//! drain; duplicates and reordering per publisher as loadgen counts them.

mod kafka;
mod nats;
mod rabbitmq;
mod redis;
mod redis_streams;
mod stats;

pub use kafka::drop_topic;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_relay::bus::kafka::KafkaConfig;
use chat_relay::bus::nats::NatsConfig;
use chat_relay::bus::rabbitmq::RabbitConfig;
use chat_relay::bus::redis::RedisConfig;
use chat_relay::bus::redis_streams::RedisStreamsConfig;
use chat_relay::protocol::RoomId;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use stats::{Encoder, LiveStats, WorkerStats, histogram, now_us};

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Kafka,
    Rabbitmq,
    Redis,
    RedisStreams,
    Nats,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::Kafka => "kafka",
            BackendKind::Rabbitmq => "rabbitmq",
            BackendKind::Redis => "redis",
            BackendKind::RedisStreams => "redis-streams",
            BackendKind::Nats => "nats",
        }
    }
}

/// Flags of `brokerbench e2e`. The broker settings are the relay's own
/// (flattened: same flags, same environment variables, same defaults); only
/// the topic, exchange, queue prefix, stream, subject, key prefix and group
/// names are replaced by unique per-run names.
#[derive(clap::Args)]
pub struct E2eArgs {
    #[arg(long, value_enum)]
    backend: BackendKind,
    /// Total messages per second over all publishers (open loop).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Relay instances reproduced: one producer and one live consumer each.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Message text size in bytes (loadgen's `--size`); the bus payload is
    /// the relay's frame around it.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Publishers, each on one room and one instance (default: max(50, rate / 8),
    /// the count compare.py gives its generators).
    #[arg(long)]
    publishers: Option<usize>,
    /// Publishes outstanding per room per instance: 1 is the relay holding a
    /// per-room lock across the publish; unset = pipelined (no limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    inflight_per_room: Option<u32>,
    /// Longest wait, after the last publish settled, for consumers to catch up.
    #[arg(long, default_value_t = 5)]
    drain: u64,
    /// Seconds of warm-up traffic (at most 100 msg/s, excluded from the figures) first.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Run without the live consumers (to locate a limit).
    #[arg(long)]
    no_live: bool,
    /// Run without the worker groups (to locate a limit).
    #[arg(long)]
    no_workers: bool,
    /// Run id used in every name (default: unique).
    #[arg(long)]
    run: Option<String>,
    #[command(flatten)]
    kafka: KafkaConfig,
    #[command(flatten)]
    rabbit: RabbitConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    redis_streams: RedisStreamsConfig,
    #[command(flatten)]
    nats: NatsConfig,
}

/// Resolves once the broker confirmed one publish (or it failed).
pub type Pending = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One instance's producer.
pub trait Publish: Send + Sync {
    /// Hands one message to the client library; messages started one after
    /// the other leave in that order. The returned future resolves on the
    /// broker's confirmation.
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>>;
}

/// A consumer task and its progress counter (unique messages of the run).
pub struct Consumer<S> {
    pub unique: Arc<AtomicU64>,
    pub task: JoinHandle<S>,
}

/// The broker side of a run: topology set-up and tear-down, producers and
/// consumers. `live` and `worker` return once the consumer is live.
enum Broker {
    Kafka(kafka::Kafka),
    Rabbit(rabbitmq::Rabbit),
    Redis(redis::Redis),
    RedisStreams(redis_streams::RedisStreams),
    /// Boxed: the JetStream context makes it several times the others' size.
    Nats(Box<nats::Nats>),
}

impl Broker {
    async fn setup(a: &E2eArgs, run: &str) -> anyhow::Result<Broker> {
        Ok(match a.backend {
            BackendKind::Kafka => Broker::Kafka(kafka::Kafka::setup(a.kafka.clone(), run).await?),
            BackendKind::Rabbitmq => {
                Broker::Rabbit(rabbitmq::Rabbit::setup(a.rabbit.clone(), run).await?)
            }
            BackendKind::Redis => Broker::Redis(redis::Redis::setup(a.redis.clone(), run)?),
            BackendKind::RedisStreams => Broker::RedisStreams(
                redis_streams::RedisStreams::setup(a.redis.clone(), a.redis_streams.clone(), run)
                    .await?,
            ),
            BackendKind::Nats => {
                Broker::Nats(Box::new(nats::Nats::setup(a.nats.clone(), run).await?))
            }
        })
    }

    async fn producer(&self, instance: usize) -> anyhow::Result<Arc<dyn Publish>> {
        Ok(match self {
            Broker::Kafka(b) => Arc::new(b.producer()?),
            Broker::Rabbit(b) => Arc::new(b.producer(instance).await?),
            Broker::Redis(b) => Arc::new(b.producer().await?),
            Broker::RedisStreams(b) => Arc::new(b.producer().await?),
            Broker::Nats(b) => Arc::new(b.producer(instance).await?),
        })
    }

    async fn live(
        &self,
        instance: usize,
        rooms: &[RoomId],
        stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        match self {
            Broker::Kafka(b) => b.live(instance, rooms, stats, stop).await,
            Broker::Rabbit(b) => b.live(instance, rooms, stats, stop).await,
            Broker::Redis(b) => b.live(rooms, stats, stop).await,
            Broker::RedisStreams(b) => b.live(instance, rooms, stats, stop).await,
            Broker::Nats(b) => b.live(instance, rooms, stats, stop).await,
        }
    }

    async fn worker(
        &self,
        group: &str,
        tag: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<Vec<Consumer<WorkerStats>>> {
        match self {
            Broker::Kafka(b) => b.worker(group, tag, stop).await,
            Broker::Rabbit(b) => Ok(vec![b.worker(group, WorkerStats::new(tag), stop).await?]),
            Broker::Redis(b) => Ok(vec![b.worker(WorkerStats::new(tag), stop).await?]),
            Broker::RedisStreams(b) => {
                Ok(vec![b.worker(group, WorkerStats::new(tag), stop).await?])
            }
            Broker::Nats(b) => Ok(vec![b.worker(group, WorkerStats::new(tag), stop).await?]),
        }
    }

    async fn teardown(&self) {
        match self {
            Broker::Kafka(b) => b.teardown().await,
            Broker::Rabbit(b) => b.teardown().await,
            Broker::Redis(_) => {} // channels leave nothing behind
            Broker::RedisStreams(b) => b.teardown().await,
            Broker::Nats(b) => b.teardown().await,
        }
    }

    /// The client settings in effect, for the report.
    fn settings(&self) -> serde_json::Value {
        match self {
            Broker::Kafka(b) => b.settings(),
            Broker::Rabbit(b) => b.settings(),
            Broker::Redis(b) => b.settings(),
            Broker::RedisStreams(b) => b.settings(),
            Broker::Nats(b) => b.settings(),
        }
    }
}

/// Where publisher `p` sits: loadgen's placement (its room `p % rooms`, its
/// instance rotated so a room's publishers spread over the instances).
fn instance_of(p: usize, rooms: usize, instances: usize) -> usize {
    (p % rooms + p / rooms) % instances
}

/// Publish-side tallies of one phase.
struct Ledger {
    /// Per publisher, the sequence numbers the broker confirmed.
    acked: Vec<std::sync::Mutex<HashSet<u64>>>,
    acked_total: AtomicU64,
    /// Confirmed within 2 s after the publishing window (as loadgen counts acks).
    acked_in_time: AtomicU64,
    sent: AtomicU64,
    errors: AtomicU64,
    late: AtomicU64,
    inflight: AtomicU64,
    /// Publish call to confirmation, µs.
    ack_hist: Mutex<Histogram<u64>>,
    error_samples: Mutex<Vec<String>>,
}

impl Ledger {
    fn new(publishers: usize) -> Self {
        Ledger {
            acked: (0..publishers).map(|_| Default::default()).collect(),
            acked_total: AtomicU64::new(0),
            acked_in_time: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            late: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            ack_hist: Mutex::new(histogram()),
            error_samples: Mutex::new(Vec::new()),
        }
    }

    fn acked_count(&self) -> u64 {
        self.acked_total.load(Ordering::Relaxed)
    }
}

/// One open-loop publishing phase.
struct Phase<'a> {
    tag: &'a str,
    rate: u64,
    seconds: u64,
}

/// Runs one phase: every publisher sends at `rate / publishers` on its clock
/// (a send is due whether or not the previous one was confirmed); a per-
/// publisher sender starts the publishes in order, waiting for the room's
/// limit when there is one. Returns once every publish settled (or 15 s),
/// with the seconds of publishing and the number of messages scheduled.
async fn publish_phase(
    phase: Phase<'_>,
    a: &E2eArgs,
    publishers: usize,
    rooms: &[RoomId],
    producers: &[Arc<dyn Publish>],
    limits: &[Option<Arc<Semaphore>>],
) -> (Arc<Ledger>, f64, u64) {
    let ledger = Arc::new(Ledger::new(publishers));
    let enc = Arc::new(Encoder::new(phase.tag, a.size));
    let per_pub = (phase.rate as f64 / publishers as f64).max(0.001);
    let period = Duration::from_secs_f64(1.0 / per_pub);
    // An exact count per publisher, so `offered` is what was scheduled.
    let per_publisher = (phase.seconds as f64 * per_pub).round().max(1.0) as u64;
    let started = Instant::now();
    let start_at = started + Duration::from_millis(500);
    let in_time = start_at + Duration::from_secs(phase.seconds) + period + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let room_ix = p % rooms.len();
        let instance = instance_of(p, rooms.len(), producers.len());
        let room = rooms[room_ix].clone();
        let producer = producers[instance].clone();
        let limit = limits[room_ix * producers.len() + instance].clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Vec<u8>)>();
        let (enc, ledger_t) = (enc.clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            let phase_off = period.mul_f64(p as f64 / publishers as f64);
            tokio::time::sleep_until((start_at + phase_off).into()).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = 0u64;
            while seq < per_publisher {
                let due = tick.tick().await;
                if due.elapsed() > Duration::from_millis(10) {
                    ledger_t.late.fetch_add(1, Ordering::Relaxed);
                }
                let payload = enc.encode(&room, p as u64, seq, now_us());
                if tx.send((seq, payload)).is_err() {
                    break;
                }
                seq += 1;
            }
        }));
        let ledger = ledger.clone();
        let room = rooms[room_ix].clone();
        tasks.push(tokio::spawn(async move {
            while let Some((seq, payload)) = rx.recv().await {
                let permit = match &limit {
                    Some(l) => match l.clone().acquire_owned().await {
                        Ok(permit) => Some(permit),
                        Err(_) => break, // closed: never, the semaphores live for the run
                    },
                    None => None,
                };
                ledger.sent.fetch_add(1, Ordering::Relaxed);
                ledger.inflight.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let res = producer.start(&room, payload).await;
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let res = match res {
                        Ok(pending) => pending.await,
                        Err(e) => Err(e),
                    };
                    drop(permit);
                    match res {
                        Ok(()) => {
                            let now = Instant::now();
                            if let Ok(mut set) = ledger.acked[p].lock() {
                                set.insert(seq);
                            }
                            ledger.acked_total.fetch_add(1, Ordering::Relaxed);
                            if now <= in_time {
                                ledger.acked_in_time.fetch_add(1, Ordering::Relaxed);
                            }
                            let us = now.duration_since(started).as_micros() as u64;
                            let _ = ledger.ack_hist.lock().await.record(us.max(1));
                        }
                        Err(e) => {
                            ledger.errors.fetch_add(1, Ordering::Relaxed);
                            let mut s = ledger.error_samples.lock().await;
                            if s.len() < 5 {
                                s.push(e);
                            }
                        }
                    }
                    ledger.inflight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let send_secs = started
        .elapsed()
        .saturating_sub(Duration::from_millis(500))
        .as_secs_f64()
        .min(phase.seconds as f64)
        .max(0.001);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ledger.inflight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let offered = per_publisher * publishers as u64;
    (ledger, send_secs, offered)
}

/// CPU seconds this process used so far (user + system).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, in clock ticks (100 per second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

pub async fn run(a: E2eArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rooms > 0 && a.instances > 0 && a.rate > 0,
        "rooms, instances and rate must be > 0"
    );
    let run = a
        .run
        .clone()
        .unwrap_or_else(|| format!("bb{}", now_us() % 10_000_000_000));
    let rooms: Vec<RoomId> = (0..a.rooms)
        .map(|i| RoomId::parse(&format!("chat.{run}-{i}")))
        .collect::<Option<_>>()
        .context("--run must be letters, digits, '-' or '_'")?;
    let broker = Broker::setup(&a, &run).await?;
    let res = drive(&a, &run, &rooms, &broker).await;
    broker.teardown().await;
    let out = res?;
    let e = &out["e2e_ms"];
    eprintln!(
        "brokerbench e2e {} (inflight/room {}): offered {} acked {} ({:.0}/s) errors {} late {}; live p50 {} p99 {} ms, lost {} dup {} reordered {}; workers {}",
        a.backend.name(),
        a.inflight_per_room
            .map_or("unlimited".to_string(), |n| n.to_string()),
        out["offered"],
        out["acked"],
        out["acked_per_s"].as_f64().unwrap_or(0.0),
        out["errors"],
        out["late_sends"],
        e["p50"],
        e["p99"],
        out["lost"],
        out["duplicates"],
        out["reordered"],
        out["worker_groups"],
    );
    println!("{out}");
    Ok(())
}

async fn drive(
    a: &E2eArgs,
    run: &str,
    rooms: &[RoomId],
    broker: &Broker,
) -> anyhow::Result<serde_json::Value> {
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let mut live = Vec::new();
    if !a.no_live {
        for i in 0..a.instances {
            let c = broker
                .live(i, rooms, LiveStats::new(run), stop.clone())
                .await
                .with_context(|| format!("live consumer {i}"))?;
            live.push(c);
        }
    }
    let mut workers = Vec::new();
    if !a.no_workers {
        for role in ["db-writer", "analytics"] {
            let group = format!("{role}-{run}");
            let c = broker
                .worker(&group, run, stop.clone())
                .await
                .with_context(|| format!("worker group {group}"))?;
            workers.push((role, c));
        }
    }
    let mut producers = Vec::new();
    for i in 0..a.instances {
        producers.push(
            broker
                .producer(i)
                .await
                .with_context(|| format!("producer {i}"))?,
        );
    }
    let limits: Vec<Option<Arc<Semaphore>>> = (0..rooms.len() * a.instances)
        .map(|_| {
            a.inflight_per_room
                .map(|n| Arc::new(Semaphore::new(n as usize)))
        })
        .collect();
    let publishers = a
        .publishers
        .unwrap_or_else(|| (a.rate as usize / 8).max(50))
        .max(1);

    if a.warmup > 0 {
        let warm = format!("{run}w");
        let phase = Phase {
            tag: &warm,
            rate: a.rate.min(100),
            seconds: a.warmup,
        };
        publish_phase(phase, a, publishers, rooms, &producers, &limits).await;
    }

    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let phase = Phase {
        tag: run,
        rate: a.rate,
        seconds: a.seconds,
    };
    let (ledger, send_secs, offered) =
        publish_phase(phase, a, publishers, rooms, &producers, &limits).await;
    let acked = ledger.acked_count();
    // Drain: until every consumer has every acked message, or `drain` s.
    let deadline = Instant::now() + Duration::from_secs(a.drain);
    loop {
        let live_done = live
            .iter()
            .all(|c| c.unique.load(Ordering::Relaxed) >= acked);
        let workers_done = workers.iter().all(|(_, cs)| {
            cs.iter()
                .map(|c| c.unique.load(Ordering::Relaxed))
                .sum::<u64>()
                >= acked
        });
        if (live_done && workers_done) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_pct = 100.0 * (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64().max(0.001);
    stop.cancel();

    let mut hist = histogram();
    let (mut received, mut dups, mut reordered, mut lost, mut unacked_seen, mut other) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for c in live {
        let s = c.task.await.context("live consumer task")?;
        let _ = hist.add(&s.hist);
        received += s.received;
        dups += s.duplicates;
        reordered += s.reordered;
        other += s.other;
        let mut delivered_acked = 0;
        for (p, set) in ledger.acked.iter().enumerate() {
            let set = set.lock().map(|s| s.clone()).unwrap_or_default();
            for seq in set {
                if s.seen.contains(p as u64, seq) {
                    delivered_acked += 1;
                } else {
                    lost += 1;
                }
            }
        }
        // Delivered although the broker never confirmed it: not a loss.
        unacked_seen += s
            .unique
            .load(Ordering::Relaxed)
            .saturating_sub(delivered_acked);
    }
    let mut groups = serde_json::Map::new();
    for (role, cs) in workers {
        let (mut n, mut unique, mut wdups, mut wother) = (0, 0, 0, 0);
        for c in cs {
            let s = c.task.await.context("worker task")?;
            n += s.received;
            unique += s.unique.load(Ordering::Relaxed);
            wdups += s.duplicates;
            wother += s.other;
        }
        groups.insert(
            role.to_string(),
            json!({"processed": n, "unique": unique, "duplicates": wdups, "other": wother,
                   "lag_at_end": acked.saturating_sub(unique)}),
        );
    }
    let ack_h = ledger.ack_hist.lock().await;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let in_time = ledger.acked_in_time.load(Ordering::Relaxed);
    let payload_bytes = Encoder::new(run, a.size)
        .encode(&rooms[0], 0, 0, now_us())
        .len();
    let live_n = if a.no_live { 0 } else { a.instances };
    Ok(json!({
        "mode": "e2e", "backend": a.backend.name(), "run": run,
        "rate": a.rate, "seconds": a.seconds, "rooms": a.rooms, "instances": a.instances,
        "publishers": publishers, "size": a.size, "payload_bytes": payload_bytes,
        "inflight_per_room": a.inflight_per_room,
        "live_consumers": live_n,
        "consumers_in_process": true,
        "offered": offered,
        "sent": ledger.sent.load(Ordering::Relaxed),
        "acked": in_time,
        "acked_total": acked,
        "acked_per_s": (in_time as f64 / send_secs).round(),
        "errors": ledger.errors.load(Ordering::Relaxed),
        "error_samples": ledger.error_samples.lock().await.clone(),
        "late_sends": ledger.late.load(Ordering::Relaxed),
        "publish_ack_ms": {"p50": ms(&ack_h, 0.5), "p99": ms(&ack_h, 0.99), "max": ack_h.max() as f64 / 1000.0},
        "deliveries": received,
        "expected_deliveries": acked * live_n as u64,
        "deliveries_per_s": (received as f64 / send_secs).round(),
        "lost": lost, "duplicates": dups, "reordered": reordered,
        "delivered_unacked": unacked_seen, "other_deliveries": other,
        "e2e_ms": {"p50": ms(&hist, 0.5), "p95": ms(&hist, 0.95), "p99": ms(&hist, 0.99),
                   "p999": ms(&hist, 0.999), "max": hist.max() as f64 / 1000.0},
        "worker_groups": groups,
        "bench_cpu_pct": (cpu_pct * 10.0).round() / 10.0,
        "settings": broker.settings(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// `compare.py` passes the relay's `BUS` names as `--backend`.
    #[test]
    fn backend_names_are_the_relays_bus_names() {
        for name in ["kafka", "rabbitmq", "redis", "redis-streams", "nats"] {
            let kind = BackendKind::from_str(name, false).expect(name);
            assert_eq!(kind.name(), name);
        }
    }
}
