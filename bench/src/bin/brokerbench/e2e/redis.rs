//! Redis Pub/Sub with the `redis` crate, as `src/bus/redis.rs` sets it up:
//! PUBLISH on a multiplexed connection (a `ConnectionManager` with the
//! relay's timeouts) per instance, one round trip at a time per publisher
//! (as the relay's Redis backend submits); per instance one dedicated pub/sub
//! connection that SUBSCRIBEs every room channel `chatroom.<name>`; each
//! worker group one pub/sub connection with a pattern subscription.
//!
//! The workers' pattern is `chatroom.<run>-*` rather than the relay's
//! `chatroom.*`: the same kind of pattern match per message for Redis, but
//! it keeps other runs' traffic on the shared server out of this one.

use std::time::Duration;

use chat_relay::bus::redis::RedisConfig;
use chat_relay::protocol::RoomId;
use futures::StreamExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::stats::{LiveStats, WorkerStats};
use super::{Consumer, Pending, Publish};

pub struct Redis {
    cfg: RedisConfig,
    client: redis::Client,
    run: String,
}

fn channel(room: &RoomId) -> String {
    format!("chatroom.{}", room.name())
}

impl Redis {
    pub fn setup(cfg: RedisConfig, run: &str) -> anyhow::Result<Redis> {
        let client = redis::Client::open(cfg.redis_url.as_str())?;
        Ok(Redis {
            cfg,
            client,
            run: run.to_string(),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.redis_command_timeout_ms)
    }

    pub async fn producer(&self) -> anyhow::Result<RedisProducer> {
        let t = self.timeout();
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(t)
            .set_response_timeout(t)
            .set_number_of_retries(1)
            .set_max_delay(self.cfg.redis_reconnect_max_ms);
        let conn = tokio::time::timeout(
            t * 5,
            ConnectionManager::new_with_config(self.client.clone(), mcfg),
        )
        .await
        .map_err(|_| anyhow::anyhow!("redis connect timed out"))??;
        Ok(RedisProducer { conn, timeout: t })
    }

    pub async fn live(
        &self,
        rooms: &[RoomId],
        mut stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        for r in rooms {
            pubsub.subscribe(channel(r)).await?;
        }
        let mut stream = pubsub.into_on_message();
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.next() => m,
                };
                let Some(m) = m else {
                    eprintln!("redis live pub/sub connection closed");
                    break;
                };
                if m.get_channel_name().starts_with("chatroom.") {
                    stats.record(m.get_payload_bytes());
                }
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    pub async fn worker(
        &self,
        mut stats: WorkerStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<WorkerStats>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("chatroom.{}-*", self.run))
            .await?;
        let mut stream = pubsub.into_on_message();
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.next() => m,
                };
                let Some(m) = m else {
                    eprintln!("redis worker pub/sub connection closed");
                    break;
                };
                stats.record(m.get_payload_bytes());
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    pub fn settings(&self) -> serde_json::Value {
        json!({"publish": "ConnectionManager (multiplexed)",
               "command_timeout_ms": self.cfg.redis_command_timeout_ms,
               "live": "SUBSCRIBE per room, one pub/sub connection per instance",
               "workers": format!("PSUBSCRIBE chatroom.{}-*, one connection per group", self.run)})
    }
}

pub struct RedisProducer {
    conn: ConnectionManager,
    timeout: Duration,
}

impl Publish for RedisProducer {
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>> {
        let (mut conn, timeout, ch) = (self.conn.clone(), self.timeout, channel(room));
        Box::pin(async move {
            // Awaited here, so the next publish starts after this one was
            // answered: the relay's Redis `submit` (the trait's default)
            // does the same, and nothing weaker keeps a room's order — a
            // command handed to the multiplexed connection is not known to
            // be in its pipeline until it is answered.
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&ch).arg(&payload[..]);
            let r = match tokio::time::timeout(timeout, cmd.query_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("PUBLISH timed out".to_string()),
            };
            Ok(Box::pin(std::future::ready(r)) as Pending)
        })
    }
}
