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

use super::{backoff, next_batch};
use crate::bus::{MessageBus, Outgoing, Priority, SubscribeOptions};
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
    let needs_lease = !bus.capabilities().competing_consumers;
    let lease = format!("analytics:{}", cfg.group);
    let mut attempt = 0;
    let mut last_prune = std::time::Instant::now();
    while !shutdown.is_cancelled() {
        if needs_lease {
            match bus.acquire_lease(&lease, &holder, LEASE_TTL).await {
                Ok(true) => {}
                Ok(false) => {
                    // Another instance computes: standing by is healthy.
                    let _ = ready.send(true);
                    tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(LEASE_TTL / 3) => {} }
                    continue;
                }
                Err(_) => {
                    let _ = ready.send(false);
                    tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(LEASE_TTL / 3) => {} }
                    continue;
                }
            }
        }
        let mut sub = match bus
            .subscribe(SubscribeOptions::shared(cfg.group.clone()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                attempt += 1;
                let _ = ready.send(false);
                tracing::warn!(error = %e, "analytics: subscribe failed, retrying");
                tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(backoff(attempt)) => {} }
                continue;
            }
        };
        attempt = 0;
        let _ = ready.send(true);
        tracing::info!(group = %cfg.group, lease = needs_lease, "analytics worker subscribed");
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
                break;
            };
            if !batch.is_empty() {
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
                            tokio::time::sleep(backoff(attempt)).await;
                        }
                    }
                };
                match flags {
                    Some(flags) => {
                        metrics::counter!("analytics_messages_total").increment(msgs.len() as u64);
                        for d in batch {
                            let _ = d.ack().await;
                        }
                        for f in flags {
                            metrics::counter!("flood_flags_total").increment(1);
                            tracing::info!(room = %f.room, user = %f.user, rate = f.rate, "flood detected");
                            if cfg.flood_warnings {
                                announce_flood(bus.as_ref(), &ids, &f).await;
                            }
                        }
                    }
                    None => {
                        for d in batch {
                            let _ = d.nack().await;
                        }
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = std::time::Instant::now();
                if let Err(e) = store.prune_activity().await {
                    tracing::warn!(error = %e, "analytics: prune failed");
                }
            }
            if needs_lease && lease_checked.elapsed() > LEASE_TTL / 3 {
                lease_checked = std::time::Instant::now();
                if !matches!(
                    bus.acquire_lease(&lease, &holder, LEASE_TTL).await,
                    Ok(true)
                ) {
                    tracing::warn!("analytics: lease lost, standing by");
                    break;
                }
            }
        }
    }
    tracing::info!("analytics worker stopped");
}

async fn announce_flood(bus: &dyn MessageBus, ids: &crate::ids::IdGen, f: &FloodFlag) {
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
