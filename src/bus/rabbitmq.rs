//! `BUS=rabbitmq`: what RabbitMQ is for — routing, acknowledgements,
//! publisher confirms and priorities.
//!
//! * One durable **topic exchange** (`RABBITMQ_EXCHANGE`, default `chat`);
//!   routing key `room.chat.<name>` / `room.ai.<name>`.
//! * **Publisher confirms**: `publish` returns only after the broker confirmed
//!   the (persistent, delivery-mode 2) message, so the client's `ack` means the
//!   broker has it. `system` messages (joins, flood warnings) go out with the
//!   highest priority.
//! * **Live delivery**: one exclusive, auto-delete queue per instance, bound per
//!   room as the instance gains its first / loses its last local member — the
//!   broker does the routing; an instance never receives rooms it does not serve.
//!   Auto-ack: if the instance dies, its queue and its sockets die with it.
//! * **Workers** (`db-writer`, `analytics`): durable shared queues bound to
//!   `room.#`; members compete; manual acks after the side effect, `basic.qos`
//!   prefetch from `RABBITMQ_PREFETCH`. A committed batch is confirmed with
//!   one `basic.ack` with `multiple` when no delivery the worker still holds
//!   sits below it, else one ack per delivery ([`Delivery::ack_batch`]). An
//!   unacked delivery is redelivered when its channel closes (crash,
//!   subscription dropped) or it is nacked.
//! * Classic queues carry `x-max-priority` so a backlog drains system messages
//!   first. Quorum queues (`RABBITMQ_QUEUE_TYPE=quorum`) replicate and survive
//!   a node loss but ignore priorities: the trade-off is yours.
//!
//! What it does not give: replay (an acked message is gone), and order only
//! per queue with a single consumer (competing consumers interleave; a
//! redelivered message comes back out of order).
//!
//! Every subscription owns its connection and, when it drops, reconnects with
//! capped backoff and redeclares exchange, queue and bindings. The publisher
//! connection reconnects in the background; meanwhile `publish` fails at once
//! with `Unavailable` and `ready()` reports the outage.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::reconnect::{self, Backoff, SessionEnd};
use super::{
    Acker, BusError, Capabilities, Confirm, Delivery, GroupKind, MessageBus, Outgoing, Priority,
    RoomInterest, RoomScope, SubscribeOptions, Subscription,
};
use crate::protocol::{RoomId, RoomKind};

/// Queue type of the shared worker queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Single-node queues; support priorities.
    Classic,
    /// Raft-replicated queues; no priorities.
    Quorum,
}

/// Settings of the RabbitMQ bus.
#[derive(Debug, Clone, clap::Args)]
pub struct RabbitConfig {
    /// AMQP URL of the broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Name of the durable topic exchange.
    #[arg(long, env = "RABBITMQ_EXCHANGE", default_value = "chat")]
    pub rabbitmq_exchange: String,
    /// Prefix of queue names (keeps deployments and test runs apart).
    #[arg(long, env = "RABBITMQ_QUEUE_PREFIX", default_value = "chat-relay.")]
    pub rabbitmq_queue_prefix: String,
    /// Unacked deliveries a worker consumer may hold (basic.qos).
    #[arg(long, env = "RABBITMQ_PREFETCH", default_value_t = 512)]
    pub rabbitmq_prefetch: u16,
    /// Queue type of the shared worker queues: classic (priorities) or quorum (replicated).
    #[arg(
        long,
        env = "RABBITMQ_QUEUE_TYPE",
        value_enum,
        default_value = "classic"
    )]
    pub rabbitmq_queue_type: QueueType,
    /// `x-max-priority` of classic worker queues; system messages use it.
    #[arg(long, env = "RABBITMQ_MAX_PRIORITY", default_value_t = 10)]
    pub rabbitmq_max_priority: u8,
    /// Longest wait between reconnection attempts (ms).
    #[arg(long, env = "RABBITMQ_RECONNECT_MAX_MS", default_value_t = 5000)]
    pub rabbitmq_reconnect_max_ms: u64,
    /// How long to wait for a publisher confirm before answering `bus_unavailable` (ms).
    #[arg(long, env = "RABBITMQ_CONFIRM_TIMEOUT_MS", default_value_t = 5000)]
    pub rabbitmq_confirm_timeout_ms: u64,
}

crate::default_from_env!(RabbitConfig);

/// Routing key of a room.
pub fn routing_key(room: &RoomId) -> String {
    match room.kind() {
        RoomKind::Chat => format!("room.chat.{}", room.name()),
        RoomKind::Ai => format!("room.ai.{}", room.name()),
    }
}

/// Room of a routing key.
pub fn room_of(key: &str) -> Option<RoomId> {
    let rest = key.strip_prefix("room.")?;
    let (kind, name) = rest.split_once('.')?;
    RoomId::parse(&format!("{kind}.{name}"))
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("rabbitmq: {e}"))
}

async fn open(cfg: &RabbitConfig, name: &str) -> Result<Connection, BusError> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(format!("chat-relay {} {name}", cfg.rabbitmq_exchange).into());
    tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&cfg.amqp_url, props),
    )
    .await
    .map_err(|_| unavailable("connect timed out"))?
    .map_err(unavailable)
}

async fn declare_exchange(ch: &Channel, cfg: &RabbitConfig) -> Result<(), BusError> {
    ch.exchange_declare(
        &cfg.rabbitmq_exchange,
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(unavailable)
}

struct Publisher {
    channel: Option<Channel>,
    conn: Option<Connection>,
}

pub struct RabbitBus {
    cfg: RabbitConfig,
    publisher: Arc<Mutex<Publisher>>,
    broken: Arc<Notify>,
    closed: CancellationToken,
    /// Publisher reconnections so far: the outage window can be a few
    /// milliseconds when the broker itself stays up, too short to observe
    /// through `ready()`, so tests and operators count recoveries instead.
    reconnects: Arc<AtomicU64>,
    batch_acks: Arc<BatchAcks>,
}

/// The last handle gone, every background task of this bus (publisher
/// keeper, subscription reconnect loops) stops: none outlives its bus.
impl Drop for RabbitBus {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// Opens the publisher connection and channel (confirm mode).
async fn open_publisher(cfg: &RabbitConfig) -> Result<(Connection, Channel), BusError> {
    let conn = open(cfg, "publisher").await?;
    let ch = conn.create_channel().await.map_err(unavailable)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(unavailable)?;
    declare_exchange(&ch, cfg).await?;
    Ok((conn, ch))
}

impl RabbitBus {
    pub async fn connect(cfg: RabbitConfig) -> Result<RabbitBus, BusError> {
        let (conn, ch) = open_publisher(&cfg).await?;
        let broken = Arc::new(Notify::new());
        let on_err = broken.clone();
        conn.on_error(move |e| {
            tracing::warn!(error = %e, "rabbitmq: publisher connection error");
            on_err.notify_one();
        });
        let publisher = Arc::new(Mutex::new(Publisher {
            channel: Some(ch),
            conn: Some(conn),
        }));
        let bus = RabbitBus {
            cfg,
            publisher,
            broken,
            closed: CancellationToken::new(),
            reconnects: Arc::new(AtomicU64::new(0)),
            batch_acks: Arc::default(),
        };
        bus.spawn_publisher_keeper();
        Ok(bus)
    }

    /// How many times the publisher connection has been re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// How this bus's worker subscriptions acknowledged their batches
    /// ([`Delivery::ack_batch`]): tests prove with it that a contiguous batch
    /// costs one frame and a batch with a hole below it does not.
    pub fn batch_acks(&self) -> &BatchAcks {
        &self.batch_acks
    }

    /// Reconnects the publisher whenever it breaks.
    fn spawn_publisher_keeper(&self) {
        let (cfg, publisher, broken, closed, reconnects) = (
            self.cfg.clone(),
            self.publisher.clone(),
            self.broken.clone(),
            self.closed.clone(),
            self.reconnects.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = broken.notified() => {}
                    // Also poll: a silently dead connection shows in its status.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let p = publisher.lock().await;
                        if p.conn.as_ref().is_some_and(|c| c.status().connected()) {
                            continue;
                        }
                    }
                }
                publisher.lock().await.channel = None;
                let mut attempt = 0;
                loop {
                    if closed.is_cancelled() {
                        return;
                    }
                    match open_publisher(&cfg).await {
                        Ok((conn, ch)) => {
                            let on_err = broken.clone();
                            conn.on_error(move |e| {
                                tracing::warn!(error = %e, "rabbitmq: publisher connection error");
                                on_err.notify_one();
                            });
                            *publisher.lock().await = Publisher {
                                channel: Some(ch),
                                conn: Some(conn),
                            };
                            reconnects.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("bus_reconnects_total", "backend" => "rabbitmq")
                                .increment(1);
                            tracing::info!("rabbitmq: publisher reconnected");
                            break;
                        }
                        Err(e) => {
                            attempt += 1;
                            tracing::warn!(error = %e, "rabbitmq: publisher reconnect failed");
                            if !Backoff::capped_ms(cfg.rabbitmq_reconnect_max_ms)
                                .wait(attempt, &closed)
                                .await
                            {
                                return;
                            }
                        }
                    }
                }
            }
        });
    }

    fn worker_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match self.cfg.rabbitmq_queue_type {
            QueueType::Classic => {
                args.insert(
                    "x-max-priority".into(),
                    AMQPValue::LongInt(i32::from(self.cfg.rabbitmq_max_priority)),
                );
            }
            QueueType::Quorum => {
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
        }
        args
    }
}

/// Delivery tags of one consumer channel that were handed to the worker and
/// are not settled yet. A batch is confirmed with one `basic.ack multiple`
/// only when no other unsettled tag sits at or below its highest tag, so a
/// delivery the worker still holds is never acked by accident. The lock is
/// held while an ack or nack is sent: a `multiple` ack that overtook an
/// earlier ack of a tag it covers would make the broker close the channel
/// (`PRECONDITION_FAILED - unknown delivery tag`).
struct Unsettled {
    open: Mutex<BTreeSet<u64>>,
    counts: Arc<BatchAcks>,
}

/// How the bus's worker batches were acknowledged (see [`RabbitBus::batch_acks`]).
#[derive(Debug, Default)]
pub struct BatchAcks {
    /// Batches confirmed with one `basic.ack multiple`.
    pub multiple: AtomicU64,
    /// Batches acked one frame per delivery, because another unsettled
    /// delivery sat below the batch's highest tag.
    pub single: AtomicU64,
}

struct RabbitAcker {
    acker: lapin::acker::Acker,
    tag: u64,
    unsettled: Arc<Unsettled>,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        let mut open = self.unsettled.open.lock().await;
        let res = self.acker.ack(BasicAckOptions::default()).await;
        open.remove(&self.tag);
        res.map_err(unavailable)
    }
    async fn nack(self: Box<Self>) -> Result<(), BusError> {
        let mut open = self.unsettled.open.lock().await;
        let res = self
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
        open.remove(&self.tag);
        res.map_err(unavailable)
    }

    /// One `basic.ack multiple` per channel for the batch when the batch is
    /// every unsettled tag up to its highest; one ack each otherwise.
    async fn ack_batch(self: Box<Self>, rest: Vec<Box<dyn Acker>>) -> Result<(), BusError> {
        let mut first_err = None;
        let (mut ours, others) = super::own_ackers::<RabbitAcker>(rest);
        ours.push(*self);
        for a in others {
            if let Err(e) = a.ack().await {
                first_err.get_or_insert(e);
            }
        }
        // A reconnect mid-batch leaves ackers of two channels: settle each
        // channel's own.
        while !ours.is_empty() {
            let key = ours[0].unsettled.clone();
            let (same, next): (Vec<_>, Vec<_>) = ours
                .into_iter()
                .partition(|a| Arc::ptr_eq(&a.unsettled, &key));
            ours = next;
            if let Err(e) = ack_channel_batch(same).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Acks one channel's part of a batch (see [`Unsettled`]).
async fn ack_channel_batch(mut batch: Vec<RabbitAcker>) -> Result<(), BusError> {
    batch.sort_unstable_by_key(|a| a.tag);
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    let unsettled = last.unsettled.clone();
    let mut open = unsettled.open.lock().await;
    let highest = last.tag;
    // The batch is every unsettled tag up to its highest.
    let whole = open.range(..=highest).count() == batch.len() + 1
        && open.contains(&highest)
        && batch.iter().all(|a| open.contains(&a.tag));
    if whole {
        let res = last.acker.ack(BasicAckOptions { multiple: true }).await;
        // Everything up to `highest` is settled now (or, on error, the
        // channel is gone and every tag comes back).
        open.retain(|t| *t > highest);
        unsettled.counts.multiple.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("bus_batch_acks_total", "backend" => "rabbitmq", "mode" => "multiple")
            .increment(1);
        return res.map_err(unavailable);
    }
    batch.push(last);
    let mut first_err = None;
    for a in batch {
        let res = a.acker.ack(BasicAckOptions::default()).await;
        open.remove(&a.tag);
        if let Err(e) = res {
            first_err.get_or_insert(unavailable(e));
        }
    }
    unsettled.counts.single.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("bus_batch_acks_total", "backend" => "rabbitmq", "mode" => "single")
        .increment(1);
    first_err.map_or(Ok(()), Err)
}

/// The channel and queue name the rooms are currently bound on.
type BoundQueue = (Channel, String);

/// Rooms bound to an instance queue, and the channel/queue they are bound on
/// now. Locked while (re)binding after a reconnect so no `add_room` is lost.
struct Interest {
    scope: RoomScope,
    exchange: String,
    state: Mutex<(HashSet<RoomId>, Option<BoundQueue>)>,
}

#[async_trait]
impl RoomInterest for Interest {
    async fn add_room(&self, room: &RoomId) -> Result<(), BusError> {
        if self.scope == RoomScope::All {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        st.0.insert(room.clone());
        let Some((ch, queue)) = st.1.as_ref() else {
            return Err(unavailable("not connected; the room is bound on reconnect"));
        };
        ch.queue_bind(
            queue,
            &self.exchange,
            &routing_key(room),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)
    }

    async fn remove_room(&self, room: &RoomId) -> Result<(), BusError> {
        if self.scope == RoomScope::All {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        st.0.remove(room);
        if let Some((ch, queue)) = st.1.as_ref() {
            ch.queue_unbind(
                queue,
                &self.exchange,
                &routing_key(room),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// Connects, declares the topology of one subscription and starts consuming.
async fn start_consumer(
    cfg: &RabbitConfig,
    opts: &SubscribeOptions,
    worker_args: &FieldTable,
    interest: &Interest,
) -> Result<(Connection, Channel, lapin::Consumer), BusError> {
    let conn = open(cfg, &opts.group).await?;
    let ch = conn.create_channel().await.map_err(unavailable)?;
    declare_exchange(&ch, cfg).await?;
    let mut st = interest.state.lock().await;
    let (queue, no_ack) = match opts.kind {
        GroupKind::Shared => {
            let name = format!("{}{}", cfg.rabbitmq_queue_prefix, opts.group);
            ch.queue_declare(
                &name,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                worker_args.clone(),
            )
            .await
            .map_err(unavailable)?;
            ch.queue_bind(
                &name,
                &cfg.rabbitmq_exchange,
                "room.#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
            ch.basic_qos(cfg.rabbitmq_prefetch, BasicQosOptions::default())
                .await
                .map_err(unavailable)?;
            (name, false)
        }
        GroupKind::Instance => {
            let name = format!("{}live.{}", cfg.rabbitmq_queue_prefix, opts.group);
            ch.queue_declare(
                &name,
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
            let keys: Vec<String> = match opts.scope {
                RoomScope::All => vec!["room.#".to_string()],
                RoomScope::Dynamic => st.0.iter().map(routing_key).collect(),
            };
            for k in keys {
                ch.queue_bind(
                    &name,
                    &cfg.rabbitmq_exchange,
                    &k,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            }
            (name, true)
        }
    };
    let consumer = ch
        .basic_consume(
            &queue,
            "",
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    st.1 = Some((ch.clone(), queue));
    Ok((conn, ch, consumer))
}

#[async_trait]
impl MessageBus for RabbitBus {
    fn backend(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            competing_consumers: true,
            redelivery: true,
            retains_for_absent_groups: true,
            replay: false,
            multi_process: true,
            selective_ack: true,
        }
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.submit(msg).await?.await
    }

    /// Writes the message on the one publisher channel (AMQP keeps a
    /// channel's order) and returns the pending publisher confirm, so the
    /// caller's room turn does not wait out the broker's disk sync.
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let ch = self
            .publisher
            .lock()
            .await
            .channel
            .clone()
            .ok_or_else(|| unavailable("not connected (reconnecting)"))?;
        let priority = match msg.priority {
            Priority::System => self.cfg.rabbitmq_max_priority,
            Priority::Normal => 0,
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(priority)
            .with_content_type("application/json".into());
        let timeout = Duration::from_millis(self.cfg.rabbitmq_confirm_timeout_ms);
        let broken = self.broken.clone();
        let pending = match tokio::time::timeout(
            timeout,
            ch.basic_publish(
                &self.cfg.rabbitmq_exchange,
                &routing_key(&msg.room),
                BasicPublishOptions::default(),
                &msg.payload,
                props,
            ),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                broken.notify_one();
                return Err(unavailable(e));
            }
            Err(_) => return Err(BusError::Timeout("rabbitmq: publish timed out".into())),
        };
        Ok(Box::pin(async move {
            match tokio::time::timeout(timeout, pending).await {
                Ok(Ok(Confirmation::Ack(_))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
                Ok(Ok(Confirmation::Nack(_))) => Err(BusError::Rejected(
                    "rabbitmq: the broker nacked the message".into(),
                )),
                Ok(Err(e)) => {
                    broken.notify_one();
                    Err(unavailable(e))
                }
                Err(_) => Err(BusError::Timeout(
                    "rabbitmq: no publisher confirm in time".into(),
                )),
            }
        }))
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let interest = Arc::new(Interest {
            scope: opts.scope,
            exchange: self.cfg.rabbitmq_exchange.clone(),
            state: Mutex::new((HashSet::new(), None)),
        });
        let (tx, rx) = mpsc::channel(256);
        // A child of `closed`: closing the bus stops every subscription.
        let stop = self.closed.child_token();
        let args = self.worker_queue_args();
        let (cfg, connect_interest, pump_interest, pump_stop) = (
            self.cfg.clone(),
            interest.clone(),
            interest.clone(),
            stop.clone(),
        );
        let batch_acks = self.batch_acks.clone();
        let (connect_opts, group, shared) = (
            opts.clone(),
            opts.group.clone(),
            opts.kind == GroupKind::Shared,
        );
        let resumed = reconnect::spawn_session(
            "rabbitmq",
            format!("consumer {group}"),
            Backoff::capped_ms(self.cfg.rabbitmq_reconnect_max_ms),
            stop.clone(),
            Duration::from_secs(10),
            move || {
                let (cfg, opts, args, interest) = (
                    cfg.clone(),
                    connect_opts.clone(),
                    args.clone(),
                    connect_interest.clone(),
                );
                async move { start_consumer(&cfg, &opts, &args, &interest).await }
            },
            move |(conn, ch, mut consumer)| {
                let (tx, interest, stop, opts, counts) = (
                    tx.clone(),
                    pump_interest.clone(),
                    pump_stop.clone(),
                    opts.clone(),
                    batch_acks.clone(),
                );
                async move {
                    // Tags are per channel: a new session starts a new set.
                    let unsettled = Arc::new(Unsettled {
                        open: Mutex::default(),
                        counts: counts.clone(),
                    });
                    let end = loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => break SessionEnd::Stopped,
                            n = consumer.next() => n,
                        };
                        let d = match next {
                            Some(Ok(d)) => d,
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, group = %opts.group, "rabbitmq: consumer error");
                                break SessionEnd::Lost;
                            }
                            None => break SessionEnd::Lost,
                        };
                        let Some(room) = room_of(d.routing_key.as_str()) else {
                            // Not ours: drop it from the queue.
                            if opts.kind == GroupKind::Shared {
                                let _ = d.acker.ack(BasicAckOptions::default()).await;
                            }
                            continue;
                        };
                        let payload = Bytes::from(d.data);
                        let delivery = if opts.kind == GroupKind::Shared {
                            unsettled.open.lock().await.insert(d.delivery_tag);
                            Delivery::new(
                                room,
                                payload,
                                d.redelivered,
                                Box::new(RabbitAcker {
                                    acker: d.acker,
                                    tag: d.delivery_tag,
                                    unsettled: unsettled.clone(),
                                }),
                            )
                        } else {
                            Delivery::unacked(room, payload)
                        };
                        if tx.send(delivery).await.is_err() {
                            break SessionEnd::Stopped;
                        }
                    };
                    interest.state.lock().await.1 = None;
                    // Closing the channel hands every unacked delivery back to the queue.
                    let _ = ch.close(200, "bye").await;
                    let _ = conn.close(200, "bye").await;
                    end
                }
            },
        )
        .await?;
        let sub =
            Subscription::new(rx, interest, Some(stop.drop_guard())).with_resumptions(resumed);
        // Manual acks and basic.qos only on the shared worker queues.
        Ok(if shared {
            sub.with_unacked_limit(usize::from(self.cfg.rabbitmq_prefetch))
        } else {
            sub
        })
    }

    async fn ready(&self) -> Result<(), BusError> {
        let p = self.publisher.lock().await;
        match (&p.conn, &p.channel) {
            (Some(c), Some(ch)) if c.status().connected() && ch.status().connected() => Ok(()),
            _ => Err(unavailable("not connected")),
        }
    }

    async fn close(&self) {
        self.closed.cancel();
        let p = self.publisher.lock().await;
        if let Some(c) = &p.conn {
            let _ = c.close(200, "bye").await;
        }
    }
}
