//! What a joining client gets after `joined`: the latest messages, or — with
//! `since` — the messages it missed, and whether that set is provably complete.
//!
//! Two sources are merged by id: the DB (everything the db-writer committed)
//! and this instance's recent ring (what it delivered lately, which covers
//! what the persistence batch has not written yet). The member's live frames
//! are held back meanwhile ([`super::rooms::Rooms::enter`]) and released after
//! this history, skipping ids already sent, so nothing is lost or repeated.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::rooms::Frame;
use crate::protocol::{BusEvent, RoomId};
use crate::store::Store;

/// The history to send after `joined` and the `recovered` flag.
pub struct Recovery {
    pub frames: Vec<Frame>,
    /// `true` only with `since`, when every message after it is in `frames`.
    pub recovered: bool,
}

/// Merges the DB and the ring snapshot `recent` into at most `limit` frames
/// after `since` (or the latest `limit` without it). `recovered` is `true`
/// when `since` is known (in the ring or the DB, or older than the ring's
/// oldest message), the DB answered, and no more than `limit` messages follow
/// it.
pub async fn history(
    store: &Store,
    room: &RoomId,
    since: Option<&str>,
    recent: Vec<Frame>,
    limit: i64,
) -> Recovery {
    let limit = limit.max(1);
    let mut by_id: BTreeMap<Arc<str>, Frame> = recent
        .into_iter()
        .filter_map(|f| f.id.clone().map(|id| (id, f)))
        .collect();
    let ring_has_since = since.is_some_and(|s| by_id.contains_key(s));
    let ring_oldest = by_id.keys().next().cloned();
    let db = match since {
        Some(s) => store.after(room, s, limit + 1).await,
        None => store.history(room, None, limit).await,
    };
    let db_rows = match db {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, %room, "history unavailable");
            Vec::new()
        }
    };
    let mut db_ok = true;
    for m in db_rows {
        let id: Arc<str> = Arc::from(m.id.as_str());
        by_id.entry(id.clone()).or_insert_with(|| Frame {
            id: Some(id),
            text: Utf8Bytes::from(BusEvent::Message(m).to_json()),
        });
    }
    let recovered = match since {
        None => false,
        Some(s) => {
            by_id.retain(|k, _| &**k > s);
            let known = ring_has_since
                || match store.has_message(room, s).await {
                    Ok(found) => found,
                    Err(_) => {
                        db_ok = false;
                        false
                    }
                }
                // The ring starts at or before `since`: nothing can be missing.
                || ring_oldest.as_deref().is_some_and(|o| o <= s);
            known && db_ok && by_id.len() as i64 <= limit
        }
    };
    let mut frames: Vec<Frame> = by_id.into_values().collect();
    if frames.len() as i64 > limit {
        frames.drain(..frames.len() - limit as usize);
    }
    Recovery { frames, recovered }
}
