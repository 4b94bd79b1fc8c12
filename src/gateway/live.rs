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

use super::rooms::{Dispatched, Frame};
use super::{Gateway, recovery};
use crate::bus::reconnect::{Backoff, resubscribe_loop};
use crate::bus::{Delivery, SubscribeOptions};
use crate::protocol::{BusEvent, RoomId};

/// Subscribes the instance group and signals `ready` once live; re-subscribes
/// (re-adding every local room) whenever the subscription ends. Whenever the
/// stream was interrupted — a new subscription after the first, the backend
/// re-establishing it under the hood, or records it never got (Kafka's
/// offsets jumped) — every local room catches up
/// ([`recovery::catch_up`]): its members get what they missed, or a `gap`.
pub async fn run(
    gw: Arc<Gateway>,
    group: String,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let backend = gw.bus.backend();
    let retry = Backoff::capped_ms(5_000);
    let interest_failures = AtomicU32::new(0);
    let sessions = AtomicU32::new(0);
    resubscribe_loop(
        "live delivery",
        gw.bus.as_ref(),
        SubscribeOptions::instance(group),
        &ready,
        &shutdown,
        |mut sub| {
            let (gw, shutdown) = (gw.clone(), shutdown.clone());
            let (ready, interest_failures, sessions) = (&ready, &interest_failures, &sessions);
            async move {
                let rooms = &gw.rooms;
                // A fresh subscription knows no rooms yet: re-add every room
                // with local members before counting as live.
                if let Err(e) = rooms.set_interest(sub.interest.clone()).await {
                    let attempt = interest_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let _ = ready.send(false);
                    tracing::warn!(error = %e, "live delivery: re-adding rooms failed, retrying");
                    return retry.wait(attempt, &shutdown).await;
                }
                interest_failures.store(0, Ordering::Relaxed);
                if sessions.fetch_add(1, Ordering::Relaxed) > 0 {
                    catch_up_all(&gw);
                }
                let mut resumed = sub.resumed.take();
                loop {
                    let d = tokio::select! {
                        // A resumption is looked at before the next delivery:
                        // the backend signals it before it hands on what came
                        // after the miss, so the catch-up's starting positions
                        // are still the ones from before it.
                        biased;
                        _ = shutdown.cancelled() => return false,
                        Some(()) = changed(&mut resumed) => {
                            catch_up_all(&gw);
                            continue;
                        }
                        d = sub.next() => match d { Some(d) => d, None => return true },
                    };
                    let n = deliver(&gw, &d);
                    metrics::counter!("messages_out_total", "backend" => backend)
                        .increment(n as u64);
                    let _ = d.ack().await;
                }
            }
        },
    )
    .await;
}

/// Resolves when the backend re-established the subscription; never when it
/// cannot tell.
async fn changed(resumed: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match resumed {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Starts a catch-up for every local room, from the last position delivered.
fn catch_up_all(gw: &Arc<Gateway>) {
    metrics::counter!("live_resumptions_total").increment(1);
    for (room, last) in gw.rooms.positions() {
        let gw = gw.clone();
        tokio::spawn(async move { recovery::catch_up(&gw, &room, last.unwrap_or(0)).await });
    }
}

/// Pushes one bus delivery to the room's local members (and records presence
/// from other instances). Returns how many sockets got it. A message the bus
/// hands over again while its first copy is in the room's recent ring (Kafka
/// re-produces a record whose answer was lost) is dropped and counted in
/// `live_duplicates_dropped_total`, so the backend's at-least-once stays
/// visible without reaching the clients twice. A message ahead of its room's
/// order waits for the positions before it ([`super::rooms::Rooms::dispatch_live`]).
fn deliver(gw: &Arc<Gateway>, d: &Delivery) -> usize {
    let rooms = &gw.rooms;
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
    match rooms.dispatch_live(&d.room, Frame { id, seq, text }) {
        Dispatched::To(n) => n,
        Dispatched::Repeat => {
            metrics::counter!("live_duplicates_dropped_total").increment(1);
            0
        }
        Dispatched::Early { first, delivered } => {
            if first {
                await_early(gw, d.room.clone());
            }
            delivered
        }
    }
}

/// The reorder wait of a room that started holding messages back (one task
/// per room at a time): when it is up, whatever is still held goes out in
/// position order, and a catch-up fetches the positions that never came
/// (from the DB, or a `gap`): a message lost on the way is then late, not
/// missing. When the missing positions arrive in time,
/// [`super::rooms::Rooms::dispatch_live`] has let the rest out already and
/// the task ends.
fn await_early(gw: &Arc<Gateway>, room: RoomId) {
    let gw = gw.clone();
    tokio::spawn(async move {
        let mut wait = gw.rooms.reorder_wait();
        loop {
            tokio::time::sleep(wait).await;
            let r = gw.rooms.release_overdue(&room);
            metrics::counter!("messages_out_total", "backend" => gw.bus.backend())
                .increment(r.delivered as u64);
            if let Some(from) = r.catch_up_from {
                let (gw, room) = (gw.clone(), room.clone());
                tokio::spawn(async move { recovery::catch_up(&gw, &room, from).await });
            }
            match r.wait_more {
                Some(more) => wait = more.max(std::time::Duration::from_millis(1)),
                None => break,
            }
        }
    });
}
