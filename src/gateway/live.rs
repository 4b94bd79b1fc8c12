//! Live delivery: this instance's own consumer group (`live-<INSTANCE_ID>`), so
//! every instance receives every message of the rooms it serves and pushes it
//! to its own sockets through [`Rooms::dispatch`]. Sockets never talk to the
//! bus: they only have a queue this consumer fills.
//!
//! The bus payload is already the client frame, so it is forwarded as shared
//! bytes: decoded once per message (the same typed [`BusEvent`] the other
//! roles decode, for the id and presence), never re-encoded per recipient.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::rooms::{Frame, Rooms};
use crate::bus::reconnect::{Backoff, resubscribe_loop};
use crate::bus::{Delivery, MessageBus, SubscribeOptions};
use crate::protocol::BusEvent;

/// Subscribes the instance group and signals `ready` once live; re-subscribes
/// (re-adding every local room) whenever the subscription ends.
pub async fn run(
    bus: Arc<dyn MessageBus>,
    rooms: Arc<Rooms>,
    group: String,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let backend = bus.backend();
    let retry = Backoff::capped_ms(5_000);
    let interest_failures = AtomicU32::new(0);
    resubscribe_loop(
        "live delivery",
        bus.as_ref(),
        SubscribeOptions::instance(group),
        &ready,
        &shutdown,
        |mut sub| {
            let (rooms, shutdown) = (rooms.clone(), shutdown.clone());
            let ready = &ready;
            let interest_failures = &interest_failures;
            async move {
                // A fresh subscription knows no rooms yet: re-add every room
                // with local members before counting as live.
                if let Err(e) = rooms.set_interest(sub.interest.clone()).await {
                    let attempt = interest_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let _ = ready.send(false);
                    tracing::warn!(error = %e, "live delivery: re-adding rooms failed, retrying");
                    return retry.wait(attempt, &shutdown).await;
                }
                interest_failures.store(0, Ordering::Relaxed);
                loop {
                    let d = tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        d = sub.next() => match d { Some(d) => d, None => return true },
                    };
                    let n = deliver(&rooms, &d);
                    metrics::counter!("messages_out_total", "backend" => backend)
                        .increment(n as u64);
                    let _ = d.ack().await;
                }
            }
        },
    )
    .await;
}

/// Pushes one bus delivery to the room's local members (and records presence
/// from other instances). Returns how many sockets got it.
fn deliver(rooms: &Rooms, d: &Delivery) -> usize {
    let (Ok(text), Ok(ev)) = (
        Utf8Bytes::try_from(d.payload.clone()),
        serde_json::from_slice::<BusEvent>(&d.payload),
    ) else {
        metrics::counter!("live_undecodable_total").increment(1);
        return 0;
    };
    let (id, seq) = match ev {
        BusEvent::Message(m) => (Some(Arc::from(m.id)), m.seq),
        BusEvent::Presence {
            room,
            user,
            event,
            instance,
        } => {
            if let Some(instance) = instance {
                rooms.remote_presence(&room, &instance, &user, event);
            }
            (None, None)
        }
    };
    rooms.dispatch(&d.room, Frame { id, seq, text })
}
