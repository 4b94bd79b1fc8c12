//! NATS JetStream with async-nats, as `src/bus/nats.rs` sets it up: one
//! file-backed stream over `<prefix>.>` with the relay's retention, replicas
//! and duplicate window (from `NatsConfig`); publishes written on the
//! instance's one connection in call order, each with its `Nats-Msg-Id`
//! (the relay's `msg_id` of the payload), confirmed by the JetStream ack
//! within `NATS_PUBLISH_TIMEOUT_MS`; per instance one core subscription per
//! room subject on that same connection, each forwarding into one channel as
//! the relay's per-room tasks do; the worker groups as durable pull consumers
//! (the relay's `consumer_config`: explicit ack, ack_wait, max_deliver,
//! max_ack_pending) pulled in batches of `NATS_PULL_BATCH`, sharing one
//! connection (the worker process's bus), each delivery acked after decoding.
//!
//! Stream, subject prefix and consumer prefix are unique per run; the stream
//! (and with it its consumers) is deleted at the end.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use chat_relay::bus::nats::{
    NatsConfig, consumer_config, consumer_name, context, msg_id, room_of, subject,
};
use chat_relay::bus::reconnect::Backoff;
use chat_relay::protocol::RoomId;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::stats::{LiveStats, WorkerStats};
use super::{Consumer, Pending, Publish};

pub struct Nats {
    cfg: NatsConfig,
    /// Creates and deletes the stream.
    admin: jetstream::Context,
    /// Per relay instance its bus connection: its publishes and its live
    /// subscriptions share it, as they share the relay's `NatsBus`.
    instances: Mutex<HashMap<usize, async_nats::Client>>,
    /// The worker process's bus connection, shared by both groups.
    workers: Mutex<Option<async_nats::Client>>,
}

/// A client with the relay's connection options (unlimited reconnects with
/// its capped backoff, the API timeout as request timeout).
async fn connect(cfg: &NatsConfig, name: &str) -> anyhow::Result<async_nats::Client> {
    let backoff = Backoff::capped_ms(cfg.nats_reconnect_max_ms);
    let opts = async_nats::ConnectOptions::new()
        .name(format!("brokerbench {} {name}", cfg.nats_stream))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_millis(cfg.nats_publish_timeout_ms)))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempt| backoff.delay(attempt as u32));
    tokio::time::timeout(Duration::from_secs(10), opts.connect(cfg.nats_url.as_str()))
        .await
        .map_err(|_| anyhow::anyhow!("nats connect timed out"))?
        .map_err(|e| anyhow::anyhow!("nats connect: {e}"))
}

impl Nats {
    pub async fn setup(mut cfg: NatsConfig, run: &str) -> anyhow::Result<Nats> {
        cfg.nats_stream = format!("brokerbench-{run}");
        cfg.nats_subject_prefix = format!("brokerbench.{run}");
        cfg.nats_consumer_prefix = format!("brokerbench-{run}-");
        let admin = context(&cfg, connect(&cfg, "setup").await?);
        // The relay's stream (`NatsBus::connect`), created fresh.
        admin
            .create_stream(stream::Config {
                name: cfg.nats_stream.clone(),
                subjects: vec![format!("{}.>", cfg.nats_subject_prefix)],
                storage: stream::StorageType::File,
                max_age: Duration::from_millis(cfg.nats_max_age_ms),
                duplicate_window: Duration::from_millis(cfg.nats_duplicate_window_ms),
                num_replicas: cfg.nats_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", cfg.nats_stream))?;
        Ok(Nats {
            cfg,
            admin,
            instances: Mutex::new(HashMap::new()),
            workers: Mutex::new(None),
        })
    }

    async fn instance_client(&self, instance: usize) -> anyhow::Result<async_nats::Client> {
        let mut m = self.instances.lock().await;
        if let Some(c) = m.get(&instance) {
            return Ok(c.clone());
        }
        let c = connect(&self.cfg, &format!("instance {instance}")).await?;
        m.insert(instance, c.clone());
        Ok(c)
    }

    async fn worker_client(&self) -> anyhow::Result<async_nats::Client> {
        let mut w = self.workers.lock().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.cfg, "workers").await?;
        *w = Some(c.clone());
        Ok(c)
    }

    pub async fn producer(&self, instance: usize) -> anyhow::Result<NatsProducer> {
        let client = self.instance_client(instance).await?;
        Ok(NatsProducer {
            js: context(&self.cfg, client.clone()),
            client,
            prefix: self.cfg.nats_subject_prefix.clone(),
            timeout: Duration::from_millis(self.cfg.nats_publish_timeout_ms),
        })
    }

    pub async fn live(
        &self,
        instance: usize,
        rooms: &[RoomId],
        mut stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        let client = self.instance_client(instance).await?;
        // The relay's subscription channel.
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        for r in rooms {
            let mut sub = client
                .subscribe(subject(&self.cfg.nats_subject_prefix, r))
                .await?;
            let (tx, prefix, stop) = (
                tx.clone(),
                self.cfg.nats_subject_prefix.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = sub.next() => m,
                    };
                    let Some(m) = m else { break };
                    if room_of(&prefix, m.subject.as_str()).is_none() {
                        continue;
                    }
                    if tx.send(m.payload).await.is_err() {
                        break;
                    }
                }
                let _ = sub.unsubscribe().await;
            });
        }
        // The server has every SUB once it answers the PING.
        tokio::time::timeout(
            Duration::from_millis(self.cfg.nats_publish_timeout_ms),
            client.flush(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("nats flush timed out"))??;
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let p = tokio::select! {
                    _ = stop.cancelled() => break,
                    p = rx.recv() => p,
                };
                let Some(p) = p else { break };
                stats.record(&p);
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
        let js = context(&self.cfg, self.worker_client().await?);
        let stream = js
            .get_stream(&self.cfg.nats_stream)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.cfg.nats_stream))?;
        let name = consumer_name(&self.cfg.nats_consumer_prefix, group);
        let consumer = stream
            .get_or_create_consumer(
                &name,
                consumer_config(&self.cfg, &name, consumer::DeliverPolicy::All),
            )
            .await
            .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
        // The relay's pull session (`start_pull`).
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.cfg.nats_pull_batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
        let prefix = self.cfg.nats_subject_prefix.clone();
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break,
                    n = messages.next() => n,
                };
                let m = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        use consumer::pull::MessagesErrorKind as K;
                        match e.kind() {
                            // The stream re-pulls by itself (as the relay reads it).
                            K::MissingHeartbeat | K::Pull | K::Other => continue,
                            _ => {
                                eprintln!("nats worker pull error: {e}");
                                break;
                            }
                        }
                    }
                    None => break,
                };
                let (m, acker) = m.split();
                if room_of(&prefix, m.subject.as_str()).is_some() {
                    stats.record(&m.payload);
                }
                if let Err(e) = acker.ack().await {
                    eprintln!("nats ack: {e}");
                }
            }
            stats
        });
        Ok(Consumer { unique, task })
    }

    /// Deletes the run's stream (its consumers go with it).
    pub async fn teardown(&self) {
        if let Err(e) = self.admin.delete_stream(&self.cfg.nats_stream).await {
            eprintln!("nats: stream {} not deleted: {e}", self.cfg.nats_stream);
        }
    }

    pub fn settings(&self) -> serde_json::Value {
        let c = &self.cfg;
        json!({"stream": c.nats_stream, "storage": "file", "replicas": c.nats_replicas,
               "max_age_ms": c.nats_max_age_ms, "duplicate_window_ms": c.nats_duplicate_window_ms,
               "publish": "JetStream ack awaited, Nats-Msg-Id header, one connection per instance",
               "publish_timeout_ms": c.nats_publish_timeout_ms,
               "live": "core subscription per room, on the instance's connection",
               "workers": "durable pull consumers, explicit ack, one shared connection",
               "ack_wait_ms": c.nats_ack_wait_ms, "max_deliver": c.nats_max_deliver,
               "max_ack_pending": c.nats_max_ack_pending, "pull_batch": c.nats_pull_batch})
    }
}

pub struct NatsProducer {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    timeout: Duration,
}

impl Publish for NatsProducer {
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>> {
        Box::pin(async move {
            // The relay answers at once instead of letting the client buffer.
            if self.client.connection_state() != async_nats::connection::State::Connected {
                return Err("nats: not connected".to_string());
            }
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = msg_id(&payload) {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            }
            // Returns once the message is written on the connection, in call
            // order (the relay's `submit`); the JetStream ack follows.
            let ack = tokio::time::timeout(
                self.timeout,
                self.js.publish_with_headers(
                    subject(&self.prefix, room),
                    headers,
                    Bytes::from(payload),
                ),
            )
            .await
            .map_err(|_| "nats: publish timed out".to_string())?
            .map_err(|e| e.to_string())?;
            let timeout = self.timeout;
            let pending: Pending = Box::pin(async move {
                match tokio::time::timeout(timeout, ack.into_future()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("nats: no JetStream ack in time".to_string()),
                }
            });
            Ok(pending)
        })
    }
}
