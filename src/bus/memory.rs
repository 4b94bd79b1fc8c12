//! `BUS=memory`: the embedded default. Everything lives in this process, so it
//! serves one instance only — two processes on `memory` are two separate chats.
//!
//! Each consumer group is a bounded MPMC queue. Publishing puts the message on
//! every existing group's queue; members of one group compete for it. A group
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
use tokio::sync::mpsc;
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
    tx: flume::Sender<Item>,
    rx: flume::Receiver<Item>,
    kind: GroupKind,
    members: AtomicUsize,
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
    tx: flume::Sender<Item>,
}

impl MemoryAcker {
    fn give_back(&mut self) {
        if let Some(mut item) = self.item.take() {
            item.redelivered = true;
            if self.tx.try_send(item).is_err() {
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
        self.item = None;
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
            match g.tx.try_send(item.clone()) {
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
                        kind: opts.kind,
                        members: AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        group.members.fetch_add(1, Ordering::SeqCst);
        let guard = MemberGuard {
            groups: self.groups.clone(),
            name: opts.group.clone(),
            group: group.clone(),
        };

        let filter = Arc::new(LocalRooms::default());
        let interest: Arc<dyn RoomInterest> = match opts.scope {
            RoomScope::All => Arc::new(AllRooms),
            RoomScope::Dynamic => filter.clone(),
        };
        let dynamic = opts.scope == RoomScope::Dynamic;
        // A small buffer: it is this member's prefetch. Deliveries left in it
        // when the subscription is dropped go back to the group.
        let (tx, rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let (stop_task, closed) = (stop.clone(), self.closed.clone());
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let item = tokio::select! {
                    _ = stop_task.cancelled() => break,
                    _ = closed.cancelled() => break,
                    r = group.rx.recv_async() => match r { Ok(i) => i, Err(_) => break },
                };
                if dynamic && !filter.contains(&item.room) {
                    continue;
                }
                let d = Delivery::new(
                    item.room.clone(),
                    item.payload.clone(),
                    item.redelivered,
                    Box::new(MemoryAcker {
                        item: Some(item),
                        tx: group.tx.clone(),
                    }),
                );
                tokio::select! {
                    _ = stop_task.cancelled() => break,
                    r = tx.send(d) => if r.is_err() { break },
                }
            }
        });
        Ok(Subscription::new(rx, interest, Some(stop.drop_guard())))
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

/// A group's lag is what waits in its queue (not yet handed to a member);
/// handed-out, unacked deliveries come back to the queue when dropped.
#[async_trait]
impl ConsumerLag for MemoryBus {
    async fn lag(&self, group: &str) -> Option<i64> {
        let groups = self.groups.read().ok()?;
        groups.get(group).map(|g| g.rx.len() as i64)
    }
}
