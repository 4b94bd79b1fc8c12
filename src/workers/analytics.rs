//! The analytics role: consumer group `analytics`. Counts every chat message
//! once per message id (the counted ids are stored in the same transaction as
//! the counts), so redeliveries and replays do not inflate the numbers, and
//! flags users who exceed `FLOOD_MAX_PER_MIN` in a room — announcing it in the
//! room with a high-priority system message.
//!
//! On a bus without competing consumers (Redis Pub/Sub) every instance would
//! see every message, so the role first takes a lease on the bus and only the
//! holder subscribes; the others stand by. Messages published during a
//! hand-over are not counted — Pub/Sub keeps nothing for absent listeners.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{next_batch, retry_backoff};
use crate::bus::reconnect::resubscribe_loop;
use crate::bus::{Delivery, Leases, MessageBus, Outgoing, Priority, SubscribeOptions};
use crate::config::AnalyticsConfig;
use crate::protocol::{BusEvent, ChatMessage, MessageKind};
use crate::store::{FloodFlag, Store};

const LEASE_TTL: Duration = Duration::from_secs(6);

/// Runs until `shutdown`. `holder` identifies this instance for the lease.
pub async fn run(
    bus: Arc<dyn MessageBus>,
    store: Store,
    cfg: AnalyticsConfig,
    holder: String,
    ids: Arc<crate::ids::IdGen>,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    // Groups that do not compete would count every message once per
    // instance: take the bus's lease first where it offers one.
    let lease = (!bus.capabilities().competing_consumers)
        .then(|| bus.leases())
        .flatten()
        .map(|l| Lease {
            leases: l,
            name: format!("analytics:{}", cfg.group),
            holder: holder.clone(),
        });
    let last_prune = std::sync::Mutex::new(std::time::Instant::now());
    while !shutdown.is_cancelled() {
        if let Some(lease) = &lease {
            match lease.renew().await {
                Ok(true) => {}
                standby => {
                    // Another instance computes (healthy), or the bus is down.
                    let _ = ready.send(matches!(standby, Ok(false)));
                    tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(LEASE_TTL / 3) => {} }
                    continue;
                }
            }
        }
        resubscribe_loop(
            "analytics",
            bus.as_ref(),
            SubscribeOptions::shared(cfg.group.clone()),
            &ready,
            &shutdown,
            |mut sub| {
                let (store, cfg, shutdown, bus, ids) = (
                    store.clone(),
                    cfg.clone(),
                    shutdown.clone(),
                    bus.clone(),
                    ids.clone(),
                );
                let (lease, last_prune) = (lease.as_ref(), &last_prune);
                async move {
                    let mut lease_checked = std::time::Instant::now();
                    loop {
                        let Some(batch) = next_batch(
                            &mut sub,
                            1000,
                            Duration::from_millis(cfg.flush_ms),
                            &shutdown,
                        )
                        .await
                        else {
                            return true;
                        };
                        if !batch.is_empty() {
                            count_batch(bus.as_ref(), &store, &cfg, &ids, batch, &shutdown).await;
                        }
                        if shutdown.is_cancelled() {
                            return false;
                        }
                        let prune_due = last_prune
                            .lock()
                            .map(|mut t| {
                                let due = t.elapsed() > Duration::from_secs(60);
                                if due {
                                    *t = std::time::Instant::now();
                                }
                                due
                            })
                            .unwrap_or(false);
                        if prune_due
                            && let Err(e) = store.prune_activity(cfg.dedupe_window_ms as i64).await
                        {
                            tracing::warn!(error = %e, "analytics: prune failed");
                        }
                        if let Some(lease) = lease
                            && lease_checked.elapsed() > LEASE_TTL / 3
                        {
                            lease_checked = std::time::Instant::now();
                            if !matches!(lease.renew().await, Ok(true)) {
                                tracing::warn!("analytics: lease lost, standing by");
                                return false;
                            }
                        }
                    }
                }
            },
        )
        .await;
    }
    tracing::info!("analytics worker stopped");
}

/// This instance's claim on the analytics lease.
struct Lease<'a> {
    leases: &'a dyn Leases,
    name: String,
    holder: String,
}

impl Lease<'_> {
    async fn renew(&self) -> Result<bool, crate::bus::BusError> {
        self.leases
            .acquire_lease(&self.name, &self.holder, LEASE_TTL)
            .await
    }
}

/// Counts one batch (retrying the transaction until it commits or shutdown),
/// acks it after the commit, and announces new flood flags.
async fn count_batch(
    bus: &dyn MessageBus,
    store: &Store,
    cfg: &AnalyticsConfig,
    ids: &crate::ids::IdGen,
    batch: Vec<Delivery>,
    shutdown: &CancellationToken,
) {
    let msgs: Vec<ChatMessage> = batch
        .iter()
        .filter_map(|d| match serde_json::from_slice::<BusEvent>(&d.payload) {
            Ok(BusEvent::Message(m)) => Some(m),
            _ => None,
        })
        .collect();
    let mut attempt = 0;
    let flags = loop {
        match store
            .apply_analytics(&msgs, i64::from(cfg.flood_max_per_min))
            .await
        {
            Ok(f) => break Some(f),
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, "analytics: batch failed, retrying");
                if shutdown.is_cancelled() && attempt > 3 {
                    break None;
                }
                tokio::time::sleep(retry_backoff().delay(attempt)).await;
            }
        }
    };
    let Some(flags) = flags else {
        for d in batch {
            let _ = d.nack().await;
        }
        return;
    };
    metrics::counter!("analytics_messages_total").increment(msgs.len() as u64);
    if let Err(e) = Delivery::ack_batch(batch).await {
        tracing::warn!(error = %e, "analytics: ack failed (the batch will be redelivered and not counted twice)");
    }
    for f in flags {
        metrics::counter!("flood_flags_total").increment(1);
        tracing::info!(room = %f.room, user = %f.user, rate = f.rate, "flood detected");
        if cfg.flood_warnings {
            announce_flood(bus, store, ids, &f).await;
        }
    }
}

async fn announce_flood(
    bus: &dyn MessageBus,
    store: &Store,
    ids: &crate::ids::IdGen,
    f: &FloodFlag,
) {
    // A room message like any other: it takes the room's next position.
    let seq = match store.next_seq(&f.room).await {
        Ok(h) => h.seq,
        Err(e) => {
            tracing::warn!(error = %e, "analytics: flood warning not published (no room position)");
            return;
        }
    };
    let msg = BusEvent::Message(ChatMessage {
        room: f.room.clone(),
        id: ids.next(),
        user: "system".into(),
        text: format!(
            "{} is sending messages too fast ({} in the last minute) and has been flagged",
            f.user, f.rate
        ),
        ts: chrono::Utc::now().timestamp_millis(),
        kind: MessageKind::System,
        seq: Some(seq),
    });
    let out = Outgoing {
        room: f.room.clone(),
        payload: Bytes::from(msg.to_json()),
        priority: Priority::System,
    };
    if let Err(e) = bus.publish(out).await {
        tracing::warn!(error = %e, "analytics: flood warning not published");
    }
}
