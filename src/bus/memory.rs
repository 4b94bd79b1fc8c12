//! `BUS=memory`: the embedded default. Everything lives in this process, so it
//! serves one instance only — two processes on `memory` are two separate chats.
//!
//! Each consumer group is a bounded MPMC queue of deliveries, which the
//! group's members read directly (no task between the queue and a member, so
//! a message wakes only the members that take it). Publishing puts the
//! message on every existing group's queue — for a dynamic-scope group only
//! when one of its rooms (the scope is set by the group's first member) —
//! and members of one group compete for it. A group
//! created as [`GroupKind::Shared`] outlives its subscribers (messages queue up
//! while the persistence role is stopped, up to `MEMORY_BUS_CAPACITY`), an
//! [`GroupKind::Instance`] group disappears with its subscriber. A delivery
//! dropped or nacked before its ack goes back to its group's queue (at its end:
//! order is only kept for messages that are not redelivered). A full queue
//! makes `publish` wait up to `MEMORY_BUS_PUBLISH_TIMEOUT_MS`, then fail —
//! back-pressure, never a silent drop. Nothing survives a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{
    Acker, AllRooms, BusError, Capabilities, ConsumerLag, Delivery, GroupKind, LocalRooms,
    MessageBus, Outgoing, RoomInterest, RoomScope, SubscribeOptions, Subscription,
};
use crate::protocol::RoomId;

/// Settings of the memory bus.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryConfig {
    /// Messages each consumer group may hold before publishers wait.
    #[arg(long, env = "MEMORY_BUS_CAPACITY", default_value_t = 65536)]
    pub memory_capacity: usize,
    /// How long a publisher waits for room in a full group queue (ms).
    #[arg(long, env = "MEMORY_BUS_PUBLISH_TIMEOUT_MS", default_value_t = 1000)]
    pub memory_publish_timeout_ms: u64,
}

crate::default_from_env!(MemoryConfig);

#[derive(Clone)]
struct Item {
    room: RoomId,
    payload: Bytes,
    redelivered: bool,
}

struct Group {
    tx: flume::Sender<Delivery>,
    rx: flume::Receiver<Delivery>,
    /// Deliveries of this group not yet acked: queued, or handed to a
    /// member that has not acked them (the group's lag).
    unacked: Arc<AtomicUsize>,
    kind: GroupKind,
    members: AtomicUsize,
    /// The rooms a dynamic-scope group takes; `None`: every room.
    rooms: Option<Arc<LocalRooms>>,
}

impl Group {
    fn wants(&self, room: &RoomId) -> bool {
        self.rooms.as_ref().is_none_or(|r| r.contains(room))
    }
}

/// A delivery of `item` from the group whose queue `tx` feeds, counted in
/// the group's `unacked` until it is acked or given back. Its acker holds the
/// queue weakly: deliveries waiting in a queue must not keep that queue alive
/// once its group is gone.
fn delivery(item: Item, tx: &flume::Sender<Delivery>, unacked: &Arc<AtomicUsize>) -> Delivery {
    unacked.fetch_add(1, Ordering::Relaxed);
    Delivery::new(
        item.room.clone(),
        item.payload.clone(),
        item.redelivered,
        Box::new(MemoryAcker {
            item: Some(item),
            tx: tx.downgrade(),
            unacked: unacked.clone(),
        }),
    )
}

/// The in-process bus.
pub struct MemoryBus {
    cfg: MemoryConfig,
    groups: Arc<RwLock<HashMap<String, Arc<Group>>>>,
    closed: CancellationToken,
}

impl MemoryBus {
    pub fn new(cfg: MemoryConfig) -> Self {
        MemoryBus {
            cfg,
            groups: Arc::default(),
            closed: CancellationToken::new(),
        }
    }

    fn snapshot(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }
}

struct MemoryAcker {
    item: Option<Item>,
    tx: flume::WeakSender<Delivery>,
    unacked: Arc<AtomicUsize>,
}

impl MemoryAcker {
    /// Takes the item once (an ack or a give-back), and counts it settled.
    fn take(&mut self) -> Option<Item> {
        let item = self.item.take();
        if item.is_some() {
            self.unacked.fetch_sub(1, Ordering::Relaxed);
        }
        item
    }

    fn give_back(&mut self) {
        if let Some(mut item) = self.take() {
            // A group that is gone (an instance group whose member left)
            // keeps nothing: there is no one to give it back to.
            let Some(tx) = self.tx.upgrade() else { return };
            item.redelivered = true;
            if tx.try_send(delivery(item, &tx, &self.unacked)).is_err() {
                metrics::counter!("bus_redelivery_dropped_total", "backend" => "memory")
                    .increment(1);
                tracing::warn!("memory bus: group queue full or gone, redelivery dropped");
            }
        }
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.take();
        Ok(())
    }
    async fn nack(mut self: Box<Self>) -> Result<(), BusError> {
        self.give_back();
        Ok(())
    }
}

/// Removes an instance group when its last subscriber leaves.
struct MemberGuard {
    groups: Arc<RwLock<HashMap<String, Arc<Group>>>>,
    name: String,
    group: Arc<Group>,
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        let left = self.group.members.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0
            && self.group.kind == GroupKind::Instance
            && let Ok(mut g) = self.groups.write()
            && g.get(&self.name)
                .is_some_and(|cur| Arc::ptr_eq(cur, &self.group))
        {
            g.remove(&self.name);
        }
    }
}

#[async_trait]
impl MessageBus for MemoryBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            competing_consumers: true,
            redelivery: true,
            retains_for_absent_groups: true,
            replay: false,
            multi_process: false,
            selective_ack: true,
        }
    }

    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        Some(self)
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let item = Item {
            room: msg.room,
            payload: msg.payload,
            redelivered: false,
        };
        let timeout = Duration::from_millis(self.cfg.memory_publish_timeout_ms);
        for g in self.snapshot() {
            if !g.wants(&item.room) {
                continue;
            }
            match g.tx.try_send(delivery(item.clone(), &g.tx, &g.unacked)) {
                Ok(()) => {}
                Err(flume::TrySendError::Full(it)) => {
                    match tokio::time::timeout(timeout, g.tx.send_async(it)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(BusError::Closed),
                        Err(_) => {
                            return Err(BusError::Timeout(
                                "a consumer group's queue is full".into(),
                            ));
                        }
                    }
                }
                Err(flume::TrySendError::Disconnected(_)) => return Err(BusError::Closed),
            }
        }
        Ok(())
    }

    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.closed.is_cancelled() {
            return Err(BusError::Closed);
        }
        let group = {
            let mut groups = self
                .groups
                .write()
                .map_err(|_| BusError::Unavailable("lock poisoned".into()))?;
            groups
                .entry(opts.group.clone())
                .or_insert_with(|| {
                    let (tx, rx) = flume::bounded(self.cfg.memory_capacity.max(1));
                    Arc::new(Group {
                        tx,
                        rx,
                        unacked: Arc::default(),
                        kind: opts.kind,
                        members: AtomicUsize::new(0),
                        rooms: (opts.scope == RoomScope::Dynamic)
                            .then(|| Arc::new(LocalRooms::default())),
                    })
                })
                .clone()
        };
        group.members.fetch_add(1, Ordering::SeqCst);
        let interest: Arc<dyn RoomInterest> = match &group.rooms {
            Some(rooms) => rooms.clone(),
            None => Arc::new(AllRooms),
        };
        let guard = MemberGuard {
            groups: self.groups.clone(),
            name: opts.group.clone(),
            group: group.clone(),
        };
        Ok(Subscription::from_queue(
            group.rx.clone(),
            self.closed.clone(),
            interest,
            Box::new(guard),
        ))
    }

    async fn ready(&self) -> Result<(), BusError> {
        if self.closed.is_cancelled() {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    async fn close(&self) {
        self.closed.cancel();
    }
}

/// A group's lag is what it has not acked: deliveries waiting in its queue
/// and those handed to a member and not acked yet (dropped, they come back
/// to the queue).
#[async_trait]
impl ConsumerLag for MemoryBus {
    async fn lag(&self, group: &str) -> Option<i64> {
        let groups = self.groups.read().ok()?;
        let g = groups.get(group)?;
        i64::try_from(g.unacked.load(Ordering::Relaxed)).ok()
    }

    async fn undelivered(&self, group: &str) -> Option<i64> {
        let groups = self.groups.read().ok()?;
        groups.get(group).map(|g| g.rx.len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deliveries still queued when an instance group goes away (its only
    /// member left) do not keep the group's queue alive: their ackers hold
    /// it weakly, so the queue and what waits in it are freed.
    #[tokio::test]
    async fn a_gone_instance_group_frees_its_queue() {
        let bus = MemoryBus::new(MemoryConfig::default());
        let sub = bus
            .subscribe(SubscribeOptions::instance("live-test"))
            .await
            .expect("subscribe");
        let room = RoomId::parse("chat.gone").expect("room");
        sub.interest.add_room(&room).await.expect("room added");
        let queue = bus.snapshot()[0].tx.downgrade();
        for _ in 0..3 {
            bus.publish(Outgoing {
                room: room.clone(),
                payload: Bytes::from_static(b"{}"),
                priority: crate::bus::Priority::Normal,
            })
            .await
            .expect("published");
        }
        assert!(queue.upgrade().is_some(), "the group is there");
        drop(sub);
        assert!(bus.snapshot().is_empty(), "the group left with its member");
        assert!(
            queue.upgrade().is_none(),
            "the queue (and its 3 deliveries) outlived its group"
        );
    }
}
