//! Keeps one room's records in send order across the application-level
//! retries of a bus whose client can lose a whole batch at once (Kafka: a
//! producer the broker fenced fails every record it still holds, and the
//! relay produces them again on a new producer).
//!
//! Without it a retry waits out its backoff while the room's next sends go
//! straight to the new producer, so they land first: the fault run of the
//! README's comparison reordered 7,260 live deliveries that way. The rule
//! here: a record may be handed to producer generation `g` only when every
//! earlier record of its room that is still unconfirmed already sits on
//! generation `g` — not on an older producer (it may still fail) and not
//! between a failure and its retry. The client keeps the order of records
//! it holds on one producer (idempotence), so the room's order holds.
//!
//! What it cannot undo: a record that fails on a producer that is *not*
//! replaced (a delivery timeout) while later records of its room on the same
//! producer succeed; those landed already, and the retry comes after them.
//!
//! Cost on the normal path: a few operations on a mutex-guarded map per
//! send and one per confirmation; nobody waits while no record fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Generation value of a record between a failure and its retry: below every
/// producer generation, so every later record of its room waits for it.
const AWAITING_RETRY: u64 = 0;

#[derive(Default)]
struct Room {
    next: u64,
    /// Unconfirmed records: ticket → the producer generation they sit on.
    open: BTreeMap<u64, u64>,
    changed: Arc<Notify>,
}

/// The per-room bookkeeping of one bus. Rooms without an unconfirmed record
/// are not kept, so its size is bounded by the records in flight.
#[derive(Default)]
pub struct RoomOrder {
    rooms: Mutex<HashMap<String, Room>>,
}

/// One record's place in its room; releases it when dropped (confirmed,
/// refused, or the caller gave up), so a room never waits on a record that
/// is gone.
pub struct Ticket {
    order: Arc<RoomOrder>,
    room: String,
    n: u64,
}

impl RoomOrder {
    fn with_room<R>(&self, room: &str, f: impl FnOnce(&mut Room) -> R) -> R {
        let mut rooms = match self.rooms.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let r = rooms.entry(room.to_string()).or_default();
        let out = f(r);
        if r.open.is_empty() {
            rooms.remove(room);
        }
        out
    }

    /// Takes the room's next place, not yet on any producer.
    pub fn ticket(self: &Arc<Self>, room: &str) -> Ticket {
        let n = self.with_room(room, |r| {
            let n = r.next;
            r.next += 1;
            r.open.insert(n, AWAITING_RETRY);
            n
        });
        Ticket {
            order: self.clone(),
            room: room.to_string(),
            n,
        }
    }
}

impl Ticket {
    /// Waits until the record may be handed to producer generation `generation()`
    /// (it is read again after every change: a replacement meanwhile
    /// moves the target), then records it there; returns the generation it
    /// may use. Generations start at 1.
    pub async fn turn(&self, generation: impl Fn() -> u64) -> u64 {
        loop {
            let changed = self.order.with_room(&self.room, |r| r.changed.clone());
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let g = generation();
            let ready = self.order.with_room(&self.room, |r| {
                let ready = r.open.range(..self.n).all(|(_, on)| *on == g);
                if ready {
                    r.open.insert(self.n, g);
                    r.changed.notify_waiters();
                }
                ready
            });
            if ready {
                return g;
            }
            notified.await;
        }
    }

    /// The record failed and will be produced again: later records of the
    /// room wait for its retry.
    pub fn failed(&self) {
        self.order.with_room(&self.room, |r| {
            r.open.insert(self.n, AWAITING_RETRY);
            r.changed.notify_waiters();
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.order.with_room(&self.room, |r| {
            r.open.remove(&self.n);
            r.changed.notify_waiters();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    async fn is_waiting(f: &mut (impl std::future::Future + Unpin)) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    /// A later record waits while an earlier one sits between its failure and
    /// its retry, and goes once the retry is on the producer.
    #[tokio::test]
    async fn a_later_send_waits_for_an_earlier_retry() {
        let order = Arc::new(RoomOrder::default());
        let a = order.ticket("r");
        assert_eq!(a.turn(|| 1).await, 1);
        a.failed();
        let b = order.ticket("r");
        let mut turn_b = Box::pin(b.turn(|| 1));
        assert!(is_waiting(&mut turn_b).await, "b waits for a's retry");
        assert_eq!(a.turn(|| 1).await, 1, "a's retry goes first");
        assert_eq!(turn_b.await, 1);
    }

    /// After a producer replacement a new record waits until the room's
    /// records still on the old producer are confirmed or moved over.
    #[tokio::test]
    async fn a_new_producer_waits_for_the_old_ones_records() {
        let order = Arc::new(RoomOrder::default());
        let current = Arc::new(AtomicU64::new(1));
        let g = || current.load(Ordering::SeqCst);
        let a = order.ticket("r");
        let b = order.ticket("r");
        a.turn(g).await;
        b.turn(g).await;
        current.store(2, Ordering::SeqCst);
        let c = order.ticket("r");
        let mut turn_c = Box::pin(c.turn(g));
        assert!(is_waiting(&mut turn_c).await, "a and b are on generation 1");
        drop(a); // confirmed
        assert!(is_waiting(&mut turn_c).await, "b still is");
        b.failed();
        assert!(is_waiting(&mut turn_c).await, "b awaits its retry");
        assert_eq!(b.turn(g).await, 2);
        assert_eq!(turn_c.await, 2);
    }

    /// Rooms do not wait for each other, and a room with nothing open is
    /// forgotten (the map is bounded by the records in flight).
    #[tokio::test]
    async fn rooms_are_independent_and_forgotten() {
        let order = Arc::new(RoomOrder::default());
        let a = order.ticket("r");
        a.turn(|| 1).await;
        a.failed();
        let other = order.ticket("s");
        assert_eq!(other.turn(|| 1).await, 1);
        drop(other);
        drop(a);
        assert!(order.rooms.lock().unwrap().is_empty());
    }

    /// A record dropped while it waits (the caller's deadline) releases its
    /// place: later records do not wait for it.
    #[tokio::test]
    async fn a_dropped_waiter_releases_its_place() {
        let order = Arc::new(RoomOrder::default());
        let a = order.ticket("r");
        a.turn(|| 1).await;
        a.failed();
        let b = order.ticket("r");
        {
            let mut turn_b = Box::pin(b.turn(|| 1));
            assert!(is_waiting(&mut turn_b).await);
        }
        drop(b);
        drop(a);
        let c = order.ticket("r");
        assert_eq!(c.turn(|| 1).await, 1);
    }
}
