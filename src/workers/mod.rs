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

use crate::bus::{Delivery, Subscription, TryNext};

/// Collects up to `max` deliveries: waits for the first one (or shutdown), then
/// takes what arrives within `wait`. Returns `None` when the subscription ended
/// and nothing was collected.
///
/// A batch never waits for more than the bus hands out unacked
/// ([`Subscription::unacked_limit`]): with RabbitMQ's prefetch of 512 and the
/// analytics batch of 1,000, every batch waited out the full 1 s flush for
/// deliveries the broker would not send before an ack — analytics counted at
/// most 512 msg/s and fell behind at 1,000 msg/s.
///
/// When the deliveries wait in the group's own queue
/// ([`Subscription::queue_holds_backlog`]: memory), the worker sleeps once
/// until `wait` is up and then takes what queued meanwhile, instead of
/// waking for each delivery as it arrives: each wake-up could be a thread
/// switch per message for every worker (BENCHMARKS.md). A backlog of more
/// than `max` is taken at once, batch after batch, without sleeping.
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
    if sub.queue_holds_backlog() {
        if !take_queued(sub, &mut batch, max) {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            take_queued(sub, &mut batch, max);
        }
        return Some(batch);
    }
    // Take whatever is already queued without waiting, then wait for more.
    while !take_queued(sub, &mut batch, max) {
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

/// Moves what is queued into `batch`, up to `max`; `true` when the batch is
/// full or the subscription ended (nothing more to wait for).
fn take_queued(sub: &mut Subscription, batch: &mut Vec<Delivery>, max: usize) -> bool {
    while batch.len() < max {
        match sub.try_next() {
            TryNext::Ready(d) => batch.push(d),
            TryNext::Empty => return false,
            TryNext::Closed => return true,
        }
    }
    true
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
        sub.unacked_limit = None;
        let stop = CancellationToken::new();
        stop.cancel();
        let rest = next_batch(&mut sub, 1000, Duration::from_secs(60), &stop).await;
        assert!(rest.is_some());
    }

    /// The memory bus's group queue: the batch takes everything that
    /// arrived during `wait`; a backlog over `max` is
    /// taken a batch at a time without waiting; a closed bus ends it.
    #[tokio::test]
    async fn a_batch_takes_what_arrived_during_the_wait() {
        use crate::bus::memory::{MemoryBus, MemoryConfig};
        use crate::bus::{MessageBus, Outgoing, Priority, SubscribeOptions};
        let bus = Arc::new(MemoryBus::new(MemoryConfig::default()));
        let mut sub = bus
            .subscribe(SubscribeOptions::shared("batch-test"))
            .await
            .expect("subscribe");
        assert!(sub.queue_holds_backlog());
        let room = RoomId::parse("chat.batch").expect("room");
        let publish = move |bus: Arc<MemoryBus>, n: usize| {
            let room = room.clone();
            async move {
                for _ in 0..n {
                    bus.publish(Outgoing {
                        room: room.clone(),
                        payload: bytes::Bytes::from_static(b"{}"),
                        priority: Priority::Normal,
                    })
                    .await
                    .expect("published");
                }
            }
        };
        publish(bus.clone(), 1).await;
        let late = tokio::spawn({
            let bus = bus.clone();
            let publish = publish.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                publish(bus, 3).await;
            }
        });
        let stop = CancellationToken::new();
        let batch = next_batch(&mut sub, 10, Duration::from_millis(300), &stop)
            .await
            .expect("batch");
        assert_eq!(batch.len(), 4, "the first and the three that came later");
        late.await.expect("publisher");
        Delivery::ack_batch(batch).await.expect("acked");
        // A backlog of 25: two full batches at once, then the rest.
        publish(bus.clone(), 25).await;
        let started = std::time::Instant::now();
        for _ in 0..2 {
            let b = next_batch(&mut sub, 10, Duration::from_secs(60), &stop)
                .await
                .expect("batch");
            assert_eq!(b.len(), 10);
            Delivery::ack_batch(b).await.expect("acked");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "waited");
        let rest = next_batch(&mut sub, 10, Duration::from_millis(100), &stop)
            .await
            .expect("batch");
        assert_eq!(rest.len(), 5);
        Delivery::ack_batch(rest).await.expect("acked");
        bus.close().await;
        assert!(
            next_batch(&mut sub, 10, Duration::from_millis(100), &stop)
                .await
                .is_none()
        );
    }
}
