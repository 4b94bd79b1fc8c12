//! `BUS=nats`: NATS JetStream (async-nats).
//!
//! * One **stream** (`NATS_STREAM`, default `chat`) over the subjects
//!   `<NATS_SUBJECT_PREFIX>.>`; a room is the subject
//!   `<prefix>.chat.<name>` / `<prefix>.ai.<name>`. File storage, retention
//!   `NATS_MAX_AGE_MS`, `NATS_REPLICAS` replicas (set when the stream is created).
//! * **Publishing waits for the JetStream ack**: the server answers only once
//!   the message is stored in the stream, so the client's `ack` means stored.
//!   Chat messages carry `Nats-Msg-Id: <room>/<message id>`, so a message
//!   published again (a retry after a lost ack) is stored once within
//!   `NATS_DUPLICATE_WINDOW_MS`. `submit` returns once the message is written
//!   on the connection, with the ack still to come. Presence events carry none: two identical
//!   "joined" events are two events.
//! * **Workers** (`db-writer`, `analytics`): one **durable pull consumer**
//!   per group (`<NATS_CONSUMER_PREFIX><group>`), explicit acks (sent after
//!   the DB commit), `NATS_ACK_WAIT_MS`, `NATS_MAX_DELIVER`,
//!   `NATS_MAX_ACK_PENDING`. Every member of a group pulls from the same
//!   consumer, so members compete. A new group starts at the first message the
//!   stream still has (`DeliverPolicy::All`), and the consumer keeps its
//!   position while no member pulls. A delivery dropped without an ack is
//!   nacked at once (redelivered now, flagged `redelivered`); one held by a
//!   process that died comes back after `NATS_ACK_WAIT_MS`.
//! * **Live delivery**: **core NATS subscriptions**, one per room with local
//!   sockets, on the stream's own subjects. Why not a JetStream consumer per
//!   instance: the server here (2.9) has no multi-subject filters, so one
//!   instance would need one consumer (server-side state, an API round trip
//!   to create and one to delete) per room, or one consumer over every room
//!   and local filtering (Kafka's cost). A core subscription is a line in the
//!   server's routing table, costs nothing while idle and goes away with the
//!   connection. The price is the one every backend's instance group pays:
//!   nothing is kept while the instance is away (at-most-once). The client
//!   re-subscribes by itself after a reconnect and the subscription's
//!   resumption counter goes up, so the gateway catches up from the DB.
//!   Order per room holds for one publisher connection (core NATS keeps a
//!   connection's order); the gateway's per-room order is taken before it
//!   publishes, as for every backend.
//!
//! The connection reconnects by itself (capped backoff); while it is down
//! `publish` answers `Unavailable` at once (the client would otherwise buffer
//! the message and let it time out) and `ready()` reports the outage.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::reconnect::{self, Backoff, SessionEnd};
use super::{
    Acker, BusError, Capabilities, Confirm, ConsumerLag, Delivery, GroupKind, MessageBus, Outgoing,
    RoomInterest, RoomScope, SubscribeOptions, Subscription,
};
use crate::protocol::{RoomId, RoomKind};

/// Settings of the NATS JetStream bus.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfig {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream holding every room's messages.
    #[arg(long, env = "NATS_STREAM", default_value = "chat")]
    pub nats_stream: String,
    /// Subject prefix: a room is `<prefix>.chat.<name>` / `<prefix>.ai.<name>`;
    /// the stream takes `<prefix>.>`.
    #[arg(long, env = "NATS_SUBJECT_PREFIX", default_value = "chat.room")]
    pub nats_subject_prefix: String,
    /// Prefix of the durable consumer names (one per shared group).
    #[arg(long, env = "NATS_CONSUMER_PREFIX", default_value = "chat-relay-")]
    pub nats_consumer_prefix: String,
    /// Stream replicas when the stream is created (3 on a cluster).
    #[arg(long, env = "NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
    /// Stream retention (ms) when created: how far back a new group or a replay reaches.
    #[arg(long, env = "NATS_MAX_AGE_MS", default_value_t = 604_800_000)]
    pub nats_max_age_ms: u64,
    /// Window (ms) in which the server drops a publish whose `Nats-Msg-Id` it has stored.
    #[arg(long, env = "NATS_DUPLICATE_WINDOW_MS", default_value_t = 120_000)]
    pub nats_duplicate_window_ms: u64,
    /// How long a worker may hold a delivery unacked before the server
    /// redelivers it (ms) — the recovery time after a worker died.
    #[arg(long, env = "NATS_ACK_WAIT_MS", default_value_t = 10_000)]
    pub nats_ack_wait_ms: u64,
    /// Deliveries of one message to a group before the server gives up on it;
    /// -1 = never (a message given up on never reaches the DB).
    #[arg(long, env = "NATS_MAX_DELIVER", default_value_t = -1, allow_negative_numbers = true)]
    pub nats_max_deliver: i64,
    /// Unacked deliveries a group may have outstanding across its members.
    #[arg(long, env = "NATS_MAX_ACK_PENDING", default_value_t = 1024)]
    pub nats_max_ack_pending: i64,
    /// Messages one worker pull request asks for.
    #[arg(long, env = "NATS_PULL_BATCH", default_value_t = 128)]
    pub nats_pull_batch: usize,
    /// How long to wait for the JetStream publish ack before answering
    /// `bus_unavailable` (ms); also bounds JetStream API calls.
    #[arg(long, env = "NATS_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub nats_publish_timeout_ms: u64,
    /// Longest wait between reconnection attempts (ms).
    #[arg(long, env = "NATS_RECONNECT_MAX_MS", default_value_t = 5000)]
    pub nats_reconnect_max_ms: u64,
}

crate::default_from_env!(NatsConfig);

/// The subject of a room.
pub fn subject(prefix: &str, room: &RoomId) -> String {
    match room.kind() {
        RoomKind::Chat => format!("{prefix}.chat.{}", room.name()),
        RoomKind::Ai => format!("{prefix}.ai.{}", room.name()),
    }
}

/// The room of a subject (`None` for subjects that are not ours).
pub fn room_of(prefix: &str, subject: &str) -> Option<RoomId> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    RoomId::parse(rest)
}

/// The durable consumer of a shared group. Consumer names may not hold
/// `.`, `*`, `>` or whitespace; anything else outside `[A-Za-z0-9_-]` becomes `_`.
pub fn consumer_name(prefix: &str, group: &str) -> String {
    format!("{prefix}{group}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("nats: {e}"))
}

/// The `Nats-Msg-Id` of a payload: `<room>/<id>` for chat messages (their id
/// is what a retry repeats), none for other events.
pub fn msg_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        ty: Option<&'a str>,
        #[serde(borrow)]
        room: Option<&'a str>,
        #[serde(borrow)]
        id: Option<&'a str>,
    }
    let h: Head<'_> = serde_json::from_slice(payload).ok()?;
    match (h.ty, h.room, h.id) {
        (Some("message"), Some(room), Some(id)) => Some(format!("{room}/{id}")),
        _ => None,
    }
}

/// Connects a client: unlimited reconnects with capped backoff; `resumed`
/// counts reconnections (a `Connected` after a `Disconnected`).
pub(crate) async fn connect_client(
    cfg: &NatsConfig,
    name: &str,
    resumed: Option<watch::Sender<u64>>,
) -> Result<async_nats::Client, BusError> {
    let backoff = Backoff::capped_ms(cfg.nats_reconnect_max_ms);
    let was_down = Arc::new(AtomicBool::new(false));
    let resumed = resumed.map(Arc::new);
    let opts = async_nats::ConnectOptions::new()
        .name(format!("chat-relay {} {name}", cfg.nats_stream))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_millis(cfg.nats_publish_timeout_ms)))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempt| backoff.delay(attempt as u32))
        .event_callback(move |event| {
            let (was_down, resumed) = (was_down.clone(), resumed.clone());
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        was_down.store(true, Ordering::Relaxed);
                        tracing::warn!("nats: disconnected, reconnecting");
                    }
                    async_nats::Event::Connected => {
                        if was_down.swap(false, Ordering::Relaxed) {
                            metrics::counter!("bus_reconnects_total", "backend" => "nats")
                                .increment(1);
                            tracing::info!("nats: reconnected");
                            if let Some(r) = resumed {
                                r.send_modify(|n| *n += 1);
                            }
                        }
                    }
                    async_nats::Event::Closed => tracing::debug!("nats: connection closed"),
                    other => tracing::warn!(event = %other, "nats: client event"),
                }
            }
        });
    tokio::time::timeout(Duration::from_secs(10), opts.connect(cfg.nats_url.as_str()))
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)
}

/// The JetStream context with the configured API timeout.
pub fn context(cfg: &NatsConfig, client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.nats_publish_timeout_ms))
        .build(client)
}

/// The configuration of a shared group's durable pull consumer.
pub fn consumer_config(
    cfg: &NatsConfig,
    name: &str,
    deliver_policy: consumer::DeliverPolicy,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_string()),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_millis(cfg.nats_ack_wait_ms),
        max_deliver: cfg.nats_max_deliver,
        max_ack_pending: cfg.nats_max_ack_pending,
        filter_subject: format!("{}.>", cfg.nats_subject_prefix),
        ..Default::default()
    }
}

pub struct NatsBus {
    cfg: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    closed: CancellationToken,
    /// Reconnections of the bus's connection (the live subscriptions ride on it).
    resumed: watch::Receiver<u64>,
}

/// The last handle gone, every background task of this bus stops.
impl Drop for NatsBus {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl NatsBus {
    /// Connects and creates the stream if it does not exist (an existing
    /// stream is used as it is: its retention and replicas are the operator's).
    pub async fn connect(cfg: NatsConfig) -> Result<NatsBus, BusError> {
        let (tx, resumed) = watch::channel(0u64);
        let client = connect_client(&cfg, "bus", Some(tx)).await?;
        let js = context(&cfg, client.clone());
        js.get_or_create_stream(stream::Config {
            name: cfg.nats_stream.clone(),
            subjects: vec![format!("{}.>", cfg.nats_subject_prefix)],
            storage: stream::StorageType::File,
            max_age: Duration::from_millis(cfg.nats_max_age_ms),
            duplicate_window: Duration::from_millis(cfg.nats_duplicate_window_ms),
            num_replicas: cfg.nats_replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(format!("stream {}: {e}", cfg.nats_stream)))?;
        Ok(NatsBus {
            cfg,
            client,
            js,
            closed: CancellationToken::new(),
            resumed,
        })
    }

    /// How many times the connection has been re-established.
    pub fn reconnects(&self) -> u64 {
        *self.resumed.borrow()
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// The ack handle of one worker delivery. Dropped without an ack, it naks:
/// the server redelivers at once instead of after `ack_wait`.
struct NatsAcker {
    acker: Option<jetstream::message::Acker>,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.ack().await.map_err(unavailable),
            None => Ok(()),
        }
    }
    async fn nack(mut self: Box<Self>) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a
                .ack_with(jetstream::AckKind::Nak(None))
                .await
                .map_err(unavailable),
            None => Ok(()),
        }
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = a.ack_with(jetstream::AckKind::Nak(None)).await;
            });
        }
    }
}

/// The rooms of a live subscription: one core subscription (and its
/// forwarding task) per room.
struct LiveRooms {
    client: async_nats::Client,
    prefix: String,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    timeout: Duration,
    rooms: Mutex<HashMap<RoomId, CancellationToken>>,
}

impl LiveRooms {
    /// Subscribes `subject` and forwards its messages until `token` fires.
    async fn forward(&self, subject: String, token: CancellationToken) -> Result<(), BusError> {
        let mut sub = self.client.subscribe(subject).await.map_err(unavailable)?;
        let (tx, prefix) = (self.tx.clone(), self.prefix.clone());
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = token.cancelled() => break,
                    m = sub.next() => m,
                };
                let Some(m) = m else { break };
                let Some(room) = room_of(&prefix, m.subject.as_str()) else {
                    continue;
                };
                if tx.send(Delivery::unacked(room, m.payload)).await.is_err() {
                    break;
                }
            }
            let _ = sub.unsubscribe().await;
        });
        // A PING/PONG round trip: the server has the SUB once it answers,
        // so a message published after this returns reaches us.
        tokio::time::timeout(self.timeout, self.client.flush())
            .await
            .map_err(|_| unavailable("flush timed out; subscribed on reconnect"))?
            .map_err(unavailable)
    }
}

#[async_trait]
impl RoomInterest for LiveRooms {
    async fn add_room(&self, room: &RoomId) -> Result<(), BusError> {
        let mut rooms = self.rooms.lock().await;
        if rooms.contains_key(room) {
            return Ok(());
        }
        let token = self.stop.child_token();
        rooms.insert(room.clone(), token.clone());
        self.forward(subject(&self.prefix, room), token).await
    }

    async fn remove_room(&self, room: &RoomId) -> Result<(), BusError> {
        if let Some(t) = self.rooms.lock().await.remove(room) {
            t.cancel();
        }
        Ok(())
    }
}

/// What one connected session of a worker subscription holds.
type PullSession = consumer::pull::Stream;

async fn start_pull(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    group: &str,
) -> Result<PullSession, BusError> {
    let stream = js
        .get_stream(&cfg.nats_stream)
        .await
        .map_err(|e| unavailable(format!("stream {}: {e}", cfg.nats_stream)))?;
    let name = consumer_name(&cfg.nats_consumer_prefix, group);
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer_config(cfg, &name, consumer::DeliverPolicy::All),
        )
        .await
        .map_err(|e| unavailable(format!("consumer {name}: {e}")))?;
    consumer
        .stream()
        .max_messages_per_batch(cfg.nats_pull_batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| unavailable(format!("consumer {name}: {e}")))
}

#[async_trait]
impl MessageBus for NatsBus {
    fn backend(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            competing_consumers: true,
            redelivery: true,
            retains_for_absent_groups: true,
            replay: true,
            multi_process: true,
            selective_ack: true,
        }
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.submit(msg).await?.await
    }

    /// Writes the message on the bus's one connection (NATS keeps a
    /// connection's order, and the stream stores in arrival order) and
    /// returns the pending JetStream ack, so the caller's room turn does not
    /// wait for the server's disk write.
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        // Disconnected, the client would buffer the message and let it time
        // out; answer at once instead.
        if !self.connected() {
            return Err(unavailable("not connected (reconnecting)"));
        }
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id(&msg.payload) {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        let timeout = Duration::from_millis(self.cfg.nats_publish_timeout_ms);
        let pending = tokio::time::timeout(
            timeout,
            self.js.publish_with_headers(
                subject(&self.cfg.nats_subject_prefix, &msg.room),
                headers,
                msg.payload,
            ),
        )
        .await
        .map_err(|_| BusError::Timeout("nats: publish timed out".into()))?
        .map_err(unavailable)?;
        Ok(Box::pin(async move {
            use jetstream::context::PublishErrorKind as K;
            match tokio::time::timeout(timeout, pending.into_future()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => match e.kind() {
                    K::TimedOut => Err(BusError::Timeout("nats: no JetStream ack in time".into())),
                    K::StreamNotFound
                    | K::WrongLastMessageId
                    | K::WrongLastSequence
                    | K::MaxPayloadExceeded => Err(BusError::Rejected(format!("nats: {e}"))),
                    _ => Err(unavailable(e)),
                },
                Err(_) => Err(BusError::Timeout("nats: no JetStream ack in time".into())),
            }
        }))
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let stop = self.closed.child_token();
        match opts.kind {
            GroupKind::Instance => {
                let (tx, rx) = mpsc::channel(1024);
                let live = Arc::new(LiveRooms {
                    client: self.client.clone(),
                    prefix: self.cfg.nats_subject_prefix.clone(),
                    tx,
                    stop: stop.clone(),
                    timeout: Duration::from_millis(self.cfg.nats_publish_timeout_ms),
                    rooms: Mutex::new(HashMap::new()),
                });
                if opts.scope == RoomScope::All {
                    live.forward(
                        format!("{}.>", self.cfg.nats_subject_prefix),
                        stop.child_token(),
                    )
                    .await?;
                }
                Ok(Subscription::new(rx, live, Some(stop.drop_guard()))
                    .with_resumptions(self.resumed.clone()))
            }
            GroupKind::Shared => {
                let (tx, rx) = mpsc::channel(self.cfg.nats_pull_batch.max(1));
                let (js, cfg, group) = (self.js.clone(), self.cfg.clone(), opts.group.clone());
                let (pump_stop, prefix) = (stop.clone(), self.cfg.nats_subject_prefix.clone());
                let resumed = reconnect::spawn_session(
                    "nats",
                    format!("consumer {group}"),
                    Backoff::capped_ms(self.cfg.nats_reconnect_max_ms),
                    stop.clone(),
                    Duration::from_millis(self.cfg.nats_publish_timeout_ms * 2),
                    move || {
                        let (js, cfg, group) = (js.clone(), cfg.clone(), group.clone());
                        async move { start_pull(&js, &cfg, &group).await }
                    },
                    move |mut messages: PullSession| {
                        let (tx, stop, prefix) = (tx.clone(), pump_stop.clone(), prefix.clone());
                        async move {
                            loop {
                                let next = tokio::select! {
                                    _ = stop.cancelled() => return SessionEnd::Stopped,
                                    n = messages.next() => n,
                                };
                                let m = match next {
                                    Some(Ok(m)) => m,
                                    Some(Err(e)) => {
                                        use consumer::pull::MessagesErrorKind as K;
                                        tracing::warn!(error = %e, "nats: pull consumer error");
                                        match e.kind() {
                                            // The stream re-pulls by itself.
                                            K::MissingHeartbeat | K::Pull | K::Other => continue,
                                            _ => return SessionEnd::Lost,
                                        }
                                    }
                                    None => return SessionEnd::Lost,
                                };
                                let redelivered =
                                    m.info().map(|i| i.delivered > 1).unwrap_or(false);
                                let (m, acker) = m.split();
                                let acker = NatsAcker { acker: Some(acker) };
                                let Some(room) = room_of(&prefix, m.subject.as_str()) else {
                                    // Not ours (the filter should prevent it): drop it for good.
                                    let _ = Box::new(acker).ack().await;
                                    continue;
                                };
                                let d =
                                    Delivery::new(room, m.payload, redelivered, Box::new(acker));
                                if tx.send(d).await.is_err() {
                                    return SessionEnd::Stopped;
                                }
                            }
                        }
                    },
                )
                .await?;
                let sub = Subscription::new(rx, Arc::new(super::AllRooms), Some(stop.drop_guard()))
                    .with_resumptions(resumed);
                // The group's members share max ack pending (-1: no limit).
                Ok(match usize::try_from(self.cfg.nats_max_ack_pending) {
                    Ok(limit) if limit > 0 => sub.with_unacked_limit(limit),
                    _ => sub,
                })
            }
        }
    }

    async fn ready(&self) -> Result<(), BusError> {
        if self.connected() {
            Ok(())
        } else {
            Err(unavailable("not connected"))
        }
    }

    async fn close(&self) {
        self.closed.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }

    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        Some(self)
    }
}

/// A group's lag is what its consumer has not yet delivered to any member
/// (`num_pending`); deliveries held unacked are not counted.
#[async_trait]
impl ConsumerLag for NatsBus {
    async fn lag(&self, group: &str) -> Option<i64> {
        let info = self.consumer_info(group).await?;
        // Not yet consumed = not yet delivered (`num_pending`) plus delivered
        // but not acked (`num_ack_pending`, which also holds nacked messages
        // waiting for redelivery): what Kafka's end-minus-committed counts.
        // `num_pending` alone would let a message handed to a member that
        // then died vanish from the lag until `NATS_ACK_WAIT_MS` passes.
        let unacked = u64::try_from(info.num_ack_pending).ok()?;
        i64::try_from(info.num_pending.checked_add(unacked)?).ok()
    }

    async fn undelivered(&self, group: &str) -> Option<i64> {
        let info = self.consumer_info(group).await?;
        i64::try_from(info.num_pending).ok()
    }
}

impl NatsBus {
    /// The durable consumer of worker group `group`, as the server sees it.
    async fn consumer_info(&self, group: &str) -> Option<consumer::Info> {
        let stream = self.js.get_stream(&self.cfg.nats_stream).await.ok()?;
        let name = consumer_name(&self.cfg.nats_consumer_prefix, group);
        stream.consumer_info(&name).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_rooms_round_trip() {
        let r = RoomId::parse("ai.dungeon-1").unwrap();
        let s = subject("chat.room", &r);
        assert_eq!(s, "chat.room.ai.dungeon-1");
        assert_eq!(room_of("chat.room", &s), Some(r));
        assert_eq!(room_of("chat.room", "other.ai.x"), None);
        assert_eq!(room_of("chat.room", "chat.roomx.ai.x"), None);
    }

    #[test]
    fn consumer_names_are_valid() {
        assert_eq!(consumer_name("p-", "db.writer *>"), "p-db_writer___");
    }

    #[test]
    fn only_chat_messages_carry_a_msg_id() {
        let m = br#"{"type":"message","room":"chat.a","id":"01J","user":"u","text":"t","ts":1,"kind":"chat"}"#;
        assert_eq!(msg_id(m).as_deref(), Some("chat.a/01J"));
        let p = br#"{"type":"presence","room":"chat.a","user":"u","event":"joined"}"#;
        assert_eq!(msg_id(p), None);
        assert_eq!(msg_id(b"not json"), None);
    }
}
