//! The room registry of one instance: which local connections are in which
//! room, the members other instances announced, and a short ring of recent
//! messages per room for gap-free recovery of reconnecting clients.
//!
//! The hot path is [`Rooms::dispatch`]: one bus delivery → one shared
//! `Utf8Bytes` frame handed (a reference-count bump) to each member's
//! [`Outlet`]: a `/ws` socket takes it at once ([`super::outbox`]), a STOMP
//! connection's writer from a bounded queue. A member whose queue is full is a
//! slow client and is kicked (close 1013) instead of slowing the room down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::outbox::{Full, Outbox};
use crate::bus::{BusError, RoomInterest};
use crate::protocol::{PresenceEvent, RoomId};

/// A frame queued for one connection: text plus, for chat messages, the id
/// (used to drop duplicates while a join is replaying history).
#[derive(Clone, Debug)]
pub struct Frame {
    pub id: Option<Arc<str>>,
    /// The message's room position, when it has one (see `recovery`).
    pub seq: Option<i64>,
    pub text: Utf8Bytes,
}

pub type ConnId = u64;

/// Disconnects a client that reads slower than it is sent to (close 1013),
/// counted in `ws_slow_client_kicks_total` — the one place for every
/// protocol and path that finds a client's queue full.
pub(crate) fn kick_slow(kick: &CancellationToken) {
    metrics::counter!("ws_slow_client_kicks_total").increment(1);
    kick.cancel();
}

/// Where a member's frames go.
#[derive(Clone)]
pub enum Outlet {
    /// A `/ws` socket: written into directly, queued only when it cannot
    /// take more at once.
    Socket(Arc<Outbox>),
    /// A STOMP connection: its writer turns each frame into one `MESSAGE`
    /// per subscription, so it takes them from a bounded queue.
    Queue(flume::Sender<Frame>),
}

impl Outlet {
    /// Hands a frame over; `Err(Full)` when the client is too slow. A
    /// connection that is going away takes frames and drops them.
    pub fn offer(&self, f: Frame) -> Result<(), Full> {
        match self {
            Outlet::Socket(o) => o.push(f.text),
            Outlet::Queue(q) => match q.try_send(f) {
                Err(flume::TrySendError::Full(_)) => Err(Full),
                Ok(()) | Err(flume::TrySendError::Disconnected(_)) => Ok(()),
            },
        }
    }
}

/// Where a member's frames go: during a join they are held back until the
/// history has been sent, then the held frames are flushed in order.
enum Sink {
    Live,
    Joining(Vec<Frame>),
}

struct Member {
    user: Arc<str>,
    out: Outlet,
    kick: CancellationToken,
    sink: Sink,
}

#[derive(Default)]
struct Room {
    local: HashMap<ConnId, Member>,
    /// (instance, user) → open connections, learned from presence events.
    remote: HashMap<(String, String), u32>,
    recent: VecDeque<Frame>,
    /// Highest room position delivered here (for catch-up after this
    /// instance's live subscription was interrupted).
    last_seq: Option<i64>,
}

/// Whether `f` is a message this instance already pushed to the room. The
/// bus can hand a message over twice: Kafka produces a record again when the
/// broker's answer was lost (at-least-once), and a catch-up can find in the
/// database what the live stream brings a moment later. Looked up by id in
/// the recent ring, and only when the message is not past the room's last
/// position, so a message in order costs one comparison. A repeat older than
/// the ring gets through.
fn already_delivered(r: &Room, f: &Frame) -> bool {
    let Some(id) = f.id.as_deref() else {
        return false;
    };
    if let (Some(q), Some(last)) = (f.seq, r.last_seq)
        && q > last
    {
        return false;
    }
    r.recent.iter().any(|g| g.id.as_deref() == Some(id))
}

/// What [`Rooms::dispatch`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// Pushed to (or held for) this many local members; 0 when the room has
    /// none here.
    To(usize),
    /// Dropped: the same message is in the room's recent ring.
    Repeat,
}

/// Largest number of frames held back for one member during a join.
const MAX_HELD: usize = 4096;

pub struct Rooms {
    rooms: DashMap<RoomId, Room>,
    interest: std::sync::RwLock<Option<Arc<dyn RoomInterest>>>,
    ring: usize,
    instance: String,
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("the room is full ({0} members on this instance)")]
    Full(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What a join got: the recent ring snapshot (for recovery).
pub struct JoinTicket {
    pub recent: Vec<Frame>,
    pub first_in_room: bool,
}

impl Rooms {
    pub fn new(instance: String, ring: usize) -> Self {
        Rooms {
            rooms: DashMap::new(),
            interest: std::sync::RwLock::new(None),
            ring,
            instance,
        }
    }

    /// Installs the live-delivery subscription's room handle and re-adds every
    /// room with local members (after a re-subscribe).
    pub async fn set_interest(&self, interest: Arc<dyn RoomInterest>) -> Result<(), BusError> {
        if let Ok(mut i) = self.interest.write() {
            *i = Some(interest.clone());
        }
        let rooms: Vec<RoomId> = self.rooms.iter().map(|r| r.key().clone()).collect();
        for r in rooms {
            interest.add_room(&r).await?;
        }
        Ok(())
    }

    fn interest(&self) -> Option<Arc<dyn RoomInterest>> {
        self.interest.read().ok().and_then(|i| i.clone())
    }

    pub fn local_rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Registers a connection in a room with its frames held back. Call
    /// [`Rooms::release`] once history was sent. The bus interest for the room is
    /// added (and confirmed) before this returns, so nothing published after
    /// it is missed.
    pub async fn enter(
        &self,
        room: &RoomId,
        conn: ConnId,
        user: Arc<str>,
        out: Outlet,
        kick: CancellationToken,
        max_members: usize,
    ) -> Result<JoinTicket, EnterError> {
        let (first, recent) = {
            let mut r = self.rooms.entry(room.clone()).or_default();
            if max_members > 0 && r.local.len() >= max_members {
                return Err(EnterError::Full(max_members));
            }
            let first = r.local.is_empty();
            r.local.insert(
                conn,
                Member {
                    user,
                    out,
                    kick,
                    sink: Sink::Joining(Vec::new()),
                },
            );
            (first, r.recent.iter().cloned().collect())
        };
        if first
            && let Some(i) = self.interest()
            && let Err(e) = i.add_room(room).await
        {
            self.remove(room, conn).await;
            return Err(e.into());
        }
        Ok(JoinTicket {
            recent,
            first_in_room: first,
        })
    }

    /// Flushes the frames held during the join (skipping ids already sent with
    /// the history) and switches the member to live delivery, atomically with
    /// respect to new deliveries so nothing is reordered.
    pub fn release(&self, room: &RoomId, conn: ConnId, sent: &HashSet<Arc<str>>) {
        if let Some(mut r) = self.rooms.get_mut(room)
            && let Some(m) = r.local.get_mut(&conn)
            && let Sink::Joining(held) = std::mem::replace(&mut m.sink, Sink::Live)
        {
            for f in held {
                if f.id.as_ref().is_some_and(|id| sent.contains(id)) {
                    continue;
                }
                if m.out.offer(f).is_err() {
                    kick_slow(&m.kick);
                    break;
                }
            }
        }
    }

    /// The frames held back so far for a joining member (they arrived live
    /// after it entered), so recovery can count them as delivered.
    pub fn held(&self, room: &RoomId, conn: ConnId) -> Vec<Frame> {
        match self.rooms.get(room) {
            Some(r) => match r.local.get(&conn).map(|m| &m.sink) {
                Some(Sink::Joining(held)) => held.clone(),
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// Removes a connection from a room; drops the bus interest when it was the
    /// last local member.
    pub async fn remove(&self, room: &RoomId, conn: ConnId) {
        let emptied = match self.rooms.get_mut(room) {
            Some(mut r) => {
                r.local.remove(&conn);
                r.local.is_empty()
            }
            None => false,
        };
        if emptied {
            // Re-check under the map lock: someone may have joined meanwhile.
            let removed = self
                .rooms
                .remove_if(room, |_, r| r.local.is_empty())
                .is_some();
            if removed
                && let Some(i) = self.interest()
                && let Err(e) = i.remove_room(room).await
            {
                tracing::warn!(error = %e, %room, "could not drop room interest");
            }
        }
    }

    /// Current members: local users plus users other instances announced.
    pub fn members(&self, room: &RoomId) -> Vec<String> {
        let mut set: Vec<String> = match self.rooms.get(room) {
            Some(r) => r
                .local
                .values()
                .map(|m| m.user.to_string())
                .chain(r.remote.keys().map(|(_, u)| u.clone()))
                .collect(),
            None => Vec::new(),
        };
        set.sort();
        set.dedup();
        set
    }

    /// Records a presence event from another instance.
    pub fn remote_presence(&self, room: &RoomId, instance: &str, user: &str, ev: PresenceEvent) {
        if instance == self.instance {
            return;
        }
        if let Some(mut r) = self.rooms.get_mut(room) {
            let key = (instance.to_string(), user.to_string());
            match ev {
                PresenceEvent::Join => *r.remote.entry(key).or_default() += 1,
                PresenceEvent::Leave => {
                    if let Some(n) = r.remote.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            r.remote.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Pushes one frame to every local member of `room`, unless it is a
    /// message this instance already pushed there ([`Dispatched::Repeat`]:
    /// the caller knows what a repeat means and counts it).
    /// A `/ws` member's socket is written here, under the registry's lock for
    /// the room: one `write` each, never a wait — a socket that cannot take
    /// the frame at once gets it queued for its writer task.
    pub fn dispatch(&self, room: &RoomId, frame: Frame) -> Dispatched {
        let Some(mut r) = self.rooms.get_mut(room) else {
            return Dispatched::To(0);
        };
        if already_delivered(&r, &frame) {
            return Dispatched::Repeat;
        }
        let mut n = 0;
        for m in r.local.values_mut() {
            match &mut m.sink {
                Sink::Live => match m.out.offer(frame.clone()) {
                    Ok(()) => n += 1,
                    Err(Full) => kick_slow(&m.kick),
                },
                Sink::Joining(held) => {
                    if held.len() < MAX_HELD {
                        held.push(frame.clone());
                    } else {
                        m.kick.cancel();
                    }
                }
            }
        }
        if let Some(q) = frame.seq {
            r.last_seq = Some(r.last_seq.map_or(q, |l| l.max(q)));
        }
        if frame.id.is_some() && self.ring > 0 {
            if r.recent.len() == self.ring {
                r.recent.pop_front();
            }
            r.recent.push_back(frame);
        }
        Dispatched::To(n)
    }

    /// Records that the room's stream is known up to position `seq` (a
    /// member joined when the head was there).
    pub fn advance(&self, room: &RoomId, seq: i64) {
        if let Some(mut r) = self.rooms.get_mut(room) {
            r.last_seq = Some(r.last_seq.map_or(seq, |l| l.max(seq)));
        }
    }

    /// The recent ring of `room` (what this instance delivered lately).
    pub fn recent(&self, room: &RoomId) -> Vec<Frame> {
        self.rooms
            .get(room)
            .map(|r| r.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every room with local members and the highest position delivered in it.
    pub fn positions(&self) -> Vec<(RoomId, Option<i64>)> {
        self.rooms
            .iter()
            .map(|r| (r.key().clone(), r.last_seq))
            .collect()
    }

    /// This instance's members per room: (room, user, connections).
    pub fn local_members(&self) -> Vec<(RoomId, String, i64)> {
        let mut out = Vec::new();
        for r in self.rooms.iter() {
            let mut per_user: HashMap<&str, i64> = HashMap::new();
            for m in r.local.values() {
                *per_user.entry(&m.user).or_default() += 1;
            }
            out.extend(
                per_user
                    .into_iter()
                    .map(|(u, n)| (r.key().clone(), u.to_string(), n)),
            );
        }
        out
    }

    /// Replaces what this instance knows of `room`'s members elsewhere with
    /// `remote` (instance, user) — the shared presence store's view — and
    /// returns the members it dropped whose instance is not in `alive`
    /// and who are not present anywhere else (they must be told as leaves).
    pub fn reconcile(
        &self,
        room: &RoomId,
        remote: &[(String, String)],
        alive: &HashSet<String>,
    ) -> Vec<(String, String)> {
        let Some(mut r) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        let mut next: HashMap<(String, String), u32> = HashMap::new();
        for (inst, user) in remote {
            if *inst != self.instance {
                next.insert((inst.clone(), user.clone()), 1);
            }
        }
        let gone: Vec<(String, String)> = r
            .remote
            .keys()
            .filter(|k| !next.contains_key(*k) && !alive.contains(&k.0))
            .cloned()
            .collect();
        r.remote = next;
        let present: HashSet<&str> = r
            .local
            .values()
            .map(|m| &*m.user)
            .chain(r.remote.keys().map(|(_, u)| u.as_str()))
            .collect();
        gone.into_iter()
            .filter(|(_, user)| !present.contains(user.as_str()))
            .collect()
    }

    /// All room ids with local members.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }
}
