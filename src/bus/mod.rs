//! The message bus: one trait, used as `Arc<dyn MessageBus>`, and one module per
//! backend. Every backend runs the same conformance suite (`tests/common/conformance.rs`).
//!
//! # Model
//! * A message is published **for a room**; the room id is the key, so one room's
//!   messages keep their order wherever the backend can promise it.
//! * Consumers subscribe as a named **consumer group**. Two subscriptions with the
//!   same group name *compete* (each message goes to one of them) and different
//!   groups *each* get every message — where the backend has groups at all (Redis
//!   Pub/Sub has none: see [`Capabilities`]).
//! * A [`Delivery`] carries an ack. Acknowledge only after the side effect (the DB
//!   commit) has happened. Dropping a delivery without acking it is a *nack*: the
//!   backends that can redeliver will (memory, RabbitMQ, NATS); Kafka re-reads from the
//!   last committed offset after a restart or rebalance; Redis Streams hands
//!   it to another group member once it has been pending long enough; Redis
//!   Pub/Sub loses it.
//!
//! # Guarantees per backend
//! | backend | publish returns when | delivery | redelivery | order per room | kept while no consumer |
//! |---|---|---|---|---|---|
//! | memory | enqueued for every existing group | at-least-once in-process | on nack/drop, to the group | per consumer | yes, bounded, lost on exit |
//! | redis | Redis accepted PUBLISH | at-most-once | never | per connection | **no** (lost) |
//! | kafka | broker acked (acks=all) | at-least-once | from last committed offset | per partition (room key) | yes (retention) |
//! | rabbitmq | broker confirmed | at-least-once | on nack / channel loss | per queue, single consumer | yes (durable queues) |
//! | nats | JetStream ack (stored) | workers at-least-once; live at-most-once (core subscriptions) | on nack / drop at once, after `ack_wait` when a worker died | per consumer (stream order), live per publisher connection | yes (stream retention, durable consumers) |
//! | redis-streams | Redis appended the entry in memory (XADD; durable only as far as the server's AOF fsync) | at-least-once | unacked entries claimed after an idle time (XAUTOCLAIM) | per shard stream (room hash), per consumer | yes (until trimmed by MAXLEN/MINID) |

pub mod kafka;
pub mod memory;
pub mod nats;
pub mod rabbitmq;
pub mod reconnect;
pub mod redis;
pub mod redis_streams;
pub mod room_order;

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;

use crate::protocol::RoomId;

/// Errors a bus operation can report. Each is mapped to a client-facing
/// `bus_unavailable` error frame by the gateway.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker cannot be reached right now (connection lost, reconnecting).
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus did not accept the message in time (full queue, broker slow).
    #[error("bus timed out: {0}")]
    Timeout(String),
    /// The broker rejected the operation.
    #[error("bus rejected the operation: {0}")]
    Rejected(String),
    /// Configuration or set-up problem (bad URL, missing topic that could not be created…).
    #[error("bus configuration error: {0}")]
    Config(String),
    /// The bus was shut down.
    #[error("bus closed")]
    Closed,
}

/// What kind of consumer group a subscription joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// A group owned by one server instance (live delivery). Starts at the
    /// latest message; nothing is kept for it while it is away.
    Instance,
    /// A group shared by every instance running the role (`db-writer`,
    /// `analytics`). Starts at the earliest message the backend still has and,
    /// where the backend can, keeps messages while no member listens.
    Shared,
}

/// Which rooms a subscription receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomScope {
    /// Every room (workers).
    All,
    /// Only rooms added with [`RoomInterest::add_room`] (live delivery: an
    /// instance only needs the rooms that have local sockets). Backends that
    /// cannot filter at the broker (Kafka) filter locally.
    Dynamic,
}

/// Subscription parameters.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub group: String,
    pub kind: GroupKind,
    pub scope: RoomScope,
}

impl SubscribeOptions {
    pub fn shared(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: group.into(),
            kind: GroupKind::Shared,
            scope: RoomScope::All,
        }
    }
    pub fn instance(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: group.into(),
            kind: GroupKind::Instance,
            scope: RoomScope::Dynamic,
        }
    }
}

/// Priority of a published message. RabbitMQ delivers `System` first from a
/// backlog; the other backends keep publish order and ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Normal,
    System,
}

/// One message to publish: the room (key) and the JSON payload, which is the
/// server→client frame itself (see `protocol::BusEvent`).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub room: RoomId,
    pub payload: Bytes,
    pub priority: Priority,
}

/// What a backend can and cannot do; the conformance suite asserts the
/// documented behaviour either way, and `/api/stats` shows it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Capabilities {
    /// Subscriptions in one group share the messages (else each gets all).
    pub competing_consumers: bool,
    /// An unacked delivery comes back (to this or another group member).
    pub redelivery: bool,
    /// Messages published while a shared group has no live member are kept for it.
    pub retains_for_absent_groups: bool,
    /// A group's position can be rewound to re-read old messages.
    pub replay: bool,
    /// More than one process can share the bus.
    pub multi_process: bool,
    /// An ack settles just that delivery; an earlier one left unacked still
    /// comes back. `false` where an ack moves a position instead (Kafka's
    /// committed offset settles every earlier offset of the partition) or
    /// where there is nothing to settle (Redis Pub/Sub).
    pub selective_ack: bool,
}

/// The backend's answer to one [`MessageBus::submit`]: `Ok` once the message
/// was accepted (see the module table for what that means per backend).
pub type Confirm = futures::future::BoxFuture<'static, Result<(), BusError>>;

/// Acknowledgement handle of one delivery, implemented per backend.
///
/// `Any` lets a backend that acknowledges many deliveries in one operation
/// recognise its own ackers in [`Acker::ack_batch`].
#[async_trait]
pub trait Acker: Any + Send + Sync {
    /// Confirms the delivery was handled; it will not come back.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Gives the delivery back (redelivered where the backend can).
    async fn nack(self: Box<Self>) -> Result<(), BusError>;
    /// Optional capability: confirms this delivery and `rest` — the other
    /// handled deliveries of one batch from the same subscription — in as few
    /// broker operations as the backend allows (RabbitMQ: one `basic.ack` with
    /// `multiple`). Settles exactly these deliveries, never another one. The
    /// default acks one by one. Returns the first error; every delivery is
    /// still tried.
    async fn ack_batch(self: Box<Self>, rest: Vec<Box<dyn Acker>>) -> Result<(), BusError> {
        let mut first_err = self.ack().await.err();
        for a in rest {
            if let Err(e) = a.ack().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// For [`Acker::ack_batch`] implementations: splits `rest` into the
/// backend's own ackers (`T`) and any others, which the caller acks one by
/// one (a batch from one subscription never mixes backends).
pub(crate) fn own_ackers<T: Acker>(rest: Vec<Box<dyn Acker>>) -> (Vec<T>, Vec<Box<dyn Acker>>) {
    let (mut own, mut others) = (Vec::new(), Vec::new());
    for a in rest {
        let any: &dyn Any = &*a;
        if any.is::<T>() {
            let any: Box<dyn Any + Send> = a;
            if let Ok(t) = any.downcast::<T>() {
                own.push(*t);
            }
        } else {
            others.push(a);
        }
    }
    (own, others)
}

/// One message received from the bus.
pub struct Delivery {
    pub room: RoomId,
    pub payload: Bytes,
    /// The backend knows this message was delivered before (RabbitMQ's
    /// `redelivered` flag, memory's requeue, a JetStream delivery count
    /// above 1, a Redis Streams entry taken over with XAUTOCLAIM); Kafka and
    /// Redis Pub/Sub cannot tell.
    pub redelivered: bool,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    pub fn new(room: RoomId, payload: Bytes, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Delivery {
            room,
            payload,
            redelivered,
            acker: Some(acker),
        }
    }

    /// A delivery that needs no acknowledgement (Redis Pub/Sub).
    pub fn unacked(room: RoomId, payload: Bytes) -> Self {
        Delivery {
            room,
            payload,
            redelivered: false,
            acker: None,
        }
    }

    pub async fn ack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }

    pub async fn nack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.nack().await,
            None => Ok(()),
        }
    }

    /// Acknowledges a handled batch of deliveries from one subscription, in as
    /// few broker operations as the backend allows ([`Acker::ack_batch`]): a
    /// worker that acked its 512 deliveries one `await` at a time paid a
    /// round trip through the client's I/O task for each. Returns the first
    /// error; every delivery is still tried.
    pub async fn ack_batch(batch: Vec<Delivery>) -> Result<(), BusError> {
        let mut ackers = batch.into_iter().filter_map(|mut d| d.acker.take());
        match ackers.next() {
            Some(first) => first.ack_batch(ackers.collect()).await,
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("room", &self.room)
            .field("bytes", &self.payload.len())
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

/// Changes which rooms a [`RoomScope::Dynamic`] subscription receives.
#[async_trait]
pub trait RoomInterest: Send + Sync {
    /// Starts receiving `room` (SUBSCRIBE on Redis, a queue binding on RabbitMQ).
    async fn add_room(&self, room: &RoomId) -> Result<(), BusError>;
    /// Stops receiving `room`.
    async fn remove_room(&self, room: &RoomId) -> Result<(), BusError>;
}

/// A live subscription: a bounded stream of deliveries plus, for dynamic
/// subscriptions, the handle that changes its rooms. Dropping it stops the
/// consumer (unacked deliveries are given back where the backend can).
pub struct Subscription {
    deliveries: Source,
    pub interest: Arc<dyn RoomInterest>,
    /// Counts the times the backend re-established this subscription under
    /// the hood (a new connection, a re-declared queue) or found records it
    /// never got (Kafka: a jump in a partition's offsets). For a subscription
    /// that keeps nothing while it is away (an instance group), each change
    /// means messages may have been missed in between. A backend bumps it
    /// before it hands on the first delivery after the miss.
    pub resumed: Option<tokio::sync::watch::Receiver<u64>>,
    /// How many deliveries the backend hands this member before it acks
    /// some (RabbitMQ's prefetch, NATS's max ack pending); `None`: no such
    /// limit. A worker's batch never waits for more than this.
    pub unacked_limit: Option<usize>,
    _stop: Option<Box<dyn Send + Sync>>,
}

/// Where a subscription's deliveries come from: the channel a backend's
/// consumer task fills, or (memory) the consumer group's own queue, read
/// directly so that a message costs no hop through a forwarding task.
enum Source {
    Task(mpsc::Receiver<Delivery>),
    Queue {
        rx: flume::Receiver<Delivery>,
        closed: tokio_util::sync::CancellationToken,
    },
}

/// What [`Subscription::try_next`] found.
pub enum TryNext {
    Ready(Delivery),
    /// Nothing queued right now.
    Empty,
    /// The subscription ended.
    Closed,
}

impl Subscription {
    pub fn new(
        deliveries: mpsc::Receiver<Delivery>,
        interest: Arc<dyn RoomInterest>,
        stop: Option<DropGuard>,
    ) -> Self {
        Subscription {
            deliveries: Source::Task(deliveries),
            interest,
            resumed: None,
            unacked_limit: None,
            _stop: stop.map(|g| Box::new(g) as Box<dyn Send + Sync>),
        }
    }

    /// A subscription that reads a consumer group's queue itself (competing
    /// with the group's other members); it ends when `closed` is cancelled.
    /// `guard` is dropped with the subscription.
    pub(crate) fn from_queue(
        rx: flume::Receiver<Delivery>,
        closed: tokio_util::sync::CancellationToken,
        interest: Arc<dyn RoomInterest>,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        Subscription {
            deliveries: Source::Queue { rx, closed },
            interest,
            resumed: None,
            unacked_limit: None,
            _stop: Some(guard),
        }
    }

    /// Declares the backend's limit on unacked deliveries (see
    /// [`Subscription::unacked_limit`]).
    pub fn with_unacked_limit(mut self, limit: usize) -> Self {
        self.unacked_limit = Some(limit);
        self
    }

    /// Attaches the backend's resumption counter (see [`Subscription::resumed`]).
    pub fn with_resumptions(mut self, resumed: tokio::sync::watch::Receiver<u64>) -> Self {
        self.resumed = Some(resumed);
        self
    }

    /// Next delivery; `None` once the subscription or the bus is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        match &mut self.deliveries {
            Source::Task(rx) => rx.recv().await,
            Source::Queue { rx, closed } => {
                if closed.is_cancelled() {
                    return None;
                }
                // flume is not part of Tokio's cooperative budget (a Tokio
                // channel is): without this a member with a backlog would
                // take all of it before a competing member in the same task
                // or on the same thread got a turn.
                tokio::task::coop::consume_budget().await;
                tokio::select! {
                    biased;
                    r = rx.recv_async() => r.ok(),
                    _ = closed.cancelled() => None,
                }
            }
        }
    }

    /// Whether the deliveries wait in the consumer group's own queue
    /// (memory), which holds the group's whole backlog, rather than in a
    /// small channel a backend's task fills and then stops reading the
    /// broker. Only then may a worker sleep out its batch wait and take what
    /// queued meanwhile: with a channel, the batch would be capped at the
    /// channel's size per wait.
    pub fn queue_holds_backlog(&self) -> bool {
        matches!(self.deliveries, Source::Queue { .. })
    }

    /// The next delivery if one is already queued, without waiting.
    pub fn try_next(&mut self) -> TryNext {
        match &mut self.deliveries {
            Source::Task(rx) => match rx.try_recv() {
                Ok(d) => TryNext::Ready(d),
                Err(mpsc::error::TryRecvError::Empty) => TryNext::Empty,
                Err(mpsc::error::TryRecvError::Disconnected) => TryNext::Closed,
            },
            Source::Queue { rx, closed } => {
                if closed.is_cancelled() {
                    return TryNext::Closed;
                }
                match rx.try_recv() {
                    Ok(d) => TryNext::Ready(d),
                    Err(flume::TryRecvError::Empty) => TryNext::Empty,
                    Err(flume::TryRecvError::Disconnected) => TryNext::Closed,
                }
            }
        }
    }
}

/// A [`RoomInterest`] for scopes that take every room: does nothing.
pub struct AllRooms;

#[async_trait]
impl RoomInterest for AllRooms {
    async fn add_room(&self, _room: &RoomId) -> Result<(), BusError> {
        Ok(())
    }
    async fn remove_room(&self, _room: &RoomId) -> Result<(), BusError> {
        Ok(())
    }
}

/// A local room filter, for backends that cannot filter at the broker.
#[derive(Default)]
pub struct LocalRooms(std::sync::RwLock<HashSet<RoomId>>);

impl LocalRooms {
    pub fn contains(&self, room: &RoomId) -> bool {
        self.0.read().map(|s| s.contains(room)).unwrap_or(false)
    }
}

#[async_trait]
impl RoomInterest for LocalRooms {
    async fn add_room(&self, room: &RoomId) -> Result<(), BusError> {
        if let Ok(mut s) = self.0.write() {
            s.insert(room.clone());
        }
        Ok(())
    }
    async fn remove_room(&self, room: &RoomId) -> Result<(), BusError> {
        if let Ok(mut s) = self.0.write() {
            s.remove(room);
        }
        Ok(())
    }
}

/// The bus every role talks to.
#[async_trait]
pub trait MessageBus: Send + Sync + 'static {
    /// Short backend name: `memory`, `redis`, `kafka`, `rabbitmq`, `nats`, `redis-streams`.
    fn backend(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Publishes one message for `msg.room`. Returns once the backend has
    /// accepted it (see the module table for what "accepted" means per backend);
    /// only then does the gateway send the client its `ack`.
    ///
    /// Order: two publishes for the same room from one caller, the second
    /// started after the first returned, are delivered in that order to each
    /// consumer that gets both.
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError>;

    /// Hands `msg` to the backend and returns as soon as its place in the
    /// room's order is fixed; the returned [`Confirm`] resolves when the
    /// backend accepted it (what [`MessageBus::publish`] waits for).
    ///
    /// Order: two submits for the same room from one caller, the second
    /// started after the first *returned*, are delivered in that order — so a
    /// caller that orders a room's sends with a lock can release it before
    /// the broker answers, and one room's sends are pipelined instead of
    /// paying one broker round trip (a publisher confirm, an `acks=all`
    /// produce) each. Backends whose client writes to one ordered connection
    /// (RabbitMQ's channel, librdkafka's partition queue) override it; the
    /// default publishes and returns a confirmation that is already settled.
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        self.publish(msg).await?;
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    /// Joins consumer group `opts.group`. See [`GroupKind`] for where the
    /// subscription starts reading and [`Capabilities`] for whether group
    /// members compete.
    ///
    /// Returns only once the subscription is live: a message published after
    /// `subscribe` returned (and, for dynamic scopes, after `add_room` returned)
    /// reaches it. Backends with a join protocol (Kafka's group rebalance)
    /// wait for their assignment before returning.
    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError>;

    /// Whether the broker is reachable right now (drives `/readyz`).
    async fn ready(&self) -> Result<(), BusError>;

    /// Flushes what is buffered and releases connections (best effort).
    async fn close(&self) {}

    /// Optional capability: leases, for backends whose groups do not
    /// compete (Redis Pub/Sub), so one instance runs a shared role at a time.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// Optional capability: consumer lag per group, for `/metrics`.
    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        None
    }
}

/// A lease on the bus: only its holder runs a shared role (analytics on a bus
/// whose groups do not compete). Backends with real consumer groups do not
/// offer it — the group already splits the work.
#[async_trait]
pub trait Leases: Send + Sync {
    /// `true` while `holder` holds `name`; call again before `ttl` runs out to
    /// keep it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, BusError>;
}

/// How far a consumer group is behind the end of the log.
#[async_trait]
pub trait ConsumerLag: Send + Sync {
    /// Messages not yet consumed by `group`, where the backend can tell: not
    /// yet handed to a member, or handed out and not acked (a member that
    /// dies holding them has not consumed them). The conformance suite
    /// checks both halves on every backend that reports lag.
    async fn lag(&self, group: &str) -> Option<i64>;

    /// Of those, the messages not yet handed to any member, where the
    /// backend tells the two apart (Kafka does not: a group's position is
    /// its committed offset). Tests use it to see a worker take deliveries
    /// it has not acked.
    async fn undelivered(&self, _group: &str) -> Option<i64> {
        None
    }
}

/// Which backend to run, from `BUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    Memory,
    Redis,
    Kafka,
    Rabbitmq,
    Nats,
    #[value(name = "redis-streams")]
    #[serde(rename = "redis-streams")]
    RedisStreams,
}

/// Bus selection and per-backend settings (flattened into the server's
/// configuration).
#[derive(Debug, Clone, clap::Args)]
pub struct BusConfig {
    /// Message bus backend.
    #[arg(long, env = "BUS", value_enum, default_value = "memory")]
    pub bus: BusKind,
    #[command(flatten)]
    pub memory: memory::MemoryConfig,
    #[command(flatten)]
    pub redis: redis::RedisConfig,
    #[command(flatten)]
    pub kafka: kafka::KafkaConfig,
    #[command(flatten)]
    pub rabbitmq: rabbitmq::RabbitConfig,
    #[command(flatten)]
    pub nats: nats::NatsConfig,
    #[command(flatten)]
    pub redis_streams: redis_streams::RedisStreamsConfig,
}

/// Connects the configured backend.
pub async fn connect(cfg: &BusConfig) -> Result<Arc<dyn MessageBus>, BusError> {
    Ok(match cfg.bus {
        BusKind::Memory => Arc::new(memory::MemoryBus::new(cfg.memory.clone())),
        BusKind::Redis => Arc::new(redis::RedisBus::connect(cfg.redis.clone()).await?),
        BusKind::Kafka => Arc::new(kafka::KafkaBus::connect(cfg.kafka.clone()).await?),
        BusKind::Rabbitmq => Arc::new(rabbitmq::RabbitBus::connect(cfg.rabbitmq.clone()).await?),
        BusKind::Nats => Arc::new(nats::NatsBus::connect(cfg.nats.clone()).await?),
        BusKind::RedisStreams => Arc::new(
            redis_streams::RedisStreamsBus::connect(cfg.redis.clone(), cfg.redis_streams.clone())
                .await?,
        ),
    })
}
