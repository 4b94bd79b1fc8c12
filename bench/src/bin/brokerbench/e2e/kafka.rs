//! Kafka with rdkafka, as `src/bus/kafka.rs` sets it up: a fresh topic with
//! the relay's partition count (tansu slows down as a topic grows), producers
//! with acks=all, idempotence, linger.ms, batch.size, compression and
//! message.timeout.ms from `KafkaConfig`; live consumers assigned every
//! partition at the end offsets (no group rebalance), workers as consumer
//! groups from the earliest offset that store each offset after processing,
//! committed by auto-commit every 500 ms.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_relay::bus::kafka::KafkaConfig;
use chat_relay::protocol::RoomId;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::stats::{LiveStats, WorkerStats};
use super::{Consumer, Pending, Publish};

pub struct Kafka {
    cfg: KafkaConfig,
}

/// The relay's connection settings common to every client.
fn base(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka_brokers)
        .set("socket.timeout.ms", "3000")
        .set("reconnect.backoff.max.ms", "2000");
    c
}

/// Deletes topic `KAFKA_TOPIC` on `KAFKA_BROKERS`. tansu keeps every
/// topic's records in memory, so a run's topic left behind makes the next
/// runs slower; the load tools drop it after each run.
pub async fn drop_topic(cfg: &KafkaConfig) -> anyhow::Result<()> {
    let admin = base(cfg)
        .create::<AdminClient<DefaultClientContext>>()
        .context("kafka admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let del = admin.delete_topics(&[&cfg.kafka_topic], &opts);
    let results = tokio::time::timeout(Duration::from_secs(10), del)
        .await
        .with_context(|| {
            format!(
                "kafka: deleting topic {}: no answer in 10 s",
                cfg.kafka_topic
            )
        })?
        .with_context(|| format!("kafka: deleting topic {}", cfg.kafka_topic))?;
    for r in results {
        if let Err((topic, code)) = r {
            anyhow::bail!("kafka: topic {topic} not deleted: {code}");
        }
    }
    Ok(())
}

/// Signals the first partition assignment of a group consumer.
struct Ctx {
    assigned: AtomicBool,
    notify: Notify,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
    }
}

type Cons = StreamConsumer<Ctx>;

fn consumer(cfg: &KafkaConfig, group: &str, shared: bool) -> anyhow::Result<Arc<Cons>> {
    let c: Cons = base(cfg)
        .set("group.id", group)
        .set("enable.auto.commit", if shared { "true" } else { "false" })
        .set("auto.commit.interval.ms", "500")
        .set(
            "enable.auto.offset.store",
            if shared { "false" } else { "true" },
        )
        .set(
            "auto.offset.reset",
            if shared { "earliest" } else { "latest" },
        )
        .set("fetch.wait.max.ms", cfg.kafka_fetch_wait_max_ms.to_string())
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set(
            "max.poll.interval.ms",
            cfg.kafka_max_poll_interval_ms.to_string(),
        )
        .create_with_context(Ctx {
            assigned: AtomicBool::new(false),
            notify: Notify::new(),
        })?;
    Ok(Arc::new(c))
}

/// Every partition of the topic at its current end offset (blocking).
fn assign_at_end(c: &Cons, topic: &str) -> anyhow::Result<()> {
    let t = Duration::from_secs(5);
    let md = c.fetch_metadata(Some(topic), t)?;
    let mut tpl = TopicPartitionList::new();
    for mt in md.topics() {
        for p in mt.partitions() {
            let (_, high) = c.fetch_watermarks(topic, p.id(), t)?;
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
        }
    }
    anyhow::ensure!(tpl.count() > 0, "topic {topic} has no partitions");
    c.assign(&tpl)?;
    Ok(())
}

impl Kafka {
    pub async fn setup(mut cfg: KafkaConfig, run: &str) -> anyhow::Result<Kafka> {
        cfg.kafka_topic = format!("brokerbench-{run}");
        let admin: AdminClient<DefaultClientContext> = base(&cfg).create()?;
        let retention = cfg.kafka_retention_ms.to_string();
        let topic = NewTopic::new(
            &cfg.kafka_topic,
            cfg.kafka_partitions,
            TopicReplication::Fixed(cfg.kafka_replication_factor),
        )
        .set("retention.ms", &retention);
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = tokio::time::timeout(
            Duration::from_secs(15),
            admin.create_topics([&topic], &opts),
        )
        .await
        .context("create topic timed out")??;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
            }
        }
        Ok(Kafka { cfg })
    }

    pub fn producer(&self) -> anyhow::Result<KafkaProducer> {
        let cfg = &self.cfg;
        let p: FutureProducer = base(cfg)
            .set("acks", "all")
            .set("enable.idempotence", cfg.kafka_idempotence.to_string())
            .set("linger.ms", cfg.kafka_linger_ms.to_string())
            .set("batch.size", cfg.kafka_batch_size.to_string())
            .set("compression.type", &cfg.kafka_compression)
            .set(
                "message.timeout.ms",
                cfg.kafka_message_timeout_ms.to_string(),
            )
            .create()?;
        Ok(KafkaProducer {
            producer: p,
            topic: cfg.kafka_topic.clone(),
        })
    }

    /// An instance's live consumer: every partition at the end, every room
    /// kept (the relay filters rooms locally; here every room has members).
    pub async fn live(
        &self,
        instance: usize,
        rooms: &[RoomId],
        mut stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        let group = format!("live-{}-{instance}", self.cfg.kafka_topic);
        let c = consumer(&self.cfg, &group, false)?;
        let (c2, topic) = (c.clone(), self.cfg.kafka_topic.clone());
        tokio::task::spawn_blocking(move || assign_at_end(&c2, &topic)).await??;
        let rooms: HashSet<String> = rooms.iter().map(|r| r.as_str().to_string()).collect();
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = c.recv() => m,
                };
                match m {
                    Ok(m) => {
                        let ours = m
                            .key()
                            .and_then(|k| std::str::from_utf8(k).ok())
                            .is_some_and(|k| rooms.contains(k));
                        if ours {
                            stats.record(m.payload().unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        eprintln!("kafka live consumer error: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    /// A worker group: `KAFKA_CONSUMERS` members, each storing the offset of
    /// every message after "processing" it. Returns once all are assigned.
    pub async fn worker(
        &self,
        group: &str,
        tag: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<Vec<Consumer<WorkerStats>>> {
        let mut out = Vec::new();
        let mut members = Vec::new();
        for _ in 0..self.cfg.kafka_consumers.max(1) {
            let c = consumer(&self.cfg, group, true)?;
            c.subscribe(&[&self.cfg.kafka_topic])?;
            members.push(c.clone());
            let mut stats = WorkerStats::new(tag);
            let unique = stats.unique.clone();
            let stop = stop.clone();
            let task = tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = c.recv() => m,
                    };
                    match m {
                        Ok(m) => {
                            stats.record(m.payload().unwrap_or_default());
                            if let Err(e) = c.store_offset(m.topic(), m.partition(), m.offset()) {
                                eprintln!("kafka store_offset: {e}");
                            }
                        }
                        Err(e) => {
                            eprintln!("kafka worker consumer error: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                // Leave the group; closing commits the stored offsets.
                c.unsubscribe();
                stats
            });
            out.push(Consumer { unique, task });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in members {
            while !c.context().assigned.load(Ordering::SeqCst) {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{group}: no partition assignment in 30 s"
                );
                let n = c.context().notify.notified();
                let _ = tokio::time::timeout(Duration::from_millis(100), n).await;
            }
        }
        Ok(out)
    }

    /// Deletes the run's topic (best effort: reported, not fatal).
    pub async fn teardown(&self) {
        if let Err(e) = drop_topic(&self.cfg).await {
            eprintln!("{e:#}");
        }
    }

    pub fn settings(&self) -> serde_json::Value {
        let c = &self.cfg;
        json!({"topic": c.kafka_topic, "partitions": c.kafka_partitions, "acks": "all",
               "enable.idempotence": c.kafka_idempotence, "linger.ms": c.kafka_linger_ms,
               "batch.size": c.kafka_batch_size, "compression.type": c.kafka_compression,
               "message.timeout.ms": c.kafka_message_timeout_ms,
               "fetch.wait.max.ms": c.kafka_fetch_wait_max_ms,
               "consumers_per_group": c.kafka_consumers.max(1)})
    }
}

pub struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
}

impl Publish for KafkaProducer {
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>> {
        Box::pin(async move {
            // Enqueued in call order; a full local queue is retried for up
            // to 200 ms, the relay's `send` queue timeout.
            let deadline = Instant::now() + Duration::from_millis(200);
            loop {
                let rec = FutureRecord::to(&self.topic)
                    .key(room.as_str())
                    .payload(&payload);
                match self.producer.send_result(rec) {
                    Ok(delivery) => {
                        let pending: Pending = Box::pin(async move {
                            match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(e.to_string()),
                                Err(_) => Err("delivery canceled".to_string()),
                            }
                        });
                        return Ok(pending);
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e.to_string()),
                }
            }
        })
    }
}
