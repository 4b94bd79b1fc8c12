//! `chat-relay replay`: the admin command that rewinds a stopped consumer
//! group (Kafka, NATS JetStream, Redis Streams), so its restarted workers
//! reprocess the log (rebuild the DB, recount analytics). It is not part of
//! the message path: the relay itself never rewinds a group. Only these three
//! keep a log to replay ([`replay`], [`replay_redis_streams`]); the other
//! backends say so in their capabilities.
//!
//! JetStream cannot move a durable consumer's position in place: the replay
//! deletes the group's consumer and creates it again with the same name and
//! settings and a new start (`DeliverPolicy::All`, `ByStartSequence`,
//! `ByStartTime`). Redis Streams moves the group with `XGROUP SETID`.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::bus::kafka::{KafkaConfig, plain_consumer, unavailable};
use crate::bus::nats::{self, NatsConfig};
use crate::bus::redis::RedisConfig;
use crate::bus::redis_streams::{self, RedisStreamsConfig};
use crate::bus::{BusError, BusKind};

/// Where `chat-relay replay` rewinds a group to.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "replay_from", required = true, multiple = false)]
pub struct ReplayFrom {
    /// Rewind every partition to its first retained message.
    #[arg(long)]
    pub from_beginning: bool,
    /// Rewind the listed partitions to the given offsets: `0:120,5:7`.
    #[arg(long)]
    pub from_offset: Option<String>,
    /// Rewind every partition to the first message at or after this time (RFC 3339).
    #[arg(long)]
    pub from_time: Option<String>,
    /// NATS: restart the group at this stream sequence.
    #[arg(long)]
    pub from_sequence: Option<u64>,
}

/// `chat-relay replay`: rewinds a stopped consumer group.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The consumer group to rewind (e.g. db-writer or analytics). It must be stopped.
    #[arg(long)]
    pub group: String,
    #[command(flatten)]
    pub from: ReplayFrom,
    /// Which backend's group to rewind: `kafka`, `nats` or `redis-streams`.
    #[arg(long, env = "BUS", value_enum, default_value = "kafka")]
    pub bus: BusKind,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub redis_streams: RedisStreamsConfig,
}

/// What a replay changed: partition → (old committed offset, new offset) on
/// Kafka; on NATS the consumer and what it had delivered / where it restarts.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub partitions: Vec<(i32, Option<i64>, i64)>,
    pub consumer: Option<NatsReplay>,
}

/// A NATS replay: the recreated consumer, the last stream sequence it had
/// delivered, and where it starts now.
#[derive(Debug, Clone)]
pub struct NatsReplay {
    pub consumer: String,
    pub delivered: u64,
    pub start: String,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(c) = &self.consumer {
            writeln!(
                f,
                "consumer {}: had delivered up to stream sequence {} -> restarts at {}",
                c.consumer, c.delivered, c.start
            )?;
        }
        for (p, old, new) in &self.partitions {
            let old = old.map(|o| o.to_string()).unwrap_or_else(|| "none".into());
            writeln!(f, "partition {p}: {old} -> {new}")?;
        }
        Ok(())
    }
}

/// Rewinds `args.group`'s committed offsets. Fails with a clear message when
/// the group has active members: a running consumer would overwrite the
/// rewound offsets with its own on its next commit.
pub async fn replay(args: &ReplayArgs) -> Result<ReplayReport, BusError> {
    match args.bus {
        BusKind::Kafka => {}
        BusKind::Nats => return replay_nats(args).await,
        other => {
            return Err(BusError::Config(format!(
                "BUS={other:?} keeps no log to replay here (kafka and nats do; redis-streams: replay_redis_streams)"
            )));
        }
    }
    if args.from.from_sequence.is_some() {
        return Err(BusError::Config(
            "--from-sequence is for NATS; on Kafka use --from-offset partition:offset".into(),
        ));
    }
    let args = args.clone();
    tokio::task::spawn_blocking(move || replay_blocking(&args))
        .await
        .map_err(unavailable)?
}

fn replay_blocking(args: &ReplayArgs) -> Result<ReplayReport, BusError> {
    let cfg = &args.kafka;
    let t = Duration::from_secs(5);
    let c = plain_consumer(cfg, &args.group)?;
    let listed = c.fetch_group_list(Some(&args.group), t);
    match &listed {
        Ok(g) => tracing::debug!(
            groups = ?g.groups().iter().map(|g| (g.name().to_string(), g.state().to_string(), g.members().len())).collect::<Vec<_>>(),
            "replay: group list"
        ),
        Err(e) => tracing::debug!(error = %e, "replay: group list unavailable"),
    }
    if let Ok(groups) = listed
        && let Some(g) = groups.groups().iter().find(|g| g.name() == args.group)
        && !g.members().is_empty()
    {
        return Err(BusError::Rejected(format!(
            "consumer group {} is active ({} members, state {}): stop the workers of this group first, then replay",
            args.group,
            g.members().len(),
            g.state()
        )));
    }
    let md = c
        .fetch_metadata(Some(&cfg.kafka_topic), t)
        .map_err(unavailable)?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|tp| tp.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(BusError::Config(format!(
            "topic {} has no partitions",
            cfg.kafka_topic
        )));
    }
    let mut all = TopicPartitionList::new();
    for p in &parts {
        all.add_partition(&cfg.kafka_topic, *p);
    }
    let old: HashMap<i32, Option<i64>> = c
        .committed_offsets(all.clone(), t)
        .map_err(unavailable)?
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            )
        })
        .collect();
    let mut target: Vec<(i32, i64)> = Vec::new();
    if args.from.from_beginning {
        for p in &parts {
            let (low, _) = c
                .fetch_watermarks(&cfg.kafka_topic, *p, t)
                .map_err(unavailable)?;
            target.push((*p, low));
        }
    } else if let Some(list) = &args.from.from_offset {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let (p, o) = item.trim().split_once(':').ok_or_else(|| {
                BusError::Config(format!(
                    "bad --from-offset item {item:?}: want partition:offset"
                ))
            })?;
            let p: i32 = p
                .parse()
                .map_err(|_| BusError::Config(format!("bad partition in {item:?}")))?;
            let o: i64 = o
                .parse()
                .map_err(|_| BusError::Config(format!("bad offset in {item:?}")))?;
            if !parts.contains(&p) {
                return Err(BusError::Config(format!("partition {p} does not exist")));
            }
            target.push((p, o));
        }
    } else if let Some(ts) = &args.from.from_time {
        let at = chrono::DateTime::parse_from_rfc3339(ts)
            .map_err(|e| BusError::Config(format!("--from-time: {e}")))?
            .timestamp_millis();
        let mut q = TopicPartitionList::new();
        for p in &parts {
            q.add_partition_offset(&cfg.kafka_topic, *p, Offset::Offset(at))
                .map_err(unavailable)?;
        }
        let found = c.offsets_for_times(q, t).map_err(unavailable)?;
        for e in found.elements() {
            let o = match e.offset() {
                Offset::Offset(o) => o,
                // No message at or after that time: start at the end.
                _ => {
                    c.fetch_watermarks(&cfg.kafka_topic, e.partition(), t)
                        .map_err(unavailable)?
                        .1
                }
            };
            target.push((e.partition(), o));
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &target {
        tpl.add_partition_offset(&cfg.kafka_topic, *p, Offset::Offset(*o))
            .map_err(unavailable)?;
    }
    c.commit(&tpl, CommitMode::Sync).map_err(|e| match e {
        KafkaError::ConsumerCommit(code)
            if matches!(
                code,
                RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress
            ) =>
        {
            BusError::Rejected(format!(
                "consumer group {} is active: stop its workers first, then replay ({code})",
                args.group
            ))
        }
        e => unavailable(e),
    })?;
    let mut report = ReplayReport::default();
    target.sort();
    for (p, o) in target {
        report
            .partitions
            .push((p, old.get(&p).copied().flatten(), o));
    }
    Ok(report)
}

/// Recreates the group's durable consumer at the requested start. Refused
/// while the consumer has pull requests waiting (a member is running: it
/// would keep pulling from the old position until it notices).
async fn replay_nats(args: &ReplayArgs) -> Result<ReplayReport, BusError> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    let cfg = &args.nats;
    let (policy, start) = if args.from.from_beginning {
        (DeliverPolicy::All, "the first retained message".to_string())
    } else if let Some(seq) = args.from.from_sequence {
        (
            DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            format!("stream sequence {seq}"),
        )
    } else if let Some(ts) = &args.from.from_time {
        let at = async_nats::datetime::parse_rfc3339(ts)
            .map_err(|e| BusError::Config(format!("--from-time: {e}")))?;
        (
            DeliverPolicy::ByStartTime { start_time: at },
            format!("the first message at or after {ts}"),
        )
    } else {
        return Err(BusError::Config(
            "on NATS use --from-beginning, --from-sequence or --from-time".into(),
        ));
    };
    let client = nats::connect_client(cfg, "replay", None).await?;
    let js = nats::context(cfg, client);
    let stream = js
        .get_stream(&cfg.nats_stream)
        .await
        .map_err(|e| nats::unavailable(format!("stream {}: {e}", cfg.nats_stream)))?;
    let name = nats::consumer_name(&cfg.nats_consumer_prefix, &args.group);
    let info = stream
        .consumer_info(&name)
        .await
        .map_err(|e| BusError::Config(format!("consumer {name} of group {}: {e}", args.group)))?;
    if info.num_waiting > 0 {
        return Err(BusError::Rejected(format!(
            "consumer group {} is active ({} pull requests waiting on {name}): stop the workers of this group first, then replay",
            args.group, info.num_waiting
        )));
    }
    stream
        .delete_consumer(&name)
        .await
        .map_err(|e| nats::unavailable(format!("deleting consumer {name}: {e}")))?;
    stream
        .create_consumer(nats::consumer_config(cfg, &name, policy))
        .await
        .map_err(|e| nats::unavailable(format!("creating consumer {name}: {e}")))?;
    Ok(ReplayReport {
        partitions: vec![],
        consumer: Some(NatsReplay {
            consumer: name,
            delivered: info.delivered.stream_sequence,
            start,
        }),
    })
}

/// What a Redis Streams replay changed: stream key → (old last-delivered id
/// of the group, new one). Entries after the new id are delivered again.
#[derive(Debug, Clone, Default)]
pub struct StreamsReplayReport {
    pub streams: Vec<(String, Option<String>, String)>,
}

impl std::fmt::Display for StreamsReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (key, old, new) in &self.streams {
            let old = old.as_deref().unwrap_or("none");
            writeln!(f, "stream {key}: {old} -> {new}")?;
        }
        Ok(())
    }
}

/// Rewinds Redis Streams consumer group `group` on every shard with `XGROUP
/// SETID`. `--from-beginning` re-reads every retained entry,
/// `--from-time` every entry at or after that time (ids are milliseconds),
/// `--from-offset 0:1700000000000-0,3:…` every entry *after* the given id of
/// the given shard. Refused while a consumer of the group was active within
/// `REDIS_STREAMS_CLAIM_IDLE_MS` (a running worker would keep reading from
/// its own position); entries still pending for dead consumers stay pending
/// and are claimed (and reprocessed) by the restarted workers.
pub async fn replay_redis_streams(
    group: &str,
    from: &ReplayFrom,
    redis: &RedisConfig,
    cfg: &RedisStreamsConfig,
) -> Result<StreamsReplayReport, BusError> {
    if from.from_sequence.is_some() {
        return Err(BusError::Config(
            "--from-sequence is for NATS; on Redis Streams use --from-offset shard:id".into(),
        ));
    }
    let t = Duration::from_millis(redis.redis_command_timeout_ms);
    let mut conn = redis_streams::admin_connection(redis).await?;
    let keys = redis_streams::stream_keys(cfg);
    let mut old = Vec::with_capacity(keys.len());
    for key in &keys {
        let g = redis_streams::group_on_shard(&mut conn, key, group, t).await?;
        if let Some(g) = &g
            && let Some((name, _, idle)) = g
                .consumers
                .iter()
                .find(|(_, _, idle)| (*idle as u64) < cfg.redis_streams_claim_idle_ms)
        {
            return Err(BusError::Rejected(format!(
                "consumer group {group} is active (consumer {name} on {key} was seen {idle} ms ago): stop the workers of this group first, then replay"
            )));
        }
        old.push(g.map(|g| g.last_delivered));
    }
    if old.iter().all(Option::is_none) {
        return Err(BusError::Config(format!(
            "consumer group {group} does not exist on the streams {}stream:* (REDIS_STREAMS_PREFIX)",
            cfg.redis_streams_prefix
        )));
    }
    let mut target: Vec<(usize, String)> = Vec::new();
    if from.from_beginning {
        target = (0..keys.len()).map(|i| (i, "0".to_string())).collect();
    } else if let Some(list) = &from.from_offset {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let (s, id) = item.trim().split_once(':').ok_or_else(|| {
                BusError::Config(format!("bad --from-offset item {item:?}: want shard:id"))
            })?;
            let s: usize = s
                .parse()
                .map_err(|_| BusError::Config(format!("bad shard in {item:?}")))?;
            if s >= keys.len() {
                return Err(BusError::Config(format!("shard {s} does not exist")));
            }
            target.push((s, id.to_string()));
        }
    } else if let Some(ts) = &from.from_time {
        let at = chrono::DateTime::parse_from_rfc3339(ts)
            .map_err(|e| BusError::Config(format!("--from-time: {e}")))?
            .timestamp_millis();
        // The largest id before `at-0`: entries at or after `at` come again.
        let id = if at <= 0 {
            "0".to_string()
        } else {
            format!("{}-{}", at - 1, u64::MAX)
        };
        target = (0..keys.len()).map(|i| (i, id.clone())).collect();
    }
    let mut report = StreamsReplayReport::default();
    for (i, id) in target {
        let key = &keys[i];
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("SETID").arg(key).arg(group).arg(&id);
        tokio::time::timeout(t, cmd.query_async::<()>(&mut conn))
            .await
            .map_err(|_| redis_streams::unavailable("XGROUP SETID timed out"))?
            .map_err(|e| BusError::Rejected(format!("XGROUP SETID {key} {group} {id}: {e}")))?;
        report
            .streams
            .push((key.clone(), old.get(i).cloned().flatten(), id));
    }
    Ok(report)
}
