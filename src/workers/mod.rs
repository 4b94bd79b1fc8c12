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
///
/// A batch never waits for more than the bus hands out unacked
/// ([`Subscription::unacked_limit`]): with RabbitMQ's prefetch of 512 and the
/// analytics batch of 1,000, every batch waited out the full 1 s flush for
/// deliveries the broker would not send before an ack — analytics counted at
/// most 512 msg/s and fell behind at 1,000 msg/s.
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
    let max = sub.unacked_limit.map_or(max, |l| max.min(l.max(1)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::AllRooms;
    use crate::protocol::RoomId;
    use std::sync::Arc;

    /// With 20 deliveries queued behind a bus that hands out 8 unacked, a
    /// batch of up to 1,000 with a 60 s wait is the 8 at once.
    #[tokio::test]
    async fn a_batch_stops_at_the_unacked_limit() {
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let room = RoomId::parse("chat.batch").expect("room");
        for _ in 0..20 {
            tx.send(Delivery::unacked(
                room.clone(),
                bytes::Bytes::from_static(b"{}"),
            ))
            .await
            .expect("queued");
        }
        let mut sub = Subscription::new(rx, Arc::new(AllRooms), None).with_unacked_limit(8);
        let started = std::time::Instant::now();
        let batch = next_batch(
            &mut sub,
            1000,
            Duration::from_secs(60),
            &CancellationToken::new(),
        )
        .await
        .expect("batch");
        assert_eq!(batch.len(), 8);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the deadline"
        );
        // Without a limit the same call takes everything queued (and then
        // waits for more until the deadline, which shutdown cuts short).
        let mut sub = Subscription::new(sub.deliveries, Arc::new(AllRooms), None);
        let stop = CancellationToken::new();
        stop.cancel();
        let rest = next_batch(&mut sub, 1000, Duration::from_secs(60), &stop).await;
        assert!(rest.is_some());
    }
}
