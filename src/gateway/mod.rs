//! The gateway wing: everything between a client socket and the bus, in the
//! order a message travels.
//!
//! * [`conn`] — one task pair per WebSocket (a reader that answers every client
//!   frame, a writer that finishes what the socket could not take at once). A `send`
//!   goes to [`Gateway::begin_chat`] → the bus; its `ack` waits for
//!   [`PendingSend::finish`] while the reader goes on reading.
//! * [`live`] — this instance's live-delivery consumer: bus → [`rooms`].
//! * [`rooms`] — the per-instance room registry: members, held frames during a
//!   join, the recent ring, fan-out to every member's outlet.
//! * [`outbox`] — a socket's outbound side: frames are written into the socket
//!   by whoever has them, queued (bounded) only when it cannot take more.
//! * [`recovery`] — what a (re)joining client gets after `joined`: the latest
//!   history or everything after its cursor, and whether that is provably
//!   complete; catch-up after this instance's own live stream was interrupted.
//! * [`sequencer`] — room positions (`seq`) for sends, one commit per burst.
//! * [`presence`] — cluster-wide members, heartbeats and expiry of dead instances.
//! * [`stomp`] — the STOMP 1.2 endpoint: the same rooms, sends and presence
//!   as [`conn`], in Spring's framing and destinations.
//!
//! [`Gateway`] is the wing's context: the handful of things a connection needs
//! (bus, rooms, store, ids, limits, instance, shutdown), nothing of HTTP or of
//! the other roles.

pub mod conn;
pub mod live;
pub mod outbox;
pub mod presence;
pub mod recovery;
pub mod rooms;
pub mod sequencer;
pub mod stomp;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Confirm, MessageBus, Outgoing, Priority};
use crate::config::{Limits, PresenceConfig};
use crate::ids::IdGen;
use crate::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};
use crate::store::Store;
use rooms::Rooms;

/// Why a send was not published.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The bus did not accept the message (`bus_unavailable`).
    #[error("{0}")]
    Bus(String),
    /// The database that hands out room positions and dedupes `cid`s did not
    /// answer (`db_unavailable`); the message was not published.
    #[error("{0}")]
    Db(String),
    /// An earlier send with the same `cid` is still waiting for the bus.
    #[error("message not sent: an earlier send with this cid is still in flight; retry")]
    InFlight,
}

impl SendError {
    /// The error code clients get for it.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            SendError::Bus(_) | SendError::InFlight => ErrorCode::BusUnavailable,
            SendError::Db(_) => ErrorCode::DbUnavailable,
        }
    }
}

/// A send handed to the bus ([`Gateway::begin_chat`]) whose answer is still
/// owed; [`PendingSend::finish`] waits for the broker and settles the claim
/// and the position. Finish every one: dropping it leaves a `cid` claim
/// unconfirmed and, when the publish failed, a position recovery waits for.
pub enum PendingSend {
    /// A retry of a send already published: its original id.
    Earlier(String),
    /// Handed to the bus; the confirmation (or why it failed) is pending.
    Submitted(Submitted),
}

/// The state of one submitted send (see [`PendingSend`]).
pub struct Submitted {
    room: RoomId,
    user: String,
    cid: Option<String>,
    id: String,
    seq: i64,
    confirm: Result<Confirm, BusError>,
    started: std::time::Instant,
    deadline: tokio::time::Instant,
}

impl PendingSend {
    /// Waits (until the send's `PUBLISH_TIMEOUT_MS` deadline) for the bus to
    /// accept the message and returns its id — only then may the client be
    /// told `ack`. On failure the `cid` claim is dropped and the position
    /// voided.
    pub async fn finish(self, gw: &Gateway) -> Result<String, SendError> {
        let s = match self {
            PendingSend::Earlier(id) => return Ok(id),
            PendingSend::Submitted(s) => s,
        };
        let res = match s.confirm {
            Ok(c) => match tokio::time::timeout_at(s.deadline, c).await {
                Ok(r) => r,
                Err(_) => Err(BusError::Timeout("the bus did not answer in time".into())),
            },
            Err(e) => Err(e),
        };
        let backend = gw.bus.backend();
        metrics::histogram!("publish_latency_seconds", "backend" => backend)
            .record(s.started.elapsed().as_secs_f64());
        let cid = s.cid.as_deref();
        match res {
            Ok(()) => {
                metrics::counter!("messages_in_total", "backend" => backend).increment(1);
                gw.settle(&s.room, &s.user, cid, true).await;
                Ok(s.id)
            }
            Err(e) => {
                metrics::counter!("publish_errors_total", "backend" => backend).increment(1);
                gw.settle(&s.room, &s.user, cid, false).await;
                if let Err(e) = gw.store.void_seq(&s.room, s.seq).await {
                    tracing::warn!(error = %e, room = %s.room, seq = s.seq, "position not voided: recovery across it will report a gap");
                }
                Err(SendError::Bus(format!("message not sent: {e}")))
            }
        }
    }
}

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
    /// Striped per-room send locks (see [`Gateway::room_turn`]).
    turns: Vec<tokio::sync::Mutex<()>>,
    /// Hands out room positions and settles claims, one statement per burst.
    sequencer: sequencer::Sequencer,
    /// Heartbeat and expiry of cluster presence (see [`presence`]).
    pub presence: PresenceConfig,
}

/// Stripes of the per-room send lock.
const TURN_STRIPES: usize = 1024;

impl Gateway {
    pub fn new(
        bus: Arc<dyn MessageBus>,
        store: Store,
        ids: Arc<IdGen>,
        limits: Limits,
        presence: PresenceConfig,
        instance: String,
        shutdown: CancellationToken,
    ) -> Gateway {
        let rooms = Arc::new(Rooms::new(
            instance.clone(),
            limits.history_on_join.max(0) as usize,
            std::time::Duration::from_millis(limits.live_reorder_wait_ms),
        ));
        Gateway {
            bus,
            rooms,
            sequencer: sequencer::Sequencer::spawn(store.clone()),
            store,
            ids,
            limits,
            instance,
            shutdown,
            connections: AtomicI64::new(0),
            presence,
            turns: (0..TURN_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// Publishes one chat message from `user` and returns its id once the bus
    /// accepted it, or why it was not sent. Used by `POST`; a WebSocket
    /// connection calls [`Gateway::begin_chat`] and [`PendingSend::finish`]
    /// itself so it can read its next frame while the bus confirms.
    pub async fn publish_chat(
        &self,
        room: RoomId,
        user: String,
        text: String,
        cid: Option<&str>,
    ) -> Result<String, SendError> {
        self.begin_chat(room, user, text, cid)
            .await?
            .finish(self)
            .await
    }

    /// The ordered half of a send: takes the message id and the room's next
    /// position and hands the message to the bus ([`MessageBus::submit`]),
    /// then returns without waiting for the broker's answer.
    ///
    /// With a `cid`, a retry of a send this user already made in this room
    /// (within `SEND_DEDUPE_WINDOW_MS`, on any instance) is not published
    /// again: it gets the original message id. Every message takes the room's
    /// next position ([`Store::next_seq`]) before it is published; a position
    /// whose publish failed is voided so recovery does not wait for it.
    pub async fn begin_chat(
        &self,
        room: RoomId,
        user: String,
        text: String,
        cid: Option<&str>,
    ) -> Result<PendingSend, SendError> {
        let deadline = tokio::time::Instant::now() + self.limits.publish_timeout();
        // One send per room at a time on this instance, from taking the id and
        // position to handing the message to the bus, so this instance's
        // messages reach the bus in position (and id) order. The broker's
        // confirmation is awaited after the turn is released: a room's sends
        // are pipelined, not one broker round trip each.
        let _turn = self.room_turn(&room).lock().await;
        let id = self.ids.next();
        let db = |e: String| {
            SendError::Db(format!(
                "message not sent: its room position could not be taken: {e}"
            ))
        };
        let claim = cid.map(|cid| sequencer::Claim {
            user: user.clone(),
            cid: cid.to_string(),
            id: id.clone(),
        });
        let head = match self.sequencer.next(&room, claim).await.map_err(db)? {
            sequencer::Next::Position(h) => h,
            // A retry, or a race with one: the slow path decides.
            sequencer::Next::Claimed => {
                let cid = cid.unwrap_or_default();
                if let Some(earlier) = self.claim(&room, &user, cid, &id).await? {
                    metrics::counter!("send_retries_deduplicated_total").increment(1);
                    return Ok(PendingSend::Earlier(earlier));
                }
                // Taken over from a dead gateway: the claim is ours now.
                match self.sequencer.next(&room, None).await {
                    Ok(sequencer::Next::Position(h)) => h,
                    // A request without a claim always gets a position.
                    Ok(sequencer::Next::Claimed) | Err(_) => {
                        self.settle(&room, &user, Some(cid), false).await;
                        return Err(db("the sequencer did not answer".into()));
                    }
                }
            }
        };
        let msg = ChatMessage {
            room: room.clone(),
            id: id.clone(),
            user: user.clone(),
            text,
            ts: chrono::Utc::now().timestamp_millis(),
            kind: MessageKind::Chat,
            seq: Some(head.seq),
        };
        let out = Outgoing {
            room: room.clone(),
            payload: Bytes::from(BusEvent::Message(msg).to_json()),
            priority: Priority::Normal,
        };
        let started = std::time::Instant::now();
        let confirm = match tokio::time::timeout_at(deadline, self.bus.submit(out)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BusError::Timeout("the bus did not answer in time".into())),
        };
        Ok(PendingSend::Submitted(Submitted {
            room,
            user,
            cid: cid.map(str::to_string),
            id,
            seq: head.seq,
            confirm,
            started,
            deadline,
        }))
    }

    /// The lock that orders one room's sends on this instance (striped:
    /// bounded memory whatever the number of rooms).
    fn room_turn(&self, room: &RoomId) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        room.as_str().hash(&mut h);
        &self.turns[(h.finish() % self.turns.len() as u64) as usize]
    }

    /// Settles a `cid` claim through the batching [`sequencer::Sequencer`] (the
    /// `ack` does not wait for the statement): kept when published, dropped
    /// otherwise so a retry may publish.
    async fn settle(&self, room: &RoomId, user: &str, cid: Option<&str>, published: bool) {
        let Some(cid) = cid else { return };
        let key = crate::store::SendKey {
            room: room.clone(),
            user: user.to_string(),
            cid: cid.to_string(),
        };
        self.sequencer.settle(key, published).await;
    }

    /// Claims `cid` for message `id`; `Some(id)` of the earlier send when this
    /// is a retry of a confirmed one. A retry racing its still-unconfirmed
    /// original waits for it (up to the publish timeout). A claim left
    /// unconfirmed for longer than two publish timeouts belongs to a gateway
    /// that died mid-send: if its message is stored, that is the answer;
    /// otherwise this send takes the claim over and publishes.
    async fn claim(
        &self,
        room: &RoomId,
        user: &str,
        cid: &str,
        id: &str,
    ) -> Result<Option<String>, SendError> {
        let deadline = tokio::time::Instant::now() + self.limits.publish_timeout();
        let stale_ms = 2 * self.limits.publish_timeout_ms as i64;
        loop {
            let claim = self
                .store
                .claim_send(room, user, cid, id)
                .await
                .map_err(|e| SendError::Db(format!("message not sent: {e}")))?;
            let db = |e: crate::store::StoreError| SendError::Db(format!("message not sent: {e}"));
            match claim {
                None => return Ok(None),
                Some(c) if c.confirmed => return Ok(Some(c.id)),
                Some(c) if chrono::Utc::now().timestamp_millis() - c.created_at > stale_ms => {
                    if self.store.has_message(room, &c.id).await.map_err(db)? {
                        return Ok(Some(c.id));
                    }
                    if self
                        .store
                        .take_over_send(room, user, cid, &c.id, id)
                        .await
                        .map_err(db)?
                    {
                        metrics::counter!("send_claims_taken_over_total").increment(1);
                        return Ok(None);
                    }
                }
                Some(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(SendError::InFlight);
                }
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
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
