//! The gateway wing: everything between a client socket and the bus, in the
//! order a message travels.
//!
//! * [`conn`] — one task pair per WebSocket (a reader that answers every client
//!   frame, a writer that drains the connection's bounded queue). A `send`
//!   goes to [`Gateway::publish_chat`] → the bus.
//! * [`live`] — this instance's live-delivery consumer: bus → [`rooms`].
//! * [`rooms`] — the per-instance room registry: members, held frames during a
//!   join, the recent ring, fan-out into the outbound queues.
//! * [`recovery`] — what a (re)joining client gets after `joined`: the latest
//!   history or everything after `since`, and whether that is provably complete.
//!
//! [`Gateway`] is the wing's context: the handful of things a connection needs
//! (bus, rooms, store, ids, limits, instance, shutdown), nothing of HTTP or of
//! the other roles.

pub mod conn;
pub mod live;
pub mod recovery;
pub mod rooms;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, MessageBus, Outgoing, Priority};
use crate::config::Limits;
use crate::ids::IdGen;
use crate::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};
use crate::store::Store;
use rooms::Rooms;

/// The gateway's context, shared by every connection of this instance.
pub struct Gateway {
    pub bus: Arc<dyn MessageBus>,
    pub rooms: Arc<Rooms>,
    pub store: Store,
    pub ids: Arc<IdGen>,
    pub limits: Limits,
    /// This instance's id (names its live group, tags its presence events).
    pub instance: String,
    /// Cancelled when the server shuts down; every connection's stop token is
    /// a child of it.
    pub shutdown: CancellationToken,
    /// Open WebSocket connections on this instance (for `/api/stats`).
    pub connections: AtomicI64,
}

impl Gateway {
    pub fn new(
        bus: Arc<dyn MessageBus>,
        store: Store,
        ids: Arc<IdGen>,
        limits: Limits,
        instance: String,
        shutdown: CancellationToken,
    ) -> Gateway {
        let rooms = Arc::new(Rooms::new(
            instance.clone(),
            limits.history_on_join.max(0) as usize,
        ));
        Gateway {
            bus,
            rooms,
            store,
            ids,
            limits,
            instance,
            shutdown,
            connections: AtomicI64::new(0),
        }
    }

    /// Publishes one chat message from `user` and returns its id once the bus
    /// accepted it, or the human-readable reason it was not sent (the caller
    /// answers `bus_unavailable`). Used by WebSocket sends and `POST` alike.
    pub async fn publish_chat(
        &self,
        room: RoomId,
        user: String,
        text: String,
    ) -> Result<String, String> {
        let msg = ChatMessage {
            room: room.clone(),
            id: self.ids.next(),
            user,
            text,
            ts: chrono::Utc::now().timestamp_millis(),
            kind: MessageKind::Chat,
        };
        let id = msg.id.clone();
        let backend = self.bus.backend();
        let started = std::time::Instant::now();
        let res = self
            .publish(&BusEvent::Message(msg), Priority::Normal)
            .await;
        metrics::histogram!("publish_latency_seconds", "backend" => backend)
            .record(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => {
                metrics::counter!("messages_in_total", "backend" => backend).increment(1);
                Ok(id)
            }
            Err(e) => {
                metrics::counter!("publish_errors_total", "backend" => backend).increment(1);
                Err(format!("message not sent: {e}"))
            }
        }
    }

    /// Publishes one event within `PUBLISH_TIMEOUT_MS`.
    pub(crate) async fn publish(&self, ev: &BusEvent, priority: Priority) -> Result<(), BusError> {
        let out = Outgoing {
            room: ev.room().clone(),
            payload: Bytes::from(ev.to_json()),
            priority,
        };
        match tokio::time::timeout(self.limits.publish_timeout(), self.bus.publish(out)).await {
            Ok(res) => res,
            Err(_) => Err(BusError::Timeout("the bus did not answer in time".into())),
        }
    }
}
