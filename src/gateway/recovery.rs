//! What a joining client gets after `joined`: the latest messages, or — with a
//! cursor — the messages it missed, and whether that set is *provably*
//! complete (`recovered: true`).
//!
//! The proof rests on the room cursor: every chat message takes its room's
//! next position (`seq`) from the store before it is published
//! ([`crate::store::Store::next_seq`]), and a position whose publish failed is
//! voided. So after a client's position `s`, the room's head `h` (read after
//! the member was registered, so anything published later reaches it live)
//! says exactly which positions exist: `s+1 ..= h`. Each must be found in one
//! of three places — this instance's recent ring, the frames held back for the
//! joining member (arrived live since it entered), or the DB — or be void.
//! While the db-writer is behind, recovery waits for it (up to
//! `RECOVERY_WAIT_MS`); if a position is still missing then, or more than
//! `HISTORY_ON_JOIN` are missed, or the cursor is unknown (another epoch, a
//! message id never stored), the answer is `recovered: false` with what was
//! found. The frames go out in room order; the member's held frames are
//! released after them, skipping ids already sent.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

use super::Gateway;
use super::rooms::{ConnId, Dispatched, Frame};
use crate::protocol::{BusEvent, ChatMessage, RoomId, ServerFrame};
use crate::store::RoomHead;

/// Where a client says it is in a room (the fields of its `join`).
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// The last message id it saw.
    pub id: Option<String>,
    /// That message's position and the epoch from `joined`.
    pub seq: Option<i64>,
    pub epoch: Option<String>,
}

impl Cursor {
    fn is_empty(&self) -> bool {
        self.id.is_none() && self.seq.is_none()
    }
}

/// The history to send after `joined`.
pub struct Recovery {
    pub frames: Vec<Frame>,
    /// `true` only with a cursor, when every message after it is in `frames`
    /// (or already held for the member).
    pub recovered: bool,
    /// The room's head when the member joined (`None`: no message yet, or the
    /// DB did not answer).
    pub head: Option<RoomHead>,
}

/// How often recovery looks again while the db-writer catches up.
const POLL: Duration = Duration::from_millis(100);

fn frame_of(m: ChatMessage) -> Frame {
    let id: Arc<str> = Arc::from(m.id.as_str());
    let seq = m.seq;
    Frame {
        id: Some(id),
        seq,
        text: Utf8Bytes::from(BusEvent::Message(m).to_json()),
    }
}

/// Builds the history for member `conn` of `room`, who just entered (its
/// live frames are being held) with `recent` as the ring snapshot.
pub async fn history(
    gw: &Gateway,
    room: &RoomId,
    conn: ConnId,
    since: &Cursor,
    recent: Vec<Frame>,
) -> Recovery {
    let limit = gw.limits.history_on_join.max(1);
    let head = match gw.store.room_head(room).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, %room, "room head unavailable");
            return Recovery {
                frames: latest(gw, room, recent, limit).await,
                recovered: false,
                head: None,
            };
        }
    };
    if since.is_empty() {
        return Recovery {
            frames: latest(gw, room, recent, limit).await,
            recovered: false,
            head,
        };
    }
    let Some(from) = resolve(gw, room, since, head.as_ref(), &recent).await else {
        // The cursor cannot be placed: send what follows its id, if it has
        // one, without vouching for it.
        let frames = match since.id.as_deref() {
            Some(id) => after_id(gw, room, id, recent, limit).await,
            None => latest(gw, room, recent, limit).await,
        };
        return Recovery {
            frames,
            recovered: false,
            head,
        };
    };
    let upto = head.as_ref().map_or(0, |h| h.seq);
    if from > upto || upto - from > limit {
        // A position from the future (a counter that was reset without its
        // epoch changing), or more missed than one join may send.
        return Recovery {
            frames: latest(gw, room, recent, limit).await,
            recovered: false,
            head,
        };
    }
    let ring: Vec<Frame> = recent
        .into_iter()
        .filter(|f| f.seq.is_some_and(|q| q > from && q <= upto))
        .collect();
    let (found, complete) = account(gw, room, from, upto, || {
        let mut local = ring.clone();
        local.extend(gw.rooms.held(room, conn));
        local
    })
    .await;
    Recovery {
        frames: found.into_values().collect(),
        recovered: complete,
        head,
    }
}

/// Finds every position `from+1 ..= upto` of `room` among `local()` frames
/// (looked at again on every poll) and the DB, or void; waits for the
/// db-writer up to `RECOVERY_WAIT_MS`. Returns the frames found, in room
/// order, and whether every position was accounted for.
async fn account(
    gw: &Gateway,
    room: &RoomId,
    from: i64,
    upto: i64,
    local: impl Fn() -> Vec<Frame>,
) -> (BTreeMap<i64, Frame>, bool) {
    let wait = Duration::from_millis(gw.limits.recovery_wait_ms);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut found: BTreeMap<i64, Frame> = BTreeMap::new();
        let mut void: HashSet<i64> = HashSet::new();
        for f in local() {
            if let Some(q) = f.seq.filter(|q| *q > from && *q <= upto) {
                found.entry(q).or_insert(f);
            }
        }
        let mut db_ok = true;
        if (from + 1..=upto).any(|q| !found.contains_key(&q)) {
            match gw.store.seq_range(room, from, upto).await {
                Ok((rows, voids)) => {
                    for m in rows {
                        if let Some(q) = m.seq {
                            found.entry(q).or_insert_with(|| frame_of(m));
                        }
                    }
                    void.extend(voids);
                }
                Err(e) => {
                    tracing::warn!(error = %e, %room, "recovery: DB unavailable");
                    db_ok = false;
                }
            }
        }
        let complete =
            db_ok && (from + 1..=upto).all(|q| found.contains_key(&q) || void.contains(&q));
        if complete || tokio::time::Instant::now() >= deadline {
            if !complete {
                metrics::counter!("recovery_incomplete_total").increment(1);
            }
            return (found, complete);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// After this instance's live subscription of `room` was interrupted (its
/// last delivered position was `from`): delivers to the room's local members
/// what they missed, from the DB, or — when not everything can be found —
/// tells them with a `gap` frame, so no client silently misses a message.
pub async fn catch_up(gw: &Gateway, room: &RoomId, from: i64) {
    let head = match gw.store.room_head(room).await {
        Ok(Some(h)) => Some(h.seq),
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, %room, "catch-up: room head unavailable");
            None
        }
    };
    if head.is_some_and(|h| h <= from) {
        return;
    }
    let (found, complete) = match head {
        Some(h) => account(gw, room, from, h, || gw.rooms.recent(room)).await,
        None => (BTreeMap::new(), false),
    };
    // What the live stream brought meanwhile is in the ring: dispatch skips it.
    let filled = found
        .into_values()
        .map(|f| gw.rooms.dispatch(room, f))
        .filter(|d| *d != Dispatched::Repeat)
        .count() as u64;
    metrics::counter!("live_gap_filled_total").increment(filled);
    if !complete {
        metrics::counter!("live_gap_told_total").increment(1);
        let gap = ServerFrame::Gap {
            room,
            from_seq: from,
            to_seq: head,
        };
        gw.rooms.dispatch(
            room,
            Frame {
                id: None,
                seq: None,
                text: Utf8Bytes::from(gap.to_json()),
            },
        );
    }
}

/// The client's position, when the server can place it: its `since_seq` in
/// the current epoch, or the position of its `since` message id (from the
/// ring or the DB).
async fn resolve(
    gw: &Gateway,
    room: &RoomId,
    since: &Cursor,
    head: Option<&RoomHead>,
    recent: &[Frame],
) -> Option<i64> {
    if let (Some(seq), Some(epoch)) = (since.seq, since.epoch.as_deref()) {
        return match head {
            Some(h) if h.epoch == epoch => Some(seq),
            _ => None,
        };
    }
    let id = since.id.as_deref()?;
    if let Some(seq) = recent
        .iter()
        .find(|f| f.id.as_deref() == Some(id))
        .and_then(|f| f.seq)
    {
        return Some(seq);
    }
    // Not in the ring: the DB places it — once the db-writer has stored it,
    // so a recent id is worth waiting for (an old or malformed one is not).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(gw.limits.recovery_wait_ms);
    loop {
        match gw.store.seq_of(room, id).await {
            Ok(Some(seq)) => return Some(seq),
            Ok(None) if recently_minted(id) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(POLL).await;
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, %room, "recovery: cannot place since id");
                return None;
            }
        }
    }
}

/// A message id minted in the last hour (and not in the future): it may still
/// be on its way to the DB.
fn recently_minted(id: &str) -> bool {
    let Ok(u) = ulid::Ulid::from_string(id) else {
        return false;
    };
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let at = u.timestamp_ms();
    at <= now + 60_000 && at + 3_600_000 >= now
}

/// The latest `limit` messages, from the DB merged with the ring, in room
/// order (messages stored before cursors existed sort by id).
async fn latest(gw: &Gateway, room: &RoomId, recent: Vec<Frame>, limit: i64) -> Vec<Frame> {
    let mut by_id: BTreeMap<Arc<str>, Frame> = recent
        .into_iter()
        .filter_map(|f| f.id.clone().map(|id| (id, f)))
        .collect();
    match gw.store.history(room, None, limit).await {
        Ok(rows) => {
            for m in rows {
                let id: Arc<str> = Arc::from(m.id.as_str());
                by_id.entry(id).or_insert_with(|| frame_of(m));
            }
        }
        Err(e) => tracing::warn!(error = %e, %room, "history unavailable"),
    }
    let mut frames: Vec<Frame> = by_id.into_values().collect();
    frames.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    if frames.len() as i64 > limit {
        frames.drain(..frames.len() - limit as usize);
    }
    frames
}

/// Messages whose id sorts after `id` (DB and ring), at most `limit`: the best
/// effort for a cursor that cannot be placed.
async fn after_id(
    gw: &Gateway,
    room: &RoomId,
    id: &str,
    recent: Vec<Frame>,
    limit: i64,
) -> Vec<Frame> {
    let mut by_id: BTreeMap<Arc<str>, Frame> = recent
        .into_iter()
        .filter_map(|f| f.id.clone().map(|i| (i, f)))
        .filter(|(i, _)| &**i > id)
        .collect();
    match gw.store.after(room, id, limit).await {
        Ok(rows) => {
            for m in rows {
                let i: Arc<str> = Arc::from(m.id.as_str());
                by_id.entry(i).or_insert_with(|| frame_of(m));
            }
        }
        Err(e) => tracing::warn!(error = %e, %room, "history unavailable"),
    }
    let mut frames: Vec<Frame> = by_id.into_values().collect();
    frames.truncate(limit.max(0) as usize);
    frames
}
