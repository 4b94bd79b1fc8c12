//! `BUS=kafka`: the backend that loses nothing and replays everything.
//!
//! * One topic (`KAFKA_TOPIC`, default `game-messages`), created at start-up
//!   through the admin API with `KAFKA_PARTITIONS`, `KAFKA_REPLICATION_FACTOR`
//!   and `retention.ms`. **Key = room id**: one room lives in one partition, so
//!   its messages keep their order.
//! * Producer: `acks=all`, idempotence on, small `linger.ms` (chat is latency
//!   bound; a few ms still batches under load), compression. `publish` returns
//!   once the broker acknowledged the write — only then does the client get its
//!   `ack`. Failures are retried a bounded number of times, then reported.
//! * Live delivery: a consumer group per instance, starting at the **latest**
//!   offset, so every instance sees every message. Kafka cannot filter by key
//!   at the broker, so an instance reads every room and drops the rooms it does
//!   not serve (`LocalRooms`) — the price of the log model.
//! * Workers (`db-writer`, `analytics`): shared groups starting at the
//!   **earliest** offset, `enable.auto.offset.store=false`: a delivery's offset
//!   is stored only when the caller acks it (after its DB commit), then
//!   committed by auto-commit. At-least-once; the idempotent writes make it
//!   effectively once. Storing offset N+1 commits everything below it in that
//!   partition, so callers ack in delivery order (the workers do).
//!   A nacked or dropped delivery is re-read after a restart or rebalance, not
//!   immediately: Kafka redelivers by position, not by message.
//! * **Replay**: [`crate::replay`] rewinds a stopped group's committed offsets (to the
//!   beginning, given offsets, or a time), so a restarted worker reprocesses
//!   the log — rebuilding the DB or the analytics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::reconnect::Backoff;
use super::room_order::{RoomOrder, Ticket};
use super::{
    Acker, AllRooms, BusError, Capabilities, Confirm, ConsumerLag, Delivery, GroupKind, LocalRooms,
    MessageBus, Outgoing, RoomInterest, RoomScope, SubscribeOptions, Subscription,
};
use crate::protocol::RoomId;

/// Settings of the Kafka bus.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Topic of all chat traffic (created at start-up when missing).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "game-messages")]
    pub kafka_topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 30)]
    pub kafka_partitions: i32,
    /// Replication factor of the topic when it is created (3 on a real cluster).
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    pub kafka_replication_factor: i32,
    /// `retention.ms` of the topic when it is created (default 7 days): how far back replay reaches.
    #[arg(long, env = "KAFKA_RETENTION_MS", default_value_t = 604_800_000)]
    pub kafka_retention_ms: i64,
    /// Producer `linger.ms`: small, because chat is latency-bound; a few ms still batches under load.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 2)]
    pub kafka_linger_ms: u32,
    /// Producer `batch.size` in bytes.
    #[arg(long, env = "KAFKA_BATCH_SIZE", default_value_t = 131_072)]
    pub kafka_batch_size: u32,
    /// Producer `compression.type` (none, gzip, snappy, lz4, zstd).
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4")]
    pub kafka_compression: String,
    /// Consumer `fetch.wait.max.ms`: how long the broker may hold a fetch
    /// while it has no data. Kafka answers a fetch as soon as data arrives
    /// (`fetch.min.bytes` = 1), so a long poll costs no latency and saves the
    /// broker an empty fetch every few ms per consumer. tansu instead holds
    /// every fetch for the whole wait: the tests and load tools set 5 ms for it.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value_t = 500)]
    pub kafka_fetch_wait_max_ms: u32,
    /// Consumers per shared group in one process (they share the partitions).
    #[arg(long, env = "KAFKA_CONSUMERS", default_value_t = 1)]
    pub kafka_consumers: usize,
    /// Publish attempts after the first one failed.
    #[arg(long, env = "KAFKA_PUBLISH_RETRIES", default_value_t = 2)]
    pub kafka_publish_retries: u32,
    /// Backoff before the first publish retry (ms), doubled each time.
    #[arg(long, env = "KAFKA_PUBLISH_BACKOFF_MS", default_value_t = 100)]
    pub kafka_publish_backoff_ms: u64,
    /// Consumer `max.poll.interval.ms`, which is also the rebalance timeout: a
    /// group waits this long for a member that stopped polling.
    #[arg(long, env = "KAFKA_MAX_POLL_INTERVAL_MS", default_value_t = 30_000)]
    pub kafka_max_poll_interval_ms: u32,
    /// `enable.idempotence` of the producer: no duplicates or reordering from
    /// producer retries. Keep it on; the broker-restart test turns it off only
    /// because tansu's SQLite engine panics on a known producer id after a crash.
    #[arg(long, env = "KAFKA_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_idempotence: bool,
    /// `message.timeout.ms`: longest the producer tries to deliver one message.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 1500)]
    pub kafka_message_timeout_ms: u32,
}

crate::default_from_env!(KafkaConfig);

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("kafka: {e}"))
}

fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka_brokers)
        .set("socket.timeout.ms", "3000")
        .set("reconnect.backoff.max.ms", "2000");
    c
}

/// Creates the topic when it does not exist.
pub async fn ensure_topic(cfg: &KafkaConfig) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = base_config(cfg)
        .create()
        .map_err(|e| BusError::Config(e.to_string()))?;
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
    .map_err(|_| unavailable("create topic timed out"))?
    .map_err(unavailable)?;
    for r in res {
        match r {
            Ok(_) => {
                tracing::info!(topic = %cfg.kafka_topic, partitions = cfg.kafka_partitions, "kafka topic created")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(BusError::Config(format!("cannot create topic {t}: {e}"))),
        }
    }
    Ok(())
}

pub struct KafkaBus {
    cfg: KafkaConfig,
    /// Replaced when librdkafka reports a fatal error: an idempotent producer
    /// whose producer id/sequence state the broker no longer accepts (e.g. a
    /// broker that lost it in a crash) cannot recover and must be recreated.
    producer: Arc<ProducerSlot>,
    /// Keeps a room's records in send order across retries on a new producer.
    order: Arc<RoomOrder>,
    closed: CancellationToken,
    /// Records the instance consumers are to drop unread (see
    /// [`KafkaBus::hide_next_live_records`]); 0 outside that test.
    hidden: Arc<std::sync::atomic::AtomicU64>,
}

/// The current producer and its generation (1, then one more per
/// replacement), shared with the confirmations still in flight (a retry
/// after a fatal error uses the replacement).
type ProducerSlot = std::sync::RwLock<(u64, FutureProducer)>;

fn make_producer(cfg: &KafkaConfig) -> Result<FutureProducer, BusError> {
    base_config(cfg)
        .set("acks", "all")
        .set("enable.idempotence", cfg.kafka_idempotence.to_string())
        .set("linger.ms", cfg.kafka_linger_ms.to_string())
        .set("batch.size", cfg.kafka_batch_size.to_string())
        .set("compression.type", &cfg.kafka_compression)
        .set(
            "message.timeout.ms",
            cfg.kafka_message_timeout_ms.to_string(),
        )
        .create()
        .map_err(|e| BusError::Config(e.to_string()))
}

impl KafkaBus {
    pub async fn connect(cfg: KafkaConfig) -> Result<KafkaBus, BusError> {
        ensure_topic(&cfg).await?;
        let producer = make_producer(&cfg)?;
        Ok(KafkaBus {
            cfg,
            producer: Arc::new(std::sync::RwLock::new((1, producer))),
            order: Arc::default(),
            closed: CancellationToken::new(),
            hidden: Arc::default(),
        })
    }

    fn producer(&self) -> FutureProducer {
        current(&self.producer).1
    }

    /// Fault injection for the live-gap test: this bus's instance (live)
    /// consumers drop the next `n` records they fetch before looking at them,
    /// as a broker's fetch that hid a batch would (tansu does, at random).
    /// The records stay in the log and reach the workers; the live consumer
    /// only learns of them from the offsets that follow. Nothing in the
    /// server calls this.
    #[doc(hidden)]
    pub fn hide_next_live_records(&self, n: u64) {
        self.hidden.fetch_add(n, Ordering::SeqCst);
    }
}

/// Takes one from the fault-injection count, if any is left (at 0 it only
/// loads: `fetch_update` writes nothing when the closure declines).
fn take_hidden(hidden: &std::sync::atomic::AtomicU64) -> bool {
    hidden
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The current producer and its generation.
fn current(slot: &ProducerSlot) -> (u64, FutureProducer) {
    // A poisoned lock still holds a usable producer.
    match slot.read() {
        Ok(p) => p.clone(),
        Err(e) => e.into_inner().clone(),
    }
}

/// Whether a delivery error means the broker no longer accepts this
/// producer's id/epoch: every later record of the same producer fails the
/// same way, so only a new producer (a new id) can publish again. librdkafka
/// does not always flag this as fatal for an idempotent, non-transactional
/// producer: against tansu, whose `InitProducerId` cannot bump an idempotent
/// producer's epoch (librdkafka asks after a delivery timed out), every
/// record of the affected gateway failed with `ProducerFenced` from then on —
/// 15,120 of 30,000 sends in a fault run — and `fatal_error()` stayed empty.
/// Returns the code and the reason when it does.
fn fenced(e: &rdkafka::error::KafkaError) -> Option<(RDKafkaErrorCode, String)> {
    match e.rdkafka_error_code()? {
        code @ (RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch) => {
            Some((code, e.to_string()))
        }
        _ => None,
    }
}

/// Recreates the producer if `failed` (the one that just failed) hit a fatal
/// error or was fenced by the broker (`error`, see [`fenced`]), unless it has
/// been replaced already.
fn replace_if_dead(
    slot: &ProducerSlot,
    cfg: &KafkaConfig,
    failed: &FutureProducer,
    error: Option<&rdkafka::error::KafkaError>,
) {
    let Some((code, reason)) = failed
        .client()
        .fatal_error()
        .or_else(|| error.and_then(fenced))
    else {
        return;
    };
    let mut guard = match slot.write() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    };
    if !std::ptr::eq(guard.1.client().native_ptr(), failed.client().native_ptr()) {
        return; // another publisher already replaced it
    }
    match make_producer(cfg) {
        Ok(p) => {
            tracing::warn!(?code, %reason, "kafka: the producer is unusable (fatal error or fenced); recreated it");
            metrics::counter!("bus_reconnects_total", "backend" => "kafka").increment(1);
            metrics::counter!("kafka_producers_replaced_total").increment(1);
            *guard = (guard.0 + 1, p);
        }
        Err(e) => tracing::warn!(error = %e, "kafka: cannot recreate the producer"),
    }
}

/// Whether a refused send may be logged now: at most one line a second, so
/// an outage does not flood the log (the metric counts every refusal).
fn refusal_log_due() -> bool {
    static LOG: std::sync::LazyLock<governor::DefaultDirectRateLimiter> =
        std::sync::LazyLock::new(|| {
            governor::RateLimiter::direct(governor::Quota::per_second(std::num::NonZeroU32::MIN))
        });
    LOG.check().is_ok()
}

/// How long a produce waits for room in librdkafka's local queue before it
/// is reported as failed.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(200);

/// Waits for the record's turn in its room ([`RoomOrder`]) and returns the
/// producer of the generation it was placed on. Replaced meanwhile: placed
/// again. Replaced after this returns: the record goes to the old producer,
/// which was replaced because it fails — and later records wait for its
/// retry, since it is registered on the old generation.
async fn place(ticket: &Ticket, slot: &ProducerSlot) -> FutureProducer {
    loop {
        let g = ticket.turn(|| current(slot).0).await;
        let (now, producer) = current(slot);
        if now == g {
            return producer;
        }
    }
}

/// Puts one record into librdkafka's queue for its partition (the order the
/// partition is written in) and returns its delivery report. A full local
/// queue is waited out for [`QUEUE_FULL_WAIT`].
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    msg: &Outgoing,
) -> Result<rdkafka::producer::DeliveryFuture, BusError> {
    let deadline = tokio::time::Instant::now() + QUEUE_FULL_WAIT;
    loop {
        let rec = FutureRecord::to(topic)
            .key(msg.room.as_str())
            .payload(&msg.payload[..]);
        match producer.send_result(rec) {
            Ok(d) => return Ok(d),
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                _,
            )) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(unavailable(e)),
        }
    }
}

/// Signals the first partition assignment of a consumer.
struct Ctx {
    assigned: AtomicBool,
    notify: Notify,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::debug!(partitions = tpl.count(), "kafka: partitions assigned");
            self.assigned.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
    }
}

type Cons = StreamConsumer<Ctx>;

struct KafkaAcker {
    consumer: Arc<Cons>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        // librdkafka's rd_kafka_offset_store stores offset + 1 (the next one
        // to read) itself.
        self.consumer
            .store_offset(&self.topic, self.partition, self.offset)
            .map_err(unavailable)
    }
    async fn nack(self: Box<Self>) -> Result<(), BusError> {
        // Not stored: re-read from the last committed offset after a restart
        // or rebalance.
        Ok(())
    }
}

fn consumer_for(cfg: &KafkaConfig, opts: &SubscribeOptions) -> Result<Arc<Cons>, BusError> {
    let shared = opts.kind == GroupKind::Shared;
    let c: Cons = base_config(cfg)
        .set("group.id", &opts.group)
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
        // Also the group's rebalance timeout: how long a rebalance waits for a
        // member that stopped polling. The default 5 min means a worker killed
        // mid-rebalance stalls its group that long (tansu waits it out even
        // for members whose session expired).
        .set(
            "max.poll.interval.ms",
            cfg.kafka_max_poll_interval_ms.to_string(),
        )
        .create_with_context(Ctx {
            assigned: AtomicBool::new(false),
            notify: Notify::new(),
        })
        .map_err(|e| BusError::Config(e.to_string()))?;
    if shared {
        c.subscribe(&[&cfg.kafka_topic]).map_err(unavailable)?;
    }
    Ok(Arc::new(c))
}

/// The offsets an instance (live) consumer has read, per partition. Kafka
/// numbers a partition's records one by one (this topic has no compaction
/// and no transactions), and an instance consumer is assigned every
/// partition once and never rebalanced, so each record it reads should be the
/// one after the last. A jump means records it never got — delivered to no
/// socket of this instance although the workers may have stored them — and
/// a step back means records it reads again. Both are logged and counted
/// (`kafka_live_offsets_skipped_total`, `kafka_live_offsets_reread_total`)
/// rather than hidden: the live path's loss on a broker must be visible.
/// A jump also bumps the subscription's resumption counter *before* the
/// record after the gap is handed on, so live delivery catches every local
/// room up from the position it had reached ([`Subscription::resumed`]):
/// the skipped records come from the DB, or the clients get a `gap`.
#[derive(Default)]
struct OffsetTrail {
    next: std::collections::HashMap<i32, i64>,
}

/// What one record's offset says about the records before it.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The next record (or the partition's first one read).
    InOrder,
    /// This many records were never read.
    Skipped(i64),
    /// This many records are read again.
    Again(i64),
}

impl OffsetTrail {
    /// A trail that expects each partition's first record at the offset the
    /// consumer was assigned, so a gap right at the start counts too.
    fn starting_at(assigned: &[(i32, i64)]) -> Self {
        OffsetTrail {
            next: assigned.iter().copied().collect(),
        }
    }

    fn step(&mut self, partition: i32, offset: i64) -> Step {
        match self.next.insert(partition, offset + 1) {
            Some(n) if offset > n => Step::Skipped(offset - n),
            Some(n) if offset < n => Step::Again(n - offset),
            _ => Step::InOrder,
        }
    }

    /// Logs and counts a jump or a step back; true on a jump.
    fn check(&mut self, partition: i32, offset: i64) -> bool {
        match self.step(partition, offset) {
            Step::InOrder => false,
            Step::Skipped(n) => {
                metrics::counter!("kafka_live_offsets_skipped_total").increment(n as u64);
                tracing::warn!(
                    partition,
                    from = offset - n,
                    to = offset - 1,
                    "kafka live consumer: offsets never read; catching the local rooms up from the DB"
                );
                true
            }
            Step::Again(n) => {
                metrics::counter!("kafka_live_offsets_reread_total").increment(n as u64);
                tracing::warn!(
                    partition,
                    offset,
                    n,
                    "kafka live consumer: offsets read again"
                );
                false
            }
        }
    }
}

/// Waits until a group consumer has its first partition assignment. Shared
/// groups read from their committed offset (or the earliest), so once
/// assigned nothing published afterwards can be skipped.
async fn wait_assigned(c: &Arc<Cons>, deadline: Duration) -> Result<(), BusError> {
    let wait = async {
        loop {
            let n = c.context().notify.notified();
            if c.context().assigned.load(Ordering::SeqCst) {
                break;
            }
            n.await;
        }
    };
    tokio::time::timeout(deadline, wait)
        .await
        .map_err(|_| unavailable("no partition assignment in time (is the broker up?)"))
}

/// Instance (live-delivery) consumers take every partition themselves at the
/// current end of the log, resolved to concrete offsets: a message published
/// after `subscribe` returns is at or past them, so it cannot be skipped (a
/// lazily resolved `latest` could land after it). An instance group never
/// competes, so it needs no group rebalance. Returns (partition, offset)
/// as assigned.
fn assign_at_end(c: &Cons, cfg: &KafkaConfig) -> Result<Vec<(i32, i64)>, BusError> {
    let t = Duration::from_secs(5);
    let md = c
        .fetch_metadata(Some(&cfg.kafka_topic), t)
        .map_err(unavailable)?;
    let mut tpl = TopicPartitionList::new();
    let mut at = Vec::new();
    for topic in md.topics() {
        for p in topic.partitions() {
            let (_, high) = c
                .fetch_watermarks(&cfg.kafka_topic, p.id(), t)
                .map_err(unavailable)?;
            tpl.add_partition_offset(&cfg.kafka_topic, p.id(), Offset::Offset(high))
                .map_err(unavailable)?;
            at.push((p.id(), high));
        }
    }
    if at.is_empty() {
        return Err(unavailable("topic has no partitions"));
    }
    c.assign(&tpl).map_err(unavailable)?;
    Ok(at)
}

#[async_trait]
impl MessageBus for KafkaBus {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            competing_consumers: true,
            redelivery: true,
            retains_for_absent_groups: true,
            replay: true,
            multi_process: true,
            selective_ack: false,
        }
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.submit(msg).await?.await
    }

    /// Enqueues the record in librdkafka's partition queue (the room's order:
    /// with idempotence its own retries keep it) and returns the delivery
    /// report, so the caller's room turn does not wait for `acks=all`. A
    /// failed delivery is produced again up to `KAFKA_PUBLISH_RETRIES` times,
    /// and the room's later sends wait for that retry ([`RoomOrder`]): after
    /// a producer replacement none of them overtakes an earlier one.
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let slot = self.producer.clone();
        let ticket = self.order.ticket(msg.room.as_str());
        let mut producer = place(&ticket, &slot).await;
        let topic = self.cfg.kafka_topic.clone();
        let mut delivery = enqueue(&producer, &topic, &msg).await?;
        let cfg = self.cfg.clone();
        Ok(Box::pin(async move {
            let mut attempt = 0;
            loop {
                let (err, kafka_err) = match delivery.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err((e, _))) => (e.to_string(), Some(e)),
                    Err(_) => ("the producer was dropped".to_string(), None),
                };
                ticket.failed();
                replace_if_dead(&slot, &cfg, &producer, kafka_err.as_ref());
                metrics::counter!("publish_retries_total", "backend" => "kafka").increment(1);
                if attempt >= cfg.kafka_publish_retries {
                    if refusal_log_due() {
                        tracing::warn!(error = %err, attempts = attempt + 1, "kafka: publish failed; the send is refused (logged at most once a second; every refusal is in publish_errors_total)");
                    }
                    return Err(unavailable(err));
                }
                attempt += 1;
                tracing::debug!(error = %err, attempt, "kafka publish failed, retrying");
                let backoff = Backoff {
                    first: Duration::from_millis(cfg.kafka_publish_backoff_ms),
                    max: Duration::from_millis(u64::from(cfg.kafka_message_timeout_ms)),
                };
                tokio::time::sleep(backoff.delay(attempt)).await;
                producer = place(&ticket, &slot).await;
                delivery = enqueue(&producer, &topic, &msg).await?;
            }
        }))
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let filter = Arc::new(LocalRooms::default());
        let interest: Arc<dyn RoomInterest> = match opts.scope {
            RoomScope::All => Arc::new(AllRooms),
            RoomScope::Dynamic => filter.clone(),
        };
        let dynamic = opts.scope == RoomScope::Dynamic;
        let n = if opts.kind == GroupKind::Shared {
            self.cfg.kafka_consumers.max(1)
        } else {
            1
        };
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        let (resumed_tx, resumed_rx) = tokio::sync::watch::channel(0u64);
        let mut consumers = Vec::new();
        for _ in 0..n {
            let c = consumer_for(&self.cfg, &opts)?;
            let assigned = if opts.kind == GroupKind::Instance {
                let (c2, cfg) = (c.clone(), self.cfg.clone());
                tokio::task::spawn_blocking(move || assign_at_end(&c2, &cfg))
                    .await
                    .map_err(unavailable)??
            } else {
                Vec::new()
            };
            consumers.push(c.clone());
            let (tx, stop, closed, filter, hidden, resumed) = (
                tx.clone(),
                stop.clone(),
                self.closed.clone(),
                filter.clone(),
                self.hidden.clone(),
                resumed_tx.clone(),
            );
            let shared = opts.kind == GroupKind::Shared;
            tokio::spawn(async move {
                let mut topic: Option<Arc<str>> = None;
                let mut trail = OffsetTrail::starting_at(&assigned);
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = closed.cancelled() => break,
                        m = c.recv() => m,
                    };
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            // librdkafka reconnects by itself; just don't spin.
                            tracing::warn!(error = %e, "kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    if !shared {
                        if take_hidden(&hidden) {
                            continue;
                        }
                        // Signalled before this record is sent on, so the
                        // catch-up starts from positions it has not moved.
                        if trail.check(m.partition(), m.offset()) {
                            resumed.send_modify(|n| *n += 1);
                        }
                    }
                    let room = m
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .and_then(RoomId::parse);
                    let t = topic.get_or_insert_with(|| Arc::from(m.topic())).clone();
                    let Some(room) = room else {
                        if shared {
                            let _ = c.store_offset(&t, m.partition(), m.offset());
                        }
                        continue;
                    };
                    if dynamic && !filter.contains(&room) {
                        continue;
                    }
                    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
                    let d = if shared {
                        Delivery::new(
                            room,
                            payload,
                            false,
                            Box::new(KafkaAcker {
                                consumer: c.clone(),
                                topic: t,
                                partition: m.partition(),
                                offset: m.offset(),
                            }),
                        )
                    } else {
                        Delivery::unacked(room, payload)
                    };
                    drop(m);
                    if tx.send(d).await.is_err() {
                        break;
                    }
                }
                if shared {
                    // Leave the group now; closing the consumer auto-commits
                    // the *stored* offsets (acked deliveries only).
                    c.unsubscribe();
                }
            });
        }
        for c in consumers.iter().filter(|_| opts.kind == GroupKind::Shared) {
            if let Err(e) = wait_assigned(c, Duration::from_secs(30)).await {
                stop.cancel();
                return Err(e);
            }
        }
        let sub = Subscription::new(rx, interest, Some(stop.drop_guard()));
        Ok(if opts.kind == GroupKind::Instance {
            sub.with_resumptions(resumed_rx)
        } else {
            sub
        })
    }

    async fn ready(&self) -> Result<(), BusError> {
        let producer = self.producer();
        let topic = self.cfg.kafka_topic.clone();
        // fetch_metadata blocks: keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_millis(1500))
                .map_err(unavailable)?;
            let ok = !md.brokers().is_empty()
                && md
                    .topics()
                    .iter()
                    .any(|t| t.error().is_none() && !t.partitions().is_empty());
            if ok {
                Ok(())
            } else {
                Err(unavailable("topic metadata unavailable"))
            }
        })
        .await
        .map_err(unavailable)?
    }

    async fn close(&self) {
        self.closed.cancel();
        let p = self.producer();
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
    }

    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        Some(self)
    }
}

#[async_trait]
impl ConsumerLag for KafkaBus {
    async fn lag(&self, group: &str) -> Option<i64> {
        let cfg = self.cfg.clone();
        let group = group.to_string();
        tokio::task::spawn_blocking(move || group_lag(&cfg, &group).ok())
            .await
            .ok()
            .flatten()
    }
}

pub(crate) fn plain_consumer(cfg: &KafkaConfig, group: &str) -> Result<BaseConsumer, BusError> {
    base_config(cfg)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| BusError::Config(e.to_string()))
}

/// Messages in the topic not yet committed by `group` (blocking).
fn group_lag(cfg: &KafkaConfig, group: &str) -> Result<i64, BusError> {
    let c = plain_consumer(cfg, group)?;
    let t = Duration::from_secs(2);
    let md = c
        .fetch_metadata(Some(&cfg.kafka_topic), t)
        .map_err(unavailable)?;
    let mut tpl = TopicPartitionList::new();
    for topic in md.topics() {
        for p in topic.partitions() {
            tpl.add_partition(&cfg.kafka_topic, p.id());
        }
    }
    let committed = c.committed_offsets(tpl, t).map_err(unavailable)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = c
            .fetch_watermarks(&cfg.kafka_topic, e.partition(), t)
            .map_err(unavailable)?;
        let pos = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - pos).max(0);
    }
    Ok(lag)
}

#[cfg(test)]
mod tests {
    use super::{OffsetTrail, Step};

    #[test]
    fn the_offset_trail_tells_skipped_and_reread_records_per_partition() {
        let mut t = OffsetTrail::default();
        // A partition's first record may be anywhere (assigned at the end).
        assert_eq!(t.step(0, 40), Step::InOrder);
        assert_eq!(t.step(0, 41), Step::InOrder);
        assert_eq!(t.step(1, 7), Step::InOrder);
        // 42 and 43 never came.
        assert_eq!(t.step(0, 44), Step::Skipped(2));
        assert_eq!(t.step(0, 45), Step::InOrder);
        // Partitions are tracked apart.
        assert_eq!(t.step(1, 8), Step::InOrder);
        // 44 and 45 again, then on from there.
        assert_eq!(t.step(0, 44), Step::Again(2));
        assert_eq!(t.step(0, 45), Step::InOrder);
        assert_eq!(t.step(0, 46), Step::InOrder);
    }

    #[test]
    fn a_trail_started_at_the_assigned_offsets_sees_a_gap_at_the_start() {
        let mut t = OffsetTrail::starting_at(&[(0, 40), (1, 7)]);
        assert_eq!(t.step(0, 40), Step::InOrder);
        assert_eq!(t.step(1, 9), Step::Skipped(2));
        // A partition not assigned at the start (the topic grew) starts anywhere.
        assert_eq!(t.step(2, 5), Step::InOrder);
    }
}
