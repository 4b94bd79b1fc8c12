//! Consumer-group workers behind the bus. Each is a separate role with its own
//! shared consumer group, so it can be scaled or stopped independently of the
//! gateway (whose live delivery lives in [`crate::gateway::live`]):
//! * [`persist`] — shared group `db-writer`; batched, idempotent DB writes, ack after commit.
//! * [`analytics`] — shared group `analytics`; room rates, active users, top talkers, flood flags.

pub mod analytics;
pub mod persist;

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{Delivery, Subscription};

/// Collects up to `max` deliveries: waits for the first one (or shutdown), then
/// takes what arrives within `wait`. Returns `None` when the subscription ended
/// and nothing was collected.
pub(crate) async fn next_batch(
    sub: &mut Subscription,
    max: usize,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Option<Vec<Delivery>> {
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Some(Vec::new()),
        d = sub.next() => d?,
    };
    let mut batch = Vec::with_capacity(max.min(1024));
    batch.push(first);
    let deadline = Instant::now() + wait;
    while batch.len() < max {
        // Take whatever is already queued without waiting.
        match sub.deliveries.try_recv() {
            Ok(d) => {
                batch.push(d);
                continue;
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            d = sub.next() => match d {
                Some(d) => batch.push(d),
                None => break,
            },
        }
    }
    Some(batch)
}

/// The wait between DB retries of a batch (the relay's one backoff schedule).
pub(crate) fn retry_backoff() -> crate::bus::reconnect::Backoff {
    crate::bus::reconnect::Backoff::capped_ms(5_000)
}
