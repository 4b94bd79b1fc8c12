//! Redis Streams with the `redis` crate, as `src/bus/redis_streams.rs` sets
//! it up (settings from `RedisStreamsConfig`, connection from `RedisConfig`):
//! `REDIS_STREAMS_SHARDS` shard streams; a publish is one `XADD` with the
//! relay's `MAXLEN ~` (or `MINID ~`) trim to the shard of the relay's room
//! hash (`shard_of`), awaited one at a time per publisher (the relay's bus
//! has no pipelined `submit`), on a `ConnectionManager` per instance; per
//! instance a live reader on a dedicated connection, `XREAD BLOCK` over every
//! shard from the newest ids at start, filtering its rooms locally
//! (`LocalRooms`); the worker groups as consumer groups created at `0`, each
//! one consumer reading `XREADGROUP … >` on a dedicated connection, with the
//! relay's periodic `XAUTOCLAIM` sweep, and an `XACK` per delivery after
//! decoding on the worker process's one shared connection.
//!
//! The key prefix is unique per run; the shard keys are deleted at the end.

use std::sync::Arc;
use std::time::Duration;

use chat_relay::bus::redis::RedisConfig;
use chat_relay::bus::redis_streams::{
    PAYLOAD_FIELD, ROOM_FIELD, RedisStreamsConfig, shard_of, stream_keys,
};
use chat_relay::bus::{LocalRooms, RoomInterest};
use chat_relay::protocol::RoomId;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::stats::{LiveStats, WorkerStats};
use super::{Consumer, Pending, Publish};

pub struct RedisStreams {
    redis: RedisConfig,
    cfg: RedisStreamsConfig,
    client: redis::Client,
    keys: Arc<Vec<String>>,
    /// The worker process's shared connection (its XACKs).
    workers: Mutex<Option<ConnectionManager>>,
}

/// One entry of a read: id, and room and payload when it has both.
struct Entry<'a> {
    id: String,
    room: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// `[[id, [field, value, …]], …]`; nil (deleted) entries are skipped.
fn entries(v: &Value) -> Vec<Entry<'_>> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let mut entry = Entry {
                id: as_string(parts.first()?)?,
                room: None,
                payload: None,
            };
            if let Some(Value::Array(fields)) = parts.get(1) {
                for kv in fields.chunks(2) {
                    if let [k, val] = kv {
                        match as_bytes(k) {
                            Some(k) if k == ROOM_FIELD.as_bytes() => entry.room = as_bytes(val),
                            Some(k) if k == PAYLOAD_FIELD.as_bytes() => {
                                entry.payload = as_bytes(val)
                            }
                            _ => {}
                        }
                    }
                }
            }
            Some(entry)
        })
        .collect()
}

/// An `XREAD`/`XREADGROUP` reply `[[key, entries], …]` (nil on timeout).
fn read_reply(v: &Value) -> Vec<(String, Vec<Entry<'_>>)> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    streams
        .iter()
        .filter_map(|s| match s {
            Value::Array(kv) => Some((as_string(kv.first()?)?, entries(kv.get(1)?))),
            _ => None,
        })
        .collect()
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    wait: Duration,
) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(wait, cmd.query_async::<T>(conn))
        .await
        .map_err(|_| anyhow::anyhow!("redis command timed out"))??)
}

impl RedisStreams {
    pub async fn setup(
        redis: RedisConfig,
        mut cfg: RedisStreamsConfig,
        run: &str,
    ) -> anyhow::Result<RedisStreams> {
        // The relay's checks (`RedisStreamsBus::connect`).
        anyhow::ensure!(
            cfg.redis_streams_maxlen == 0 || cfg.redis_streams_max_age_ms == 0,
            "set REDIS_STREAMS_MAXLEN or REDIS_STREAMS_MAX_AGE_MS, not both"
        );
        anyhow::ensure!(
            cfg.redis_streams_shards > 0 && cfg.redis_streams_batch > 0,
            "REDIS_STREAMS_SHARDS and REDIS_STREAMS_BATCH must be at least 1"
        );
        cfg.redis_streams_prefix = format!("brokerbench-{run}:");
        let client = redis::Client::open(redis.redis_url.as_str())?;
        let keys = Arc::new(stream_keys(&cfg));
        let rs = RedisStreams {
            redis,
            cfg,
            client,
            keys,
            workers: Mutex::new(None),
        };
        // Fail early when the server is not there.
        let mut conn = rs.manager().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(rs)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis.redis_command_timeout_ms)
    }

    fn block(&self) -> Duration {
        Duration::from_millis(self.cfg.redis_streams_block_ms)
    }

    /// The relay's shared connection (publishes, acks).
    async fn manager(&self) -> anyhow::Result<ConnectionManager> {
        let t = self.timeout();
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(t)
            .set_response_timeout(t)
            .set_number_of_retries(1)
            .set_max_delay(self.redis.redis_reconnect_max_ms);
        tokio::time::timeout(
            t * 5,
            ConnectionManager::new_with_config(self.client.clone(), mcfg),
        )
        .await
        .map_err(|_| anyhow::anyhow!("redis connect timed out"))?
        .map_err(Into::into)
    }

    /// A dedicated connection for blocking reads (the relay's `dedicated`).
    async fn dedicated(&self, name: &str) -> anyhow::Result<MultiplexedConnection> {
        let t = self.timeout();
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(t)
            .set_response_timeout(self.block() + t);
        let mut conn = tokio::time::timeout(
            t * 3,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        .map_err(|_| anyhow::anyhow!("redis connect timed out"))??;
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("SETNAME").arg(name);
        query::<()>(&mut conn, &cmd, t).await?;
        Ok(conn)
    }

    pub async fn producer(&self) -> anyhow::Result<RedisStreamsProducer> {
        Ok(RedisStreamsProducer {
            conn: self.manager().await?,
            keys: self.keys.clone(),
            shards: self.cfg.redis_streams_shards,
            maxlen: self.cfg.redis_streams_maxlen,
            max_age_ms: self.cfg.redis_streams_max_age_ms,
            timeout: self.timeout(),
        })
    }

    pub async fn live(
        &self,
        instance: usize,
        rooms: &[RoomId],
        mut stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        let name = format!(
            "brokerbench:{}live:{instance}",
            self.cfg.redis_streams_prefix
        );
        let mut conn = self.dedicated(&name).await?;
        let interest = LocalRooms::default();
        for r in rooms {
            interest.add_room(r).await?;
        }
        // Start at every shard's newest entry (`last_ids`).
        let mut last = Vec::with_capacity(self.keys.len());
        for key in self.keys.iter() {
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
            let v: Value = query(&mut conn, &cmd, self.timeout()).await?;
            last.push(
                entries(&v)
                    .into_iter()
                    .next()
                    .map_or_else(|| "0-0".to_string(), |e| e.id),
            );
        }
        let (keys, batch, block, timeout) = (
            self.keys.clone(),
            self.cfg.redis_streams_batch,
            self.block(),
            self.timeout(),
        );
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(batch)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS");
                for key in keys.iter() {
                    cmd.arg(key);
                }
                for id in &last {
                    cmd.arg(id);
                }
                let v = tokio::select! {
                    _ = stop.cancelled() => break,
                    v = query::<Value>(&mut conn, &cmd, block + timeout) => v,
                };
                let v = match v {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("redis-streams live XREAD: {e}");
                        break;
                    }
                };
                for (key, es) in read_reply(&v) {
                    let Some(i) = keys.iter().position(|k| *k == key) else {
                        continue;
                    };
                    for e in es {
                        let room = e
                            .room
                            .and_then(|r| std::str::from_utf8(r).ok())
                            .and_then(RoomId::parse);
                        if let (Some(room), Some(p)) = (room, e.payload)
                            && interest.contains(&room)
                        {
                            stats.record(p);
                        }
                        if let Some(slot) = last.get_mut(i) {
                            *slot = e.id;
                        }
                    }
                }
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    pub async fn worker(
        &self,
        group: &str,
        mut stats: WorkerStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<WorkerStats>> {
        let consumer = ulid::Ulid::new().to_string().to_lowercase();
        let mut conn = self
            .dedicated(&format!("brokerbench:group:{group}:{consumer}"))
            .await?;
        for key in self.keys.iter() {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(key)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM");
            match tokio::time::timeout(self.timeout(), cmd.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.code() == Some("BUSYGROUP") => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => anyhow::bail!("XGROUP CREATE timed out"),
            }
        }
        let mut acks = {
            let mut w = self.workers.lock().await;
            match w.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.manager().await?;
                    *w = Some(c.clone());
                    c
                }
            }
        };
        let (keys, batch, block, timeout) = (
            self.keys.clone(),
            self.cfg.redis_streams_batch,
            self.block(),
            self.timeout(),
        );
        let claim_idle_ms = self.cfg.redis_streams_claim_idle_ms;
        let group = group.to_string();
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            // Decodes, then XACKs, one delivery after the other.
            async fn process(
                stats: &mut WorkerStats,
                acks: &mut ConnectionManager,
                key: &str,
                group: &str,
                es: Vec<Entry<'_>>,
                timeout: Duration,
            ) {
                for e in es {
                    if e.room.is_some()
                        && let Some(p) = e.payload
                    {
                        stats.record(p);
                    }
                    let mut cmd = redis::cmd("XACK");
                    cmd.arg(key).arg(group).arg(&e.id);
                    match tokio::time::timeout(timeout, cmd.query_async::<i64>(acks)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => eprintln!("redis-streams XACK: {e}"),
                        Err(_) => eprintln!("redis-streams XACK timed out"),
                    }
                }
            }
            // The relay's claim sweep: every claim_idle / 2 (at least 100 ms).
            let claim_every = Duration::from_millis((claim_idle_ms / 2).max(100));
            let mut next_claim = tokio::time::Instant::now();
            'run: loop {
                if tokio::time::Instant::now() >= next_claim {
                    for key in keys.iter() {
                        let mut cursor = "0-0".to_string();
                        loop {
                            let mut cmd = redis::cmd("XAUTOCLAIM");
                            cmd.arg(key)
                                .arg(&group)
                                .arg(&consumer)
                                .arg(claim_idle_ms)
                                .arg(&cursor)
                                .arg("COUNT")
                                .arg(batch);
                            let v = tokio::select! {
                                _ = stop.cancelled() => break 'run,
                                v = query::<Value>(&mut conn, &cmd, timeout) => v,
                            };
                            let v = match v {
                                Ok(v) => v,
                                Err(e) => {
                                    eprintln!("redis-streams XAUTOCLAIM: {e}");
                                    break 'run;
                                }
                            };
                            let Value::Array(parts) = &v else { break };
                            let es = parts.get(1).map(entries).unwrap_or_default();
                            process(&mut stats, &mut acks, key, &group, es, timeout).await;
                            cursor = parts.first().and_then(as_string).unwrap_or_default();
                            if cursor.is_empty() || cursor == "0-0" {
                                break;
                            }
                        }
                    }
                    next_claim = tokio::time::Instant::now() + claim_every;
                }
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(&group)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(batch)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS");
                for key in keys.iter() {
                    cmd.arg(key);
                }
                for _ in keys.iter() {
                    cmd.arg(">");
                }
                let v = tokio::select! {
                    _ = stop.cancelled() => break,
                    v = query::<Value>(&mut conn, &cmd, block + timeout) => v,
                };
                match v {
                    Ok(v) => {
                        for (key, es) in read_reply(&v) {
                            process(&mut stats, &mut acks, &key, &group, es, timeout).await;
                        }
                    }
                    Err(e) => {
                        eprintln!("redis-streams XREADGROUP: {e}");
                        break;
                    }
                }
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    /// Deletes the run's shard streams (their groups go with them).
    pub async fn teardown(&self) {
        let res = async {
            let mut conn = self.manager().await?;
            let mut cmd = redis::cmd("DEL");
            for key in self.keys.iter() {
                cmd.arg(key);
            }
            cmd.query_async::<i64>(&mut conn).await?;
            anyhow::Ok(())
        };
        if let Err(e) = res.await {
            eprintln!(
                "redis-streams: keys {}* not deleted: {e}",
                self.cfg.redis_streams_prefix
            );
        }
    }

    pub fn settings(&self) -> serde_json::Value {
        let c = &self.cfg;
        json!({"prefix": c.redis_streams_prefix, "shards": c.redis_streams_shards,
               "maxlen": c.redis_streams_maxlen, "max_age_ms": c.redis_streams_max_age_ms,
               "batch": c.redis_streams_batch, "block_ms": c.redis_streams_block_ms,
               "claim_idle_ms": c.redis_streams_claim_idle_ms,
               "command_timeout_ms": self.redis.redis_command_timeout_ms,
               "publish": "XADD awaited one at a time per publisher, ConnectionManager per instance",
               "live": "XREAD BLOCK over every shard, one dedicated connection per instance",
               "workers": "XREADGROUP per group on a dedicated connection, XACK per delivery on one shared connection"})
    }
}

pub struct RedisStreamsProducer {
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
    shards: u32,
    maxlen: u64,
    max_age_ms: u64,
    timeout: Duration,
}

impl Publish for RedisStreamsProducer {
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            // The relay's `publish`, awaited here (its `submit` is the
            // trait's default): the next publish starts after the answer.
            let key = &self.keys[shard_of(room, self.shards) as usize % self.keys.len()];
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key);
            if self.max_age_ms > 0 {
                let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
                cmd.arg("MINID")
                    .arg("~")
                    .arg(now.saturating_sub(self.max_age_ms));
            } else if self.maxlen > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.maxlen);
            }
            cmd.arg("*")
                .arg(ROOM_FIELD)
                .arg(room.as_str())
                .arg(PAYLOAD_FIELD)
                .arg(&payload[..]);
            let r = match tokio::time::timeout(self.timeout, cmd.query_async::<String>(&mut conn))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("XADD timed out".to_string()),
            };
            Ok(Box::pin(std::future::ready(r)) as Pending)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_entries_of_an_xread_reply() {
        let entry =
            |id: &str, fields: Vec<Value>| Value::Array(vec![bulk(id), Value::Array(fields)]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("p:stream:3"),
            Value::Array(vec![
                entry(
                    "1-0",
                    vec![
                        bulk(ROOM_FIELD),
                        bulk("chat.a"),
                        bulk(PAYLOAD_FIELD),
                        bulk("{}"),
                    ],
                ),
                entry("2-0", vec![bulk("other"), bulk("x")]),
                Value::Nil,
            ]),
        ])]);
        let read = read_reply(&reply);
        assert_eq!(read.len(), 1);
        let (key, es) = &read[0];
        assert_eq!(key, "p:stream:3");
        assert_eq!(es.len(), 2, "the nil (deleted) entry is skipped");
        assert_eq!(es[0].id, "1-0");
        assert_eq!(es[0].room, Some(&b"chat.a"[..]));
        assert_eq!(es[0].payload, Some(&b"{}"[..]));
        assert_eq!(
            (es[1].id.as_str(), es[1].room, es[1].payload),
            ("2-0", None, None)
        );
        assert!(
            read_reply(&Value::Nil).is_empty(),
            "a BLOCK timeout reads nothing"
        );
    }
}
