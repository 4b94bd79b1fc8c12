//! The persistence role: consumer group `db-writer` (shared by every instance
//! that runs it). Messages are written in batches — one transaction per batch,
//! `ON CONFLICT (id) DO NOTHING` — and acknowledged only after the commit, so a
//! crash between commit and ack only causes a redelivery that writes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{next_batch, retry_backoff};
use crate::bus::reconnect::resubscribe_loop;
use crate::bus::{Delivery, MessageBus, SubscribeOptions};
use crate::config::PersistConfig;
use crate::protocol::{BusEvent, ChatMessage};
use crate::store::Store;

/// Runs until `shutdown`; the batch in flight is written and acked first.
pub async fn run(
    bus: Arc<dyn MessageBus>,
    store: Store,
    cfg: PersistConfig,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let wait = Duration::from_millis(cfg.batch_wait_ms);
    resubscribe_loop(
        "persistence",
        bus.as_ref(),
        SubscribeOptions::shared(cfg.group.clone()),
        &ready,
        &shutdown,
        |mut sub| {
            let (store, shutdown, batch_size) = (store.clone(), shutdown.clone(), cfg.batch_size);
            async move {
                loop {
                    let Some(batch) = next_batch(&mut sub, batch_size, wait, &shutdown).await
                    else {
                        tracing::warn!("persistence: subscription ended, re-subscribing");
                        return true;
                    };
                    if batch.is_empty() {
                        return false; // shutdown with nothing in flight
                    }
                    write_batch(&store, batch, &shutdown).await;
                    if shutdown.is_cancelled() {
                        return false;
                    }
                }
            }
        },
    )
    .await;
}

/// Writes one batch, retrying the transaction until it commits (or shutdown),
/// then acks every delivery. Payloads that are not chat messages (presence) are
/// acked without a write; undecodable ones are logged, counted and acked so one
/// poison message cannot stall the group.
async fn write_batch(store: &Store, batch: Vec<Delivery>, shutdown: &CancellationToken) {
    let rows: Vec<ChatMessage> = batch
        .iter()
        .filter_map(|d| match serde_json::from_slice::<BusEvent>(&d.payload) {
            Ok(BusEvent::Message(m)) => Some(m),
            Ok(_) => None,
            Err(e) => {
                metrics::counter!("persist_undecodable_total").increment(1);
                tracing::warn!(error = %e, room = %d.room, "persistence: undecodable payload skipped");
                None
            }
        })
        .collect();
    let mut attempt = 0;
    let started = std::time::Instant::now();
    loop {
        match store.insert_messages(&rows).await {
            Ok(inserted) => {
                metrics::histogram!("persist_batch_size").record(rows.len() as f64);
                metrics::histogram!("persist_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("persist_rows_total").increment(inserted);
                metrics::counter!("persist_duplicates_total")
                    .increment(rows.len() as u64 - inserted);
                let now = chrono::Utc::now().timestamp_millis();
                for m in &rows {
                    metrics::histogram!("persist_lag_seconds")
                        .record((now - m.ts).max(0) as f64 / 1000.0);
                }
                break;
            }
            Err(e) => {
                attempt += 1;
                metrics::counter!("persist_errors_total").increment(1);
                tracing::warn!(error = %e, attempt, rows = rows.len(), "persistence: batch failed, retrying");
                if shutdown.is_cancelled() && attempt > 3 {
                    // Not committed: give the deliveries back for another worker.
                    for d in batch {
                        let _ = d.nack().await;
                    }
                    return;
                }
                tokio::time::sleep(retry_backoff().delay(attempt)).await;
            }
        }
    }
    // Acknowledge only now that the transaction has committed: the whole
    // batch at once, in one broker operation where the backend can.
    if let Err(e) = Delivery::ack_batch(batch).await {
        tracing::warn!(error = %e, "persistence: ack failed (the message will be redelivered and deduplicated)");
    }
}
