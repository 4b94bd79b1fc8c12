//! The room registry of one instance: which local connections are in which
//! room, the members other instances announced, and a short ring of recent
//! messages per room for gap-free recovery of reconnecting clients.
//!
//! The hot path is [`Rooms::dispatch`]: one bus delivery → one shared
//! `Utf8Bytes` frame handed (a reference-count bump) to each member's
//! [`Outlet`]: a `/ws` socket takes it at once ([`super::outbox`]), a STOMP
//! connection's writer from a bounded queue. A member whose queue is full is a
//! slow client and is kicked (close 1013) instead of slowing the room down.
//!
//! Live deliveries go out in room order ([`Rooms::dispatch_live`]): a message
//! whose position is past the next one expected waits for the ones before
//! it (`LIVE_REORDER_WAIT_MS`, counted again whenever some of the held ones
//! go out). Two gateways take a room's
//! positions in one order and their messages can reach the bus in the other;
//! delivered as they came, a client that resumes from the higher position
//! would never get the lower one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Room position up to which delivery here is done: every position up to
    /// it was delivered, or released past when the reorder wait ran out (the
    /// catch-up then fetches it). Where a catch-up after an interrupted live
    /// subscription starts.
    last_seq: Option<i64>,
    /// Messages that came before a position they follow, by position:
    /// delivered as soon as the positions before them are, or when the
    /// reorder wait is up.
    early: BTreeMap<i64, Frame>,
    /// Since when `early` has waited: set when it goes from empty to not
    /// empty, and again whenever some of it goes out (the rest waits anew).
    early_since: Option<Instant>,
    /// A wait task is running for this room ([`Rooms::release_overdue`]).
    waiting: bool,
    /// The position after which messages went out without their
    /// predecessors; the next [`Rooms::release_overdue`] hands it over for a
    /// catch-up.
    skipped_from: Option<i64>,
    /// Which message went out here at each of the room's latest positions.
    seen: Seen,
}

/// How many of a room's latest positions [`Seen`] covers.
const SEEN_WINDOW: usize = 1024;

/// Which message this instance delivered at each of a room's latest
/// [`SEEN_WINDOW`] positions: a 32-bit hash of its id, 0 where none went out
/// (a position passed over, or still to come). 4 KiB per busy room, where
/// the recent ring keeps only `HISTORY_ON_JOIN` frames: a catch-up that
/// spans more than the ring, racing the live stream, still sends each
/// message once.
#[derive(Default)]
struct Seen {
    /// The position of `ids[0]`.
    base: i64,
    ids: VecDeque<u32>,
}

impl Seen {
    /// What went out at `q`: `None` when `q` is outside the window, `Some(0)`
    /// when nothing did.
    fn at(&self, q: i64) -> Option<u32> {
        let i = usize::try_from(q.checked_sub(self.base)?).ok()?;
        self.ids.get(i).copied()
    }

    /// Records that message `h` went out at `q`.
    fn mark(&mut self, q: i64, h: u32) {
        let end = self.base.saturating_add(self.ids.len() as i64);
        if self.ids.is_empty() || q >= end.saturating_add(SEEN_WINDOW as i64) {
            // First position, or far past the window: start it afresh.
            self.ids.clear();
            self.base = q;
        } else if q < self.base {
            return;
        }
        while self.base.saturating_add(self.ids.len() as i64) <= q {
            self.ids.push_back(0);
        }
        if let Some(slot) = usize::try_from(q - self.base)
            .ok()
            .and_then(|i| self.ids.get_mut(i))
        {
            *slot = h;
        }
        while self.ids.len() > SEEN_WINDOW {
            self.ids.pop_front();
            self.base += 1;
        }
    }
}

/// A message id's 32-bit hash for [`Seen`] (never 0, which means none).
fn id_hash(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    let v = h.finish();
    ((v >> 32) as u32 ^ v as u32).max(1)
}

/// Whether `f` is a message this instance already pushed to the room. The
/// bus can hand a message over twice: Kafka produces a record again when the
/// broker's answer was lost (at-least-once), and a catch-up can find in the
/// database what the live stream brings a moment later, or the other way
/// round. A message past the room's position is new (one comparison: the
/// hot path). At or below it, what went out at the message's position
/// ([`Seen`]) tells; a message with another id there is not a repeat. Older
/// than that window, or without a position, the recent ring tells by id, and
/// a repeat older than the ring gets through.
fn already_delivered(r: &Room, f: &Frame) -> bool {
    let Some(id) = f.id.as_deref() else {
        return false;
    };
    if let (Some(q), Some(last)) = (f.seq, r.last_seq)
        && q > last
    {
        return false;
    }
    if let Some(seen) = f.seq.and_then(|q| r.seen.at(q)) {
        return seen == id_hash(id);
    }
    r.recent.iter().any(|g| g.id.as_deref() == Some(id))
}

/// What [`Rooms::dispatch`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// Pushed to (or held for) this many local members; 0 when the room has
    /// none here.
    To(usize),
    /// Dropped: this instance already pushed the same message to the room
    /// (see `already_delivered`).
    Repeat,
    /// Held back: a position before it has not arrived yet. `first`: no
    /// wait runs for the room yet, so the caller starts one: it calls
    /// [`Rooms::release_overdue`] when [`Rooms::reorder_wait`] is up, and
    /// again as long as that says to wait more. `delivered`: live members
    /// reached when this one overflowed the room's hold (more than
    /// `MAX_EARLY` held): then everything held went out at once, past the
    /// missing positions, and the running wait catches the room up.
    Early { first: bool, delivered: usize },
}

/// What [`Rooms::release_overdue`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Release {
    /// Live members reached by the messages it let out.
    pub delivered: usize,
    /// Messages went out past missing positions (now or earlier): catch the
    /// room up from this position.
    pub catch_up_from: Option<i64>,
    /// Messages are still held: call again after this long. `None`: the
    /// room's wait is over.
    pub wait_more: Option<Duration>,
}

/// Largest number of frames held back for one member during a join.
const MAX_HELD: usize = 4096;

/// Most messages one room holds back for a missing position; past it all go
/// out at once and the missing ones are caught up (bounded memory).
const MAX_EARLY: usize = 1024;

pub struct Rooms {
    rooms: DashMap<RoomId, Room>,
    interest: std::sync::RwLock<Option<Arc<dyn RoomInterest>>>,
    ring: usize,
    instance: String,
    reorder_wait: Duration,
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
    /// `ring`: recent messages kept per room; `reorder_wait`: how long a
    /// live message may wait for the positions before it (zero: never).
    pub fn new(instance: String, ring: usize, reorder_wait: Duration) -> Self {
        Rooms {
            rooms: DashMap::new(),
            interest: std::sync::RwLock::new(None),
            ring,
            instance,
            reorder_wait,
        }
    }

    /// How long a live message waits for the positions before it.
    pub fn reorder_wait(&self) -> Duration {
        self.reorder_wait
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
        self.dispatch_with(room, frame, false)
    }

    /// [`Rooms::dispatch`] for a message from the live stream: one whose
    /// position is past the next one expected is held back
    /// ([`Dispatched::Early`]) until the positions before it arrive, so the
    /// room's members get its messages in position order. A catch-up's
    /// messages go through [`Rooms::dispatch`]: they are in order already,
    /// and a position the DB marks void never arrives.
    pub fn dispatch_live(&self, room: &RoomId, frame: Frame) -> Dispatched {
        self.dispatch_with(room, frame, !self.reorder_wait.is_zero())
    }

    fn dispatch_with(&self, room: &RoomId, frame: Frame, hold: bool) -> Dispatched {
        let Some(mut r) = self.rooms.get_mut(room) else {
            return Dispatched::To(0);
        };
        if already_delivered(&r, &frame) {
            return Dispatched::Repeat;
        }
        if hold
            && let (Some(q), Some(last)) = (frame.seq, r.last_seq)
            && q > last + 1
        {
            metrics::counter!("live_reorder_held_total").increment(1);
            if r.early.is_empty() {
                r.early_since = Some(Instant::now());
            }
            let first = !r.waiting;
            r.waiting = true;
            r.early.insert(q, frame);
            let delivered = if r.early.len() > MAX_EARLY {
                self.release_early(&mut r)
            } else {
                0
            };
            return Dispatched::Early { first, delivered };
        }
        let n = self.push(&mut r, frame);
        Dispatched::To(n + self.drain(&mut r))
    }

    /// Pushes one frame to the room's members, moves the room's position and
    /// keeps the frame in the recent ring. Returns the live members reached.
    fn push(&self, r: &mut Room, frame: Frame) -> usize {
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
            if let Some(id) = frame.id.as_deref() {
                r.seen.mark(q, id_hash(id));
            }
        }
        if frame.id.is_some() && self.ring > 0 {
            if r.recent.len() == self.ring {
                r.recent.pop_front();
            }
            r.recent.push_back(frame);
        }
        n
    }

    /// Delivers the held-back messages whose predecessors are all out now.
    fn drain(&self, r: &mut Room) -> usize {
        let (mut n, mut moved) = (0, false);
        while let Some(e) = r.early.first_entry() {
            if r.last_seq.is_some_and(|l| *e.key() > l + 1) {
                break;
            }
            let f = e.remove();
            moved = true;
            if !already_delivered(r, &f) {
                n += self.push(r, f);
            }
        }
        if r.early.is_empty() {
            r.early_since = None;
        } else if moved {
            r.early_since = Some(Instant::now());
        }
        n
    }

    /// Delivers every held-back message in position order, past the missing
    /// ones, and notes where the room must be caught up from.
    fn release_early(&self, r: &mut Room) -> usize {
        metrics::counter!("live_reorder_released_total").increment(1);
        if let Some(last) = r.last_seq {
            r.skipped_from = Some(r.skipped_from.map_or(last, |s| s.min(last)));
        }
        let mut n = 0;
        for (_, f) in std::mem::take(&mut r.early) {
            if !already_delivered(r, &f) {
                n += self.push(r, f);
            }
        }
        r.early_since = None;
        n
    }

    /// Once `room`'s held-back messages have waited the reorder wait:
    /// delivers them all, past the positions still missing. The missing ones
    /// may be in the DB, or the clients get a `gap`: see
    /// [`Release::catch_up_from`].
    pub fn release_overdue(&self, room: &RoomId) -> Release {
        let Some(mut r) = self.rooms.get_mut(room) else {
            return Release {
                delivered: 0,
                catch_up_from: None,
                wait_more: None,
            };
        };
        let overdue = r
            .early_since
            .is_some_and(|t| t.elapsed() >= self.reorder_wait);
        let delivered = if overdue {
            self.release_early(&mut r)
        } else {
            0
        };
        let wait_more = r
            .early_since
            .map(|t| self.reorder_wait.saturating_sub(t.elapsed()));
        r.waiting = wait_more.is_some();
        Release {
            delivered,
            catch_up_from: r.skipped_from.take(),
            wait_more,
        }
    }

    /// Records that the room's stream is known up to position `seq` (a
    /// member joined when the head was there).
    pub fn advance(&self, room: &RoomId, seq: i64) {
        if let Some(mut r) = self.rooms.get_mut(room) {
            r.last_seq = Some(r.last_seq.map_or(seq, |l| l.max(seq)));
            self.drain(&mut r);
        }
    }

    /// The recent ring of `room` (what this instance delivered lately).
    pub fn recent(&self, room: &RoomId) -> Vec<Frame> {
        self.rooms
            .get(room)
            .map(|r| r.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every room with local members and the position up to which delivery
    /// in it is done (see `Room::last_seq`).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(q: i64) -> Frame {
        Frame {
            id: Some(Arc::from(format!("m{q}"))),
            seq: Some(q),
            text: Utf8Bytes::from(format!("{q}")),
        }
    }

    /// A room with one live member at position 4 (it joined there), a recent
    /// ring of `ring` frames.
    async fn room_at_4(ring: usize, wait: Duration) -> (Rooms, RoomId, flume::Receiver<Frame>) {
        let rooms = Rooms::new("i".into(), ring, wait);
        let room = RoomId::parse("chat.order").expect("room");
        let (tx, rx) = flume::bounded(2 * MAX_EARLY);
        rooms
            .enter(
                &room,
                1,
                Arc::from("u"),
                Outlet::Queue(tx),
                CancellationToken::new(),
                0,
            )
            .await
            .expect("enter");
        rooms.release(&room, 1, &HashSet::new());
        rooms.advance(&room, 4);
        (rooms, room, rx)
    }

    fn got(rx: &flume::Receiver<Frame>) -> Vec<i64> {
        rx.try_iter().filter_map(|f| f.seq).collect()
    }

    #[tokio::test]
    async fn live_messages_go_out_in_position_order() {
        let (rooms, room, rx) = room_at_4(100, Duration::from_secs(60)).await;
        assert_eq!(rooms.dispatch_live(&room, frame(5)), Dispatched::To(1));
        // 7 and 8 overtook 6 on the way.
        assert_eq!(
            rooms.dispatch_live(&room, frame(7)),
            Dispatched::Early {
                first: true,
                delivered: 0
            }
        );
        assert_eq!(
            rooms.dispatch_live(&room, frame(8)),
            Dispatched::Early {
                first: false,
                delivered: 0
            }
        );
        assert_eq!(got(&rx), [5]);
        let r = rooms.release_overdue(&room);
        assert_eq!((r.delivered, r.catch_up_from), (0, None), "not overdue");
        assert!(r.wait_more.is_some(), "still waiting");
        assert_eq!(rooms.dispatch_live(&room, frame(6)), Dispatched::To(3));
        assert_eq!(got(&rx), [6, 7, 8]);
        assert_eq!(rooms.dispatch_live(&room, frame(7)), Dispatched::Repeat);
        assert_eq!(rooms.positions(), [(room.clone(), Some(8))]);
        let done = Release {
            delivered: 0,
            catch_up_from: None,
            wait_more: None,
        };
        assert_eq!(rooms.release_overdue(&room), done, "nothing held");
        // The wait is over: the next message held starts a new one.
        assert_eq!(
            rooms.dispatch_live(&room, frame(10)),
            Dispatched::Early {
                first: true,
                delivered: 0
            }
        );
    }

    #[tokio::test]
    async fn a_position_that_never_comes_holds_the_room_only_for_the_wait() {
        let (rooms, room, rx) = room_at_4(100, Duration::from_millis(20)).await;
        rooms.dispatch_live(&room, frame(5));
        assert_eq!(
            rooms.dispatch_live(&room, frame(7)),
            Dispatched::Early {
                first: true,
                delivered: 0
            }
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        // 6 never came: 7 goes out, and the room is caught up from 5.
        let r = rooms.release_overdue(&room);
        assert_eq!(
            (r.delivered, r.catch_up_from, r.wait_more),
            (1, Some(5), None)
        );
        assert_eq!(got(&rx), [5, 7]);
        // The catch-up brings 6 late; what follows is in order again.
        assert_eq!(rooms.dispatch(&room, frame(6)), Dispatched::To(1));
        assert_eq!(rooms.dispatch_live(&room, frame(8)), Dispatched::To(1));
        assert_eq!(got(&rx), [6, 8]);
    }

    #[tokio::test]
    async fn a_catch_up_or_a_join_releases_what_it_covers() {
        let (rooms, room, rx) = room_at_4(100, Duration::from_secs(60)).await;
        rooms.dispatch_live(&room, frame(6));
        rooms.dispatch_live(&room, frame(8));
        // A catch-up's messages are never held; they release what follows.
        assert_eq!(rooms.dispatch(&room, frame(5)), Dispatched::To(2));
        assert_eq!(got(&rx), [5, 6]);
        // A member joined with the head at 7: 8 is next.
        rooms.advance(&room, 7);
        assert_eq!(got(&rx), [8]);
    }

    #[tokio::test]
    async fn too_many_held_go_out_at_once_and_the_gap_is_caught_up() {
        let (rooms, room, rx) = room_at_4(100, Duration::from_secs(60)).await;
        let last = 6 + MAX_EARLY as i64;
        for q in 6..last {
            rooms.dispatch_live(&room, frame(q));
        }
        // The one too many lets all out, and says how many were delivered.
        assert_eq!(
            rooms.dispatch_live(&room, frame(last)),
            Dispatched::Early {
                first: false,
                delivered: MAX_EARLY + 1
            }
        );
        // All went out at once, in order, past the missing 5.
        let want: Vec<i64> = (6..6 + MAX_EARLY as i64 + 1).collect();
        assert_eq!(got(&rx), want);
        assert_eq!(rooms.release_overdue(&room).catch_up_from, Some(4));
    }

    #[tokio::test]
    async fn what_is_still_held_waits_anew_when_some_of_it_went_out() {
        let (rooms, room, rx) = room_at_4(100, Duration::from_millis(200)).await;
        rooms.dispatch_live(&room, frame(6));
        rooms.dispatch_live(&room, frame(8));
        tokio::time::sleep(Duration::from_millis(150)).await;
        // 5 comes: 5 and 6 go out; 8 (waiting for 7) waits a full wait again.
        assert_eq!(rooms.dispatch_live(&room, frame(5)), Dispatched::To(2));
        let r = rooms.release_overdue(&room);
        assert_eq!(r.delivered, 0);
        assert!(
            r.wait_more.is_some_and(|w| w > Duration::from_millis(100)),
            "{r:?}"
        );
        assert_eq!(got(&rx), [5, 6]);
    }

    /// A catch-up finding what went out long ago (gone from the ring) does
    /// not send it again; a position passed over still gets its message, and
    /// another message at a position is not taken for a repeat.
    #[tokio::test]
    async fn a_repeat_older_than_the_ring_is_dropped_and_a_passed_position_filled() {
        let (rooms, room, rx) = room_at_4(2, Duration::from_secs(60)).await;
        for q in [5, 6, 7, 9, 10] {
            rooms.dispatch(&room, frame(q));
        }
        assert_eq!(got(&rx), [5, 6, 7, 9, 10]);
        // 5 and 6 left the two-frame ring long ago: still repeats.
        assert_eq!(rooms.dispatch(&room, frame(5)), Dispatched::Repeat);
        assert_eq!(rooms.dispatch_live(&room, frame(6)), Dispatched::Repeat);
        // 8 was passed over: late, not a repeat, and only once.
        assert_eq!(rooms.dispatch(&room, frame(8)), Dispatched::To(1));
        assert_eq!(rooms.dispatch(&room, frame(8)), Dispatched::Repeat);
        // Another message at 5 is not the one that went out there.
        let other = Frame {
            id: Some(Arc::from("other")),
            ..frame(5)
        };
        assert_eq!(rooms.dispatch(&room, other), Dispatched::To(1));
        assert_eq!(got(&rx), [8, 5]);
    }

    #[test]
    fn seen_covers_the_latest_positions_only() {
        let mut s = Seen::default();
        s.mark(10, 7);
        s.mark(12, 9);
        assert_eq!(
            (s.at(9), s.at(10), s.at(11), s.at(12), s.at(13)),
            (None, Some(7), Some(0), Some(9), None)
        );
        s.mark(10 + SEEN_WINDOW as i64, 3);
        assert_eq!(s.ids.len(), SEEN_WINDOW);
        assert_eq!((s.at(10), s.at(11), s.at(12)), (None, Some(0), Some(9)));
        // Older than the window: not recorded.
        s.mark(5, 1);
        assert_eq!(s.at(5), None);
        // Far past the window: it starts afresh.
        s.mark(100_000, 4);
        assert_eq!((s.ids.len(), s.at(100_000), s.at(12)), (1, Some(4), None));
    }

    #[tokio::test]
    async fn no_wait_delivers_in_arrival_order() {
        let (rooms, room, rx) = room_at_4(100, Duration::ZERO).await;
        rooms.dispatch_live(&room, frame(7));
        rooms.dispatch_live(&room, frame(5));
        assert_eq!(got(&rx), [7, 5]);
    }
}
