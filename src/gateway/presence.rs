//! Cluster presence: who is in a room on every instance, and what happens
//! when an instance dies.
//!
//! The state lives in the database every instance already shares (tables
//! `presence_instances` and `presence_members`): a gateway writes its members
//! through on join and leave (before the bus `presence` event goes out, so
//! whoever hears the event finds the row) and heartbeats its instance row
//! every `PRESENCE_HEARTBEAT_MS` — only while its bus and its live
//! subscription are up, so an instance cut off from the broker stops
//! counting as alive too. `joined.members` is this instance's members plus
//! those of instances alive within `PRESENCE_TTL_MS`.
//!
//! Every heartbeat, each instance also reconciles the rooms it serves with
//! the store: the members of an instance whose heartbeat is older than the
//! TTL (SIGKILLed, cut off) are dropped and its own clients get a `presence`
//! `leave` for each — every instance tells its own sockets, nobody has to
//! speak for the dead one — and the dead rows are deleted. A member leaves
//! at most TTL + one heartbeat after its instance died (Phoenix.Tracker's
//! `down_period`, Centrifugo's presence expiry).
//!
//! When the database is down: heartbeats and reconciliation fail (logged),
//! nothing is expired by this instance (it cannot tell), joins and chat keep
//! working with the members this instance knows from bus events; other
//! instances that still reach the database expire this one after the TTL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::rooms::Frame;
use crate::protocol::{BusEvent, PresenceEvent, RoomId};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Gateway {
    /// The oldest heartbeat that still counts as alive.
    pub(crate) fn alive_since(&self) -> i64 {
        now_ms() - self.presence.presence_ttl_ms as i64
    }

    /// Records one more (or one fewer) connection of `user` in `room` here.
    pub(crate) async fn presence_write(&self, room: &RoomId, user: &str, delta: i64) {
        if let Err(e) = self
            .store
            .presence_change(&self.instance, room, user, delta)
            .await
        {
            tracing::warn!(error = %e, %room, "presence not written; members elsewhere may miss it until the next heartbeat");
        }
    }

    /// A connection of `user` entered `room` here (its frames still held):
    /// writes the presence row, loads the members of live instances and
    /// returns the room's members for the client's first answer. Shared by
    /// `/ws` and STOMP connections, so both count the same way.
    pub(crate) async fn presence_entered(&self, room: &RoomId, user: &str) -> Vec<String> {
        // Written before the bus `presence` event goes out, so whoever hears
        // it finds the row; then every live instance's members of the room.
        self.presence_write(room, user, 1).await;
        if let Ok(alive) = self.store.presence_alive(self.alive_since()).await {
            let alive = alive.into_iter().collect();
            self.presence_refresh(room, &alive).await;
        }
        self.rooms.members(room)
    }

    /// Tells every instance (and so every client in the room) that `user`
    /// joined or left `room`.
    pub(crate) async fn announce(&self, room: &RoomId, user: &str, event: PresenceEvent) {
        let ev = BusEvent::Presence {
            room: room.clone(),
            user: user.to_string(),
            event,
            instance: Some(self.instance.clone()),
        };
        if let Err(e) = self.publish(&ev, crate::bus::Priority::System).await {
            tracing::debug!(error = %e, "presence not published");
        }
    }

    /// Connection `conn` of `user` left `room` here: out of the registry, the
    /// presence row, and the `leave` to everyone.
    pub(crate) async fn presence_left(
        &self,
        room: &RoomId,
        conn: super::rooms::ConnId,
        user: &str,
    ) {
        self.rooms.remove(room, conn).await;
        self.presence_write(room, user, -1).await;
        self.announce(room, user, PresenceEvent::Leave).await;
    }

    /// Loads `room`'s members on live instances into the registry (before
    /// `joined` lists them) and tells the room's sockets here about every
    /// member who left with a dead instance. `false`: the store is down.
    pub(crate) async fn presence_refresh(&self, room: &RoomId, alive: &HashSet<String>) -> bool {
        match self.store.presence_members(room, self.alive_since()).await {
            Ok(remote) => {
                self.presence_apply(room, &remote, alive);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, %room, "presence store unavailable");
                false
            }
        }
    }

    /// Makes `remote` (the room's members on live instances, from the store)
    /// the registry's view of `room`, and sends a `presence` `leave` to the
    /// room's sockets here for every member of a dead instance.
    fn presence_apply(&self, room: &RoomId, remote: &[(String, String)], alive: &HashSet<String>) {
        for (instance, user) in self.rooms.reconcile(room, remote, alive) {
            metrics::counter!("presence_expired_total").increment(1);
            let ev = BusEvent::Presence {
                room: room.clone(),
                user,
                event: PresenceEvent::Leave,
                instance: Some(instance),
            };
            self.rooms.dispatch(
                room,
                Frame {
                    id: None,
                    seq: None,
                    text: Utf8Bytes::from(ev.to_json()),
                },
            );
        }
    }
}

/// The heartbeat and expiry loop of one gateway instance.
pub async fn run(
    gw: Arc<Gateway>,
    mut live_ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let every = Duration::from_millis(gw.presence.presence_heartbeat_ms.max(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            // Beat as soon as live delivery is up, not a heartbeat later:
            // until this instance's row exists, the members who join here
            // are invisible to every other instance (the first tick fires
            // at start-up, usually before the live subscription is ready).
            Ok(()) = live_ready.changed() => {
                if !*live_ready.borrow_and_update() {
                    continue;
                }
            }
        }
        beat(&gw, &live_ready).await;
        expire(&gw).await;
    }
    // A graceful stop: our members leave at once (their bus `leave` events
    // went out as their sockets closed), not after the TTL.
    if let Err(e) = gw
        .store
        .presence_forget(gw.alive_since(), Some(&gw.instance))
        .await
    {
        tracing::debug!(error = %e, "presence rows not removed on shutdown");
    }
}

async fn beat(gw: &Gateway, live_ready: &watch::Receiver<bool>) {
    if !*live_ready.borrow() || gw.bus.ready().await.is_err() {
        // Cut off from the broker: others must see us expire.
        return;
    }
    match gw.store.presence_beat(&gw.instance, now_ms()).await {
        Ok(true) => {
            // First beat, or our rows were expired or lost: write them anew.
            if let Err(e) = gw
                .store
                .presence_sync(&gw.instance, &gw.rooms.local_members())
                .await
            {
                tracing::warn!(error = %e, "presence: members not re-synced");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "presence: heartbeat failed"),
    }
}

async fn expire(gw: &Gateway) {
    let alive: HashSet<String> = match gw.store.presence_alive(gw.alive_since()).await {
        Ok(a) => a.into_iter().collect(),
        // Cannot tell who is alive: expire nobody.
        Err(_) => return,
    };
    // Every local room's members in one query per chunk, not one per room:
    // the heartbeat's cost stays flat in the number of rooms served.
    let rooms = gw.rooms.rooms();
    for chunk in rooms.chunks(RECONCILE_CHUNK) {
        let rows = match gw.store.presence_members_in(chunk, gw.alive_since()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "presence store unavailable");
                return;
            }
        };
        let mut by_room: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (room, instance, user) in rows {
            by_room.entry(room).or_default().push((instance, user));
        }
        for room in chunk {
            let remote = by_room.remove(room.as_str()).unwrap_or_default();
            gw.presence_apply(room, &remote, &alive);
        }
    }
    if let Err(e) = gw.store.presence_forget(gw.alive_since(), None).await {
        tracing::debug!(error = %e, "presence: stale rows not deleted");
    }
}

/// Rooms reconciled by one query (bounds the statement's result and its
/// JSON parameter on an instance serving very many rooms).
const RECONCILE_CHUNK: usize = 1000;
