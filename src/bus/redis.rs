//! `BUS=redis`: Redis Pub/Sub, as DungeonTalk uses it today.
//!
//! Channels follow the original design: `chatroom.<name>` for `chat.<name>`
//! rooms, `aichat.<name>` for `ai.<name>` rooms; the payload is the JSON message.
//!
//! What Redis Pub/Sub is — and is not — shapes everything here:
//! * **No consumer groups.** Every subscriber of a channel gets every message;
//!   two members of "one group" do not compete. The persistence role stays
//!   correct anyway because its writes are idempotent; the analytics role takes
//!   a lease (`acquire_lease`, `SET NX PX` + a Lua renew) so only one instance counts.
//! * **No storage, at-most-once.** PUBLISH hands the message to whoever is
//!   subscribed *at that instant*. A message published while no persistence
//!   worker listens (stopped, restarting, reconnecting) is gone: nothing is
//!   redelivered, nothing can be replayed. `capabilities()` says so and the
//!   tests show it.
//! * **Publishing is fast** (one round trip on a multiplexed connection) and the
//!   gateway acks the client once Redis accepted the PUBLISH.
//!
//! Live delivery SUBSCRIBEs only the rooms with local sockets, on a dedicated
//! pub/sub connection; workers PSUBSCRIBE `chatroom.*` and `aichat.*`. When the
//! connection drops, each subscription reconnects with capped exponential
//! backoff and re-subscribes its rooms; messages published meanwhile are lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::reconnect::{self, Backoff, SessionEnd};
use super::{
    BusError, Capabilities, Delivery, Leases, MessageBus, Outgoing, RoomInterest, RoomScope,
    SubscribeOptions, Subscription,
};
use crate::protocol::{RoomId, RoomKind};

/// Settings of the Redis bus.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisConfig {
    /// Redis server URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Longest wait between reconnection attempts (ms).
    #[arg(long, env = "REDIS_RECONNECT_MAX_MS", default_value_t = 5000)]
    pub redis_reconnect_max_ms: u64,
    /// Timeout of one Redis command (PUBLISH, SUBSCRIBE, PING) in ms: a down
    /// Redis answers `bus_unavailable` after this, never hangs a client.
    #[arg(long, env = "REDIS_COMMAND_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_command_timeout_ms: u64,
}

crate::default_from_env!(RedisConfig);

/// The Redis channel of a room.
pub fn channel(room: &RoomId) -> String {
    match room.kind() {
        RoomKind::Chat => format!("chatroom.{}", room.name()),
        RoomKind::Ai => format!("aichat.{}", room.name()),
    }
}

/// The room of a Redis channel (`None` for channels that are not ours).
pub fn room_of(channel: &str) -> Option<RoomId> {
    if let Some(n) = channel.strip_prefix("chatroom.") {
        RoomId::parse(&format!("chat.{n}"))
    } else if let Some(n) = channel.strip_prefix("aichat.") {
        RoomId::parse(&format!("ai.{n}"))
    } else {
        None
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("redis: {e}"))
}

/// Renews the lease if we hold it, takes it if nobody does.
const LEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
else
  return 0
end";

pub struct RedisBus {
    cfg: RedisConfig,
    client: redis::Client,
    conn: ConnectionManager,
    closed: CancellationToken,
}

impl RedisBus {
    pub async fn connect(cfg: RedisConfig) -> Result<RedisBus, BusError> {
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| BusError::Config(format!("REDIS_URL: {e}")))?;
        let timeout = Duration::from_millis(cfg.redis_command_timeout_ms);
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_max_delay(cfg.redis_reconnect_max_ms);
        let conn = tokio::time::timeout(
            timeout * 5,
            ConnectionManager::new_with_config(client.clone(), mcfg),
        )
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
        Ok(RedisBus {
            cfg,
            client,
            conn,
            closed: CancellationToken::new(),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.redis_command_timeout_ms)
    }
}

/// The last handle gone, every subscription reconnect loop of this bus
/// stops: none outlives its bus.
impl Drop for RedisBus {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// Rooms of one subscription and the sink of its current connection. The
/// lock is held while re-subscribing after a reconnect, so an `add_room`
/// racing with it is never lost.
struct Interest {
    scope: RoomScope,
    state: Mutex<(HashSet<RoomId>, Option<PubSubSink>)>,
    timeout: Duration,
}

#[async_trait]
impl RoomInterest for Interest {
    async fn add_room(&self, room: &RoomId) -> Result<(), BusError> {
        if self.scope == RoomScope::All {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        st.0.insert(room.clone());
        let Some(sink) = st.1.as_mut() else {
            return Err(unavailable(
                "not connected; the room is subscribed on reconnect",
            ));
        };
        tokio::time::timeout(self.timeout, sink.subscribe(channel(room)))
            .await
            .map_err(|_| unavailable("SUBSCRIBE timed out"))?
            .map_err(unavailable)
    }

    async fn remove_room(&self, room: &RoomId) -> Result<(), BusError> {
        if self.scope == RoomScope::All {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        st.0.remove(room);
        if let Some(sink) = st.1.as_mut() {
            tokio::time::timeout(self.timeout, sink.unsubscribe(channel(room)))
                .await
                .map_err(|_| unavailable("UNSUBSCRIBE timed out"))?
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// Connects a pub/sub connection and (re-)subscribes everything the
/// subscription needs; returns the message stream.
async fn connect_pubsub(
    client: &redis::Client,
    interest: &Interest,
) -> Result<redis::aio::PubSubStream, BusError> {
    let t = interest.timeout;
    let pubsub = tokio::time::timeout(t * 3, client.get_async_pubsub())
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
    let (mut sink, stream) = pubsub.split();
    let mut st = interest.state.lock().await;
    match interest.scope {
        RoomScope::All => {
            for pattern in ["chatroom.*", "aichat.*"] {
                tokio::time::timeout(t, sink.psubscribe(pattern))
                    .await
                    .map_err(|_| unavailable("PSUBSCRIBE timed out"))?
                    .map_err(unavailable)?;
            }
        }
        RoomScope::Dynamic => {
            let rooms: Vec<RoomId> = st.0.iter().cloned().collect();
            for r in rooms {
                tokio::time::timeout(t, sink.subscribe(channel(&r)))
                    .await
                    .map_err(|_| unavailable("SUBSCRIBE timed out"))?
                    .map_err(unavailable)?;
            }
        }
    }
    st.1 = Some(sink);
    Ok(stream)
}

#[async_trait]
impl MessageBus for RedisBus {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            competing_consumers: false,
            redelivery: false,
            retains_for_absent_groups: false,
            replay: false,
            multi_process: true,
            selective_ack: false,
        }
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let mut conn = self.conn.clone();
        let ch = channel(&msg.room);
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&ch).arg(&msg.payload[..]);
        let publish = cmd.query_async::<i64>(&mut conn);
        tokio::time::timeout(self.timeout(), publish)
            .await
            .map_err(|_| unavailable("PUBLISH timed out"))?
            .map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let interest = Arc::new(Interest {
            scope: opts.scope,
            state: Mutex::new((HashSet::new(), None)),
            timeout: self.timeout(),
        });
        let (tx, rx) = mpsc::channel(1024);
        // A child of `closed`: closing the bus stops every subscription.
        let stop = self.closed.child_token();
        let (client, closed) = (self.client.clone(), self.closed.clone());
        let (connect_interest, pump_interest, pump_stop) =
            (interest.clone(), interest.clone(), stop.clone());
        let resumed = reconnect::spawn_session(
            "redis",
            format!("pub/sub {}", opts.group),
            Backoff::capped_ms(self.cfg.redis_reconnect_max_ms),
            stop.clone(),
            self.timeout() * 5,
            move || {
                let (client, interest) = (client.clone(), connect_interest.clone());
                async move { connect_pubsub(&client, &interest).await }
            },
            move |mut stream| {
                let (tx, interest, stop, closed) = (
                    tx.clone(),
                    pump_interest.clone(),
                    pump_stop.clone(),
                    closed.clone(),
                );
                async move {
                    loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => return SessionEnd::Stopped,
                            _ = closed.cancelled() => return SessionEnd::Stopped,
                            m = stream.next() => m,
                        };
                        let Some(msg) = msg else { break };
                        let Some(room) = room_of(msg.get_channel_name()) else {
                            continue;
                        };
                        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                        if tx.send(Delivery::unacked(room, payload)).await.is_err() {
                            return SessionEnd::Stopped;
                        }
                    }
                    // The connection is gone: forget its sink so add_room
                    // reports the outage until the reconnect re-subscribes.
                    interest.state.lock().await.1 = None;
                    tracing::warn!(
                        "redis pub/sub: connection lost; messages published until it is back are lost"
                    );
                    SessionEnd::Lost
                }
            },
        )
        .await?;
        Ok(Subscription::new(rx, interest, Some(stop.drop_guard())).with_resumptions(resumed))
    }

    async fn ready(&self) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        tokio::time::timeout(
            self.timeout(),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        .map_err(|_| unavailable("PING timed out"))?
        .map_err(unavailable)?;
        Ok(())
    }

    async fn close(&self) {
        self.closed.cancel();
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }
}

#[async_trait]
impl Leases for RedisBus {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let mut conn = self.conn.clone();
        let script = redis::Script::new(LEASE_SCRIPT);
        let mut inv = script.prepare_invoke();
        inv.key(format!("chat-relay:lease:{name}"))
            .arg(holder)
            .arg(ttl.as_millis() as u64);
        let r: i64 = tokio::time::timeout(self.timeout(), inv.invoke_async(&mut conn))
            .await
            .map_err(|_| unavailable("lease timed out"))?
            .map_err(unavailable)?;
        Ok(r == 1)
    }
}
