//! `BUS=redis-streams`: Redis Streams — the Redis mode with storage, consumer
//! groups and acknowledgements (what Socket.IO's Redis Streams adapter uses),
//! beside `BUS=redis` (Pub/Sub, which keeps nothing).
//!
//! * **Shard streams.** A fixed number of streams (`REDIS_STREAMS_SHARDS`),
//!   `<prefix>stream:<n>`; a room always goes to shard `fnv1a(room) % shards`,
//!   so one room's entries are in one stream, in XADD order. A stream per room
//!   would let a live reader read only its rooms, but then every worker would
//!   have to discover new room streams and hold a consumer group on each; with
//!   shards the workers read a fixed key set. The cost: a live reader reads
//!   every shard and filters rooms locally (like Kafka).
//! * **Publish** is one `XADD` with `MAXLEN ~` or `MINID ~` trimming. It
//!   returns once Redis appended the entry *in memory*: whether that survives
//!   a Redis crash depends on the server's persistence (`appendfsync always`:
//!   yes; the shared test Redis runs with none: lost on restart).
//! * **Shared groups** (`db-writer`, `analytics`) are Redis consumer groups,
//!   created at `0` (the oldest retained entry). Each subscription is one
//!   consumer (a fresh name) reading `XREADGROUP … >`, so two subscriptions of
//!   a group compete; the ack is `XACK`, sent by the caller after its commit.
//!   A delivery that is never acked stays in the group's pending-entries list
//!   and any live member takes it over with `XAUTOCLAIM` once it has been idle
//!   for `REDIS_STREAMS_CLAIM_IDLE_MS` — flagged `redelivered`. A nack leaves
//!   the entry pending the same way. With several members, order holds per
//!   member only, and a claimed entry arrives after newer ones.
//! * **Live delivery** (instance groups) has no group at all: `XREAD` from the
//!   last id it saw, so after a lost connection it resumes without a gap as
//!   long as the entries are still retained. Only when it cannot prove that
//!   (entries trimmed past its position, the stream lost in a restart
//!   without persistence) does it bump the subscription's resumption counter,
//!   and the gateway catches up from the DB.
//! * Blocking reads (`BLOCK`) hold a connection, so every subscription has a
//!   dedicated one; publishes and acks share one multiplexed connection.
//!
//! The connection settings (`REDIS_URL`, `REDIS_COMMAND_TIMEOUT_MS`,
//! `REDIS_RECONNECT_MAX_MS`) are the `BUS=redis` ones: the same server kind,
//! so switching between the two Redis modes changes `BUS` and nothing else.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::reconnect::{self, Backoff, SessionEnd};
use super::redis::RedisConfig;
use super::{
    Acker, AllRooms, BusError, Capabilities, ConsumerLag, Delivery, GroupKind, LocalRooms,
    MessageBus, Outgoing, RoomInterest, RoomScope, SubscribeOptions, Subscription,
};
use crate::protocol::RoomId;

/// Settings of the Redis Streams bus (the connection is `REDIS_URL`).
#[derive(Debug, Clone, clap::Args)]
pub struct RedisStreamsConfig {
    /// Prefix of every key this bus creates (`<prefix>stream:<n>`).
    #[arg(long, env = "REDIS_STREAMS_PREFIX", default_value = "chat-relay:")]
    pub redis_streams_prefix: String,
    /// Number of shard streams; a room always maps to the same one. Every
    /// relay and worker of one deployment must use the same value.
    #[arg(long, env = "REDIS_STREAMS_SHARDS", default_value_t = 8)]
    pub redis_streams_shards: u32,
    /// Approximate cap on entries per shard stream (`XADD MAXLEN ~`); 0 = no
    /// cap. Trimming does not wait for consumer groups: entries a group has
    /// not read yet are trimmed too.
    #[arg(long, env = "REDIS_STREAMS_MAXLEN", default_value_t = 100_000)]
    pub redis_streams_maxlen: u64,
    /// Keep entries for this long instead (`XADD MINID ~ <now - age>`), in ms;
    /// 0 = off. Set either this or `REDIS_STREAMS_MAXLEN`, not both.
    #[arg(long, env = "REDIS_STREAMS_MAX_AGE_MS", default_value_t = 0)]
    pub redis_streams_max_age_ms: u64,
    /// A pending (delivered, unacked) entry idle this long is taken over by a
    /// live member of its group (`XAUTOCLAIM`) and redelivered.
    #[arg(long, env = "REDIS_STREAMS_CLAIM_IDLE_MS", default_value_t = 10_000)]
    pub redis_streams_claim_idle_ms: u64,
    /// How long one blocking read (`XREAD`/`XREADGROUP BLOCK`) waits, in ms.
    #[arg(long, env = "REDIS_STREAMS_BLOCK_MS", default_value_t = 1000)]
    pub redis_streams_block_ms: u64,
    /// Entries fetched per read or claim (`COUNT`).
    #[arg(long, env = "REDIS_STREAMS_BATCH", default_value_t = 100)]
    pub redis_streams_batch: usize,
}

crate::default_from_env!(RedisStreamsConfig);

/// FNV-1a (64 bit): stable across processes and Rust versions, unlike the
/// std hasher, so every relay maps a room to the same shard.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The shard a room's entries go to.
pub fn shard_of(room: &RoomId, shards: u32) -> u32 {
    (fnv1a(room.as_str()) % u64::from(shards.max(1))) as u32
}

/// The key of shard `n`.
pub fn stream_key(prefix: &str, n: u32) -> String {
    format!("{prefix}stream:{n}")
}

/// Every shard key of a configuration, in shard order.
pub fn stream_keys(cfg: &RedisStreamsConfig) -> Vec<String> {
    (0..cfg.redis_streams_shards.max(1))
        .map(|n| stream_key(&cfg.redis_streams_prefix, n))
        .collect()
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("redis-streams: {e}"))
}

/// The fields of one entry (public for `brokerbench e2e`, which writes and
/// reads the same entries without this bus).
pub const ROOM_FIELD: &str = "room";
pub const PAYLOAD_FIELD: &str = "payload";

/// One stream entry as read: its id and, when it is one of ours, room and payload.
struct Entry {
    id: String,
    msg: Option<(RoomId, Bytes)>,
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

/// `[id, [field, value, …]]` → [`Entry`]; `None` for a nil (deleted) entry.
fn parse_entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = as_string(parts.first()?)?;
    let mut room = None;
    let mut payload = None;
    if let Some(Value::Array(fields)) = parts.get(1) {
        for kv in fields.chunks(2) {
            if let [k, val] = kv {
                match as_bytes(k) {
                    Some(k) if k == ROOM_FIELD.as_bytes() => {
                        room = as_string(val).and_then(|r| RoomId::parse(&r));
                    }
                    Some(k) if k == PAYLOAD_FIELD.as_bytes() => {
                        payload = as_bytes(val).map(Bytes::copy_from_slice);
                    }
                    _ => {}
                }
            }
        }
    }
    let msg = match (room, payload) {
        (Some(r), Some(p)) => Some((r, p)),
        _ => None,
    };
    Some(Entry { id, msg })
}

fn parse_entries(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// An `XREAD`/`XREADGROUP` reply: `[[key, [entry, …]], …]` or nil on timeout.
fn parse_read(v: &Value) -> Vec<(String, Vec<Entry>)> {
    let mut out = Vec::new();
    if let Value::Array(streams) = v {
        for s in streams {
            if let Value::Array(kv) = s
                && let (Some(k), Some(entries)) = (kv.first().and_then(as_string), kv.get(1))
            {
                out.push((k, parse_entries(entries)));
            }
        }
    }
    out
}

/// A flat `[name, value, …]` reply (XINFO) as pairs.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => as_string(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(items) => items
            .iter()
            .filter_map(|(k, v)| as_string(k).map(|k| (k, v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    pairs(v)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

pub struct RedisStreamsBus {
    redis: RedisConfig,
    cfg: RedisStreamsConfig,
    client: redis::Client,
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
    closed: CancellationToken,
}

impl RedisStreamsBus {
    pub async fn connect(
        redis: RedisConfig,
        cfg: RedisStreamsConfig,
    ) -> Result<RedisStreamsBus, BusError> {
        if cfg.redis_streams_maxlen > 0 && cfg.redis_streams_max_age_ms > 0 {
            return Err(BusError::Config(
                "set REDIS_STREAMS_MAXLEN or REDIS_STREAMS_MAX_AGE_MS, not both (set the other to 0)"
                    .into(),
            ));
        }
        if cfg.redis_streams_shards == 0 || cfg.redis_streams_batch == 0 {
            return Err(BusError::Config(
                "REDIS_STREAMS_SHARDS and REDIS_STREAMS_BATCH must be at least 1".into(),
            ));
        }
        let client = redis::Client::open(redis.redis_url.as_str())
            .map_err(|e| BusError::Config(format!("REDIS_URL: {e}")))?;
        let timeout = Duration::from_millis(redis.redis_command_timeout_ms);
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_max_delay(redis.redis_reconnect_max_ms);
        let conn = tokio::time::timeout(
            timeout * 5,
            ConnectionManager::new_with_config(client.clone(), mcfg),
        )
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
        let keys = Arc::new(stream_keys(&cfg));
        Ok(RedisStreamsBus {
            redis,
            cfg,
            client,
            conn,
            keys,
            closed: CancellationToken::new(),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis.redis_command_timeout_ms)
    }

    /// The shard keys this bus reads and writes.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    fn reader(&self) -> Reader {
        Reader {
            client: self.client.clone(),
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            timeout: self.timeout(),
            block: Duration::from_millis(self.cfg.redis_streams_block_ms),
            batch: self.cfg.redis_streams_batch,
            claim_idle_ms: self.cfg.redis_streams_claim_idle_ms,
        }
    }
}

/// The last handle gone, every subscription loop of this bus stops.
impl Drop for RedisStreamsBus {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// What a subscription's reading task needs.
#[derive(Clone)]
struct Reader {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
    timeout: Duration,
    block: Duration,
    batch: usize,
    claim_idle_ms: u64,
}

impl Reader {
    /// A dedicated connection for blocking reads: its response timeout
    /// leaves room for the `BLOCK` time. It is named (`CLIENT SETNAME`) after
    /// its role, so `CLIENT LIST` shows which reader is which.
    async fn dedicated(&self, name: &str) -> Result<MultiplexedConnection, BusError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.block + self.timeout);
        let mut conn = tokio::time::timeout(
            self.timeout * 3,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("SETNAME").arg(name);
        self.query::<()>(&mut conn, &cmd, self.timeout).await?;
        Ok(conn)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        cmd: &redis::Cmd,
        wait: Duration,
    ) -> Result<T, BusError> {
        tokio::time::timeout(wait, cmd.query_async::<T>(conn))
            .await
            .map_err(|_| unavailable("command timed out"))?
            .map_err(unavailable)
    }

    /// Creates the group on every shard (from the oldest entry; an existing
    /// group keeps its position).
    async fn create_group(
        &self,
        conn: &mut MultiplexedConnection,
        group: &str,
    ) -> Result<(), BusError> {
        for key in self.keys.iter() {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(key)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM");
            match tokio::time::timeout(self.timeout, cmd.query_async::<()>(conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.code() == Some("BUSYGROUP") => {}
                Ok(Err(e)) => return Err(unavailable(e)),
                Err(_) => return Err(unavailable("XGROUP CREATE timed out")),
            }
        }
        Ok(())
    }

    /// The id of the newest entry of every shard (`0-0` for an empty one):
    /// where a live reader starts.
    async fn last_ids(&self, conn: &mut MultiplexedConnection) -> Result<Vec<String>, BusError> {
        let mut ids = Vec::with_capacity(self.keys.len());
        for key in self.keys.iter() {
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
            let v: Value = self.query(conn, &cmd, self.timeout).await?;
            ids.push(
                parse_entries(&v)
                    .into_iter()
                    .next()
                    .map(|e| e.id)
                    .unwrap_or_else(|| "0-0".into()),
            );
        }
        Ok(ids)
    }

    /// Whether a live reader that last saw `last` on `key` may have missed
    /// entries: yes when that entry is gone (trimmed, or the stream was lost)
    /// unless it was exactly the last entry trimmed; and, for a reader that
    /// saw nothing yet, when the server restarted in between (it cannot tell
    /// what the lost stream held).
    async fn gap_after(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        last: &str,
        restarted: bool,
    ) -> Result<bool, BusError> {
        if last == "0-0" {
            return Ok(restarted);
        }
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key).arg(last).arg(last);
        let v: Value = self.query(conn, &cmd, self.timeout).await?;
        if !parse_entries(&v).is_empty() {
            return Ok(false);
        }
        let mut info = redis::cmd("XINFO");
        info.arg("STREAM").arg(key);
        match tokio::time::timeout(self.timeout, info.query_async::<Value>(conn)).await {
            Ok(Ok(v)) => {
                let max_deleted = field(&v, "max-deleted-entry-id").and_then(as_string);
                Ok(max_deleted.as_deref() != Some(last))
            }
            // No such key: the stream is gone.
            Ok(Err(_)) => Ok(true),
            Err(_) => Err(unavailable("XINFO timed out")),
        }
    }

    /// The server's `run_id`: it changes when Redis restarts.
    async fn run_id(&self, conn: &mut MultiplexedConnection) -> Result<String, BusError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info: String = self.query(conn, &cmd, self.timeout).await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_string())
    }
}

/// Acknowledges one group delivery with `XACK` (on the shared connection).
struct StreamAck {
    conn: ConnectionManager,
    key: String,
    group: String,
    id: String,
    timeout: Duration,
}

#[async_trait]
impl Acker for StreamAck {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.key).arg(&self.group).arg(&self.id);
        tokio::time::timeout(self.timeout, cmd.query_async::<i64>(&mut conn))
            .await
            .map_err(|_| unavailable("XACK timed out"))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// The entry stays pending: a member claims it once it has been idle for
    /// `REDIS_STREAMS_CLAIM_IDLE_MS`.
    async fn nack(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }

    /// One `XACK key group id…` per stream of the batch, all in one pipeline
    /// (one round trip): a worker's batch of 512 entries cost 512 commands
    /// and 512 awaits before. `XACK` names its ids, so an entry the worker
    /// still holds is never settled by accident, whatever its position.
    async fn ack_batch(self: Box<Self>, rest: Vec<Box<dyn Acker>>) -> Result<(), BusError> {
        let mut first_err = None;
        let (conn, timeout) = (self.conn.clone(), self.timeout);
        // (key, group) → ids, in the order first seen.
        let mut streams: Vec<((String, String), Vec<String>)> = Vec::new();
        let mut add = |a: StreamAck| {
            let k = (a.key, a.group);
            match streams.iter_mut().find(|(s, _)| *s == k) {
                Some((_, ids)) => ids.push(a.id),
                None => streams.push((k, vec![a.id])),
            }
        };
        let (ours, others) = super::own_ackers::<StreamAck>(rest);
        add(*self);
        ours.into_iter().for_each(&mut add);
        for a in others {
            if let Err(e) = a.ack().await {
                first_err.get_or_insert(e);
            }
        }
        let mut pipe = redis::pipe();
        for ((key, group), ids) in &streams {
            pipe.cmd("XACK").arg(key).arg(group).arg(ids);
        }
        let mut conn = conn;
        let res = tokio::time::timeout(timeout, pipe.query_async::<Vec<i64>>(&mut conn))
            .await
            .map_err(|_| unavailable("XACK timed out"))
            .and_then(|r| r.map_err(unavailable));
        metrics::counter!("bus_batch_acks_total", "backend" => "redis-streams", "mode" => "xack_per_stream")
            .increment(1);
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Sends a group's entries to the subscriber; `false` once it is gone.
async fn forward_group(
    tx: &mpsc::Sender<Delivery>,
    r: &Reader,
    group: &str,
    key: &str,
    entries: Vec<Entry>,
    redelivered: bool,
) -> bool {
    for e in entries {
        let ack = StreamAck {
            conn: r.conn.clone(),
            key: key.to_string(),
            group: group.to_string(),
            id: e.id,
            timeout: r.timeout,
        };
        match e.msg {
            Some((room, payload)) => {
                let d = Delivery::new(room, payload, redelivered, Box::new(ack));
                if tx.send(d).await.is_err() {
                    return false;
                }
            }
            None => {
                // Not ours (written by another program): ack so it does not
                // stay pending forever.
                tracing::warn!(key, "redis-streams: entry without room/payload skipped");
                let _ = Box::new(ack).ack().await;
            }
        }
    }
    true
}

/// One connected session of a shared-group consumer: claim idle pending
/// entries now and then, read new ones in between.
async fn pump_group(
    r: Reader,
    mut conn: MultiplexedConnection,
    group: String,
    consumer: String,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
) -> SessionEnd {
    let claim_every = Duration::from_millis((r.claim_idle_ms / 2).max(100));
    let mut next_claim = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_claim {
            for key in r.keys.iter() {
                let mut cursor = "0-0".to_string();
                loop {
                    let mut cmd = redis::cmd("XAUTOCLAIM");
                    cmd.arg(key)
                        .arg(&group)
                        .arg(&consumer)
                        .arg(r.claim_idle_ms)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(r.batch);
                    let v = tokio::select! {
                        _ = stop.cancelled() => return SessionEnd::Stopped,
                        v = r.query::<Value>(&mut conn, &cmd, r.timeout) => v,
                    };
                    let v = match v {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(error = %e, %group, "redis-streams: XAUTOCLAIM failed");
                            return SessionEnd::Lost;
                        }
                    };
                    let Value::Array(parts) = &v else { break };
                    let entries = parts.get(1).map(parse_entries).unwrap_or_default();
                    if let Some(Value::Array(deleted)) = parts.get(2)
                        && !deleted.is_empty()
                    {
                        tracing::warn!(
                            %group, key, n = deleted.len(),
                            "redis-streams: pending entries were trimmed before anyone acked them"
                        );
                        metrics::counter!("redis_streams_trimmed_pending_total")
                            .increment(deleted.len() as u64);
                    }
                    if !entries.is_empty() {
                        metrics::counter!("bus_redeliveries_total", "backend" => "redis-streams")
                            .increment(entries.len() as u64);
                    }
                    if !forward_group(&tx, &r, &group, key, entries, true).await {
                        return SessionEnd::Stopped;
                    }
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
            .arg(r.batch)
            .arg("BLOCK")
            .arg(r.block.as_millis() as u64)
            .arg("STREAMS");
        for key in r.keys.iter() {
            cmd.arg(key);
        }
        for _ in r.keys.iter() {
            cmd.arg(">");
        }
        let v = tokio::select! {
            _ = stop.cancelled() => return SessionEnd::Stopped,
            v = r.query::<Value>(&mut conn, &cmd, r.block + r.timeout) => v,
        };
        match v {
            Ok(v) => {
                for (key, entries) in parse_read(&v) {
                    if !forward_group(&tx, &r, &group, &key, entries, false).await {
                        return SessionEnd::Stopped;
                    }
                }
            }
            Err(e) => {
                // NOGROUP after a restart without persistence lands here too:
                // the reconnect re-creates the group.
                tracing::warn!(error = %e, %group, "redis-streams: XREADGROUP failed");
                return SessionEnd::Lost;
            }
        }
    }
}

/// Position of a live reader, kept across its reconnections.
struct LivePos {
    last: std::sync::Mutex<Vec<String>>,
    run_id: std::sync::Mutex<Option<String>>,
    resumed: watch::Sender<u64>,
}

impl LivePos {
    fn snapshot(&self) -> Vec<String> {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Opens a live session: on the first connect, records every shard's newest
/// id; on a reconnect, checks whether the reader can resume without a gap
/// and bumps the resumption counter when it cannot.
async fn connect_live(
    r: &Reader,
    pos: &LivePos,
    name: &str,
) -> Result<MultiplexedConnection, BusError> {
    let mut conn = r.dedicated(name).await?;
    let run_id = r.run_id(&mut conn).await?;
    let previous = pos.run_id.lock().ok().and_then(|g| g.clone());
    match previous {
        None => {
            let ids = r.last_ids(&mut conn).await?;
            if let Ok(mut l) = pos.last.lock() {
                *l = ids;
            }
        }
        Some(prev) => {
            let restarted = prev != run_id;
            let last = pos.snapshot();
            let mut gap = false;
            for (key, id) in r.keys.iter().zip(last.iter()) {
                if r.gap_after(&mut conn, key, id, restarted).await? {
                    gap = true;
                    break;
                }
            }
            if gap {
                tracing::warn!(
                    "redis-streams: live reader cannot resume without a gap; catching up from the DB"
                );
                pos.resumed.send_modify(|n| *n += 1);
            } else {
                tracing::info!("redis-streams: live reader resumes from the last id it saw");
            }
        }
    }
    if let Ok(mut g) = pos.run_id.lock() {
        *g = Some(run_id);
    }
    Ok(conn)
}

/// One connected session of a live reader: `XREAD BLOCK` from the last ids.
async fn pump_live(
    r: Reader,
    mut conn: MultiplexedConnection,
    pos: Arc<LivePos>,
    rooms: Arc<LocalRooms>,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
) -> SessionEnd {
    loop {
        let last = pos.snapshot();
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(r.batch)
            .arg("BLOCK")
            .arg(r.block.as_millis() as u64)
            .arg("STREAMS");
        for key in r.keys.iter() {
            cmd.arg(key);
        }
        for id in &last {
            cmd.arg(id);
        }
        let v = tokio::select! {
            _ = stop.cancelled() => return SessionEnd::Stopped,
            v = r.query::<Value>(&mut conn, &cmd, r.block + r.timeout) => v,
        };
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "redis-streams: live XREAD failed");
                return SessionEnd::Lost;
            }
        };
        for (key, entries) in parse_read(&v) {
            let Some(i) = r.keys.iter().position(|k| *k == key) else {
                continue;
            };
            for e in entries {
                if let Some((room, payload)) = e.msg
                    && rooms.contains(&room)
                    && tx.send(Delivery::unacked(room, payload)).await.is_err()
                {
                    return SessionEnd::Stopped;
                }
                if let Ok(mut l) = pos.last.lock()
                    && let Some(slot) = l.get_mut(i)
                {
                    *slot = e.id;
                }
            }
        }
    }
}

#[async_trait]
impl MessageBus for RedisStreamsBus {
    fn backend(&self) -> &'static str {
        "redis-streams"
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
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let key = &self.keys
            [shard_of(&msg.room, self.cfg.redis_streams_shards) as usize % self.keys.len()];
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key);
        if self.cfg.redis_streams_max_age_ms > 0 {
            let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
            let min = now.saturating_sub(self.cfg.redis_streams_max_age_ms);
            cmd.arg("MINID").arg("~").arg(min);
        } else if self.cfg.redis_streams_maxlen > 0 {
            cmd.arg("MAXLEN")
                .arg("~")
                .arg(self.cfg.redis_streams_maxlen);
        }
        cmd.arg("*")
            .arg(ROOM_FIELD)
            .arg(msg.room.as_str())
            .arg(PAYLOAD_FIELD)
            .arg(&msg.payload[..]);
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.timeout(), cmd.query_async::<String>(&mut conn))
            .await
            .map_err(|_| unavailable("XADD timed out"))?
            .map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let (tx, rx) = mpsc::channel(1024);
        let stop = self.closed.child_token();
        let r = self.reader();
        let backoff = Backoff::capped_ms(self.redis.redis_reconnect_max_ms);
        let ready_timeout = self.timeout() * 5;
        match opts.kind {
            GroupKind::Shared => {
                let group = opts.group.clone();
                let consumer = ulid::Ulid::new().to_string().to_lowercase();
                let (cr, cg) = (r.clone(), group.clone());
                let name = format!("chat-relay:group:{group}:{consumer}");
                let pump_stop = stop.clone();
                reconnect::spawn_session(
                    "redis-streams",
                    format!("group {group} consumer {consumer}"),
                    backoff,
                    stop.clone(),
                    ready_timeout,
                    move || {
                        let (r, group, name) = (cr.clone(), cg.clone(), name.clone());
                        async move {
                            let mut conn = r.dedicated(&name).await?;
                            r.create_group(&mut conn, &group).await?;
                            Ok(conn)
                        }
                    },
                    move |conn| {
                        pump_group(
                            r.clone(),
                            conn,
                            group.clone(),
                            consumer.clone(),
                            tx.clone(),
                            pump_stop.clone(),
                        )
                    },
                )
                .await?;
                let interest: Arc<dyn RoomInterest> = Arc::new(AllRooms);
                Ok(Subscription::new(rx, interest, Some(stop.drop_guard())))
            }
            GroupKind::Instance => {
                let (resumed_tx, resumed_rx) = watch::channel(0u64);
                let pos = Arc::new(LivePos {
                    last: std::sync::Mutex::new(Vec::new()),
                    run_id: std::sync::Mutex::new(None),
                    resumed: resumed_tx,
                });
                let rooms = Arc::new(LocalRooms::default());
                let (cr, cpos) = (r.clone(), pos.clone());
                let (prooms, pump_stop) = (rooms.clone(), stop.clone());
                let name = format!("chat-relay:live:{}", opts.group);
                // The session's own counter goes up on every reconnect; this
                // bus reports only reconnects that may have missed entries.
                let _ = reconnect::spawn_session(
                    "redis-streams",
                    format!("live {}", opts.group),
                    backoff,
                    stop.clone(),
                    ready_timeout,
                    move || {
                        let (r, pos, name) = (cr.clone(), cpos.clone(), name.clone());
                        async move { connect_live(&r, &pos, &name).await }
                    },
                    move |conn| {
                        pump_live(
                            r.clone(),
                            conn,
                            pos.clone(),
                            prooms.clone(),
                            tx.clone(),
                            pump_stop.clone(),
                        )
                    },
                )
                .await?;
                let interest: Arc<dyn RoomInterest> = match opts.scope {
                    RoomScope::Dynamic => rooms,
                    RoomScope::All => Arc::new(AllRooms),
                };
                Ok(Subscription::new(rx, interest, Some(stop.drop_guard()))
                    .with_resumptions(resumed_rx))
            }
        }
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

    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        Some(self)
    }
}

#[async_trait]
impl ConsumerLag for RedisStreamsBus {
    /// Entries `group` has not acked (the sum of `XINFO GROUPS` `lag` +
    /// `pending` over the shards); `None` when Redis cannot tell (after
    /// trimming or deletions it reports nil).
    async fn lag(&self, group: &str) -> Option<i64> {
        // Not yet delivered to the group (`lag`) plus delivered and not acked
        // (`pending`, the group's PEL): what the group has not consumed, as
        // Kafka's end minus committed counts it.
        self.group_sum(group, &["lag", "pending"]).await
    }

    async fn undelivered(&self, group: &str) -> Option<i64> {
        self.group_sum(group, &["lag"]).await
    }
}

impl RedisStreamsBus {
    /// The sum of `XINFO GROUPS` fields `names` of `group` over the shards;
    /// `None` when Redis cannot tell (a field nil after trimming).
    async fn group_sum(&self, group: &str, names: &[&str]) -> Option<i64> {
        let mut conn = self.conn.clone();
        let mut total = 0;
        for key in self.keys.iter() {
            let mut cmd = redis::cmd("XINFO");
            cmd.arg("GROUPS").arg(key);
            let v: Value = tokio::time::timeout(self.timeout(), cmd.query_async(&mut conn))
                .await
                .ok()?
                .ok()?;
            let Value::Array(groups) = v else {
                return None;
            };
            let g = groups
                .iter()
                .find(|g| field(g, "name").and_then(as_string).as_deref() == Some(group))?;
            for name in names {
                total += field(g, name).and_then(as_int)?;
            }
        }
        Some(total)
    }
}

/// Used by `chat-relay replay`: what a group looks like on one shard.
pub(crate) struct GroupOnShard {
    pub last_delivered: String,
    /// `(consumer, pending, idle ms)`.
    pub consumers: Vec<(String, i64, i64)>,
}

/// `XINFO GROUPS` + `XINFO CONSUMERS` of `group` on `key`; `None` when the
/// group does not exist there.
pub(crate) async fn group_on_shard(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    timeout: Duration,
) -> Result<Option<GroupOnShard>, BusError> {
    let mut cmd = redis::cmd("XINFO");
    cmd.arg("GROUPS").arg(key);
    let v = tokio::time::timeout(timeout, cmd.query_async::<Value>(conn))
        .await
        .map_err(|_| unavailable("XINFO timed out"))?;
    let v = match v {
        Ok(v) => v,
        // No such key: no group either.
        Err(e) if e.kind() == redis::ErrorKind::ResponseError => return Ok(None),
        Err(e) => return Err(unavailable(e)),
    };
    let Value::Array(groups) = v else {
        return Ok(None);
    };
    let Some(g) = groups
        .iter()
        .find(|g| field(g, "name").and_then(as_string).as_deref() == Some(group))
    else {
        return Ok(None);
    };
    let last_delivered = field(g, "last-delivered-id")
        .and_then(as_string)
        .unwrap_or_else(|| "0-0".into());
    let mut cmd = redis::cmd("XINFO");
    cmd.arg("CONSUMERS").arg(key).arg(group);
    let v: Value = tokio::time::timeout(timeout, cmd.query_async(conn))
        .await
        .map_err(|_| unavailable("XINFO timed out"))?
        .map_err(unavailable)?;
    let consumers = match &v {
        Value::Array(cs) => cs
            .iter()
            .map(|c| {
                (
                    field(c, "name").and_then(as_string).unwrap_or_default(),
                    field(c, "pending").and_then(as_int).unwrap_or(0),
                    field(c, "idle").and_then(as_int).unwrap_or(i64::MAX),
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Some(GroupOnShard {
        last_delivered,
        consumers,
    }))
}

/// A connection for admin commands (`chat-relay replay`).
pub(crate) async fn admin_connection(redis: &RedisConfig) -> Result<ConnectionManager, BusError> {
    let client = redis::Client::open(redis.redis_url.as_str())
        .map_err(|e| BusError::Config(format!("REDIS_URL: {e}")))?;
    let t = Duration::from_millis(redis.redis_command_timeout_ms);
    let mcfg = ConnectionManagerConfig::new()
        .set_connection_timeout(t)
        .set_response_timeout(t)
        .set_number_of_retries(1);
    tokio::time::timeout(t * 5, ConnectionManager::new_with_config(client, mcfg))
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_always_maps_to_the_same_shard_and_rooms_spread() {
        let rooms: Vec<RoomId> = (0..200)
            .filter_map(|i| RoomId::parse(&format!("chat.r{i}")))
            .collect();
        let mut used = std::collections::HashSet::new();
        for r in &rooms {
            let s = shard_of(r, 8);
            assert_eq!(s, shard_of(r, 8));
            assert!(s < 8);
            used.insert(s);
        }
        assert_eq!(used.len(), 8, "200 rooms use every one of 8 shards");
        // Fixed value: a change of the hash would split rooms across versions.
        assert_eq!(fnv1a("chat.lobby"), 0x30ef_5189_bc5d_d5dd);
    }
}
