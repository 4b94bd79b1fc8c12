//! Room positions and `cid` claims with group commit. Every send needs its
//! room's next position before it is published, and the counter must be
//! durable — one commit (a WAL flush) per message would cap the relay at the
//! disk's flush rate. So requests queue here and one task takes every queued
//! request at once and answers the whole burst with one statement
//! ([`Store::sequence`]): the claims' outcomes settled since the last burst,
//! the burst's dedupe claims, and the positions of the sends that got one.
//! The settles ride along with the next burst instead of costing a statement
//! each: settles with no send queued behind them wait up to
//! `SETTLE_LINGER` for one, and only then go out by themselves. A released
//! claim (its publish failed) is deleted before the burst so a retry inside
//! it may claim again.

use std::collections::{HashMap, HashSet};

use tokio::sync::{mpsc, oneshot};

use crate::protocol::RoomId;
use crate::store::{RoomHead, SendKey, SeqSend, Sequenced, Store};

/// Most requests answered by one transaction.
const MAX_BATCH: usize = 1024;

/// How long settles wait for a send to ride along with. Nothing but a retry
/// of the same `cid` waits for a settle (and it polls every 50 ms), so this
/// costs no send any latency; without it, at a few hundred sends per second
/// spread over many connections, nearly every settle was a statement of its
/// own — a second round trip to the database per message (BENCHMARKS.md).
const SETTLE_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// A send's dedupe claim: `(room, user, cid)` for message `id`.
pub struct Claim {
    pub user: String,
    pub cid: String,
    pub id: String,
}

/// What the sequencer answers.
#[derive(Debug)]
pub enum Next {
    /// The room's next position (and the claim, if any, is this send's).
    Position(RoomHead),
    /// An earlier send holds the claim: no position was taken.
    Claimed,
}

struct Request {
    room: RoomId,
    claim: Option<Claim>,
    reply: oneshot::Sender<Result<Next, String>>,
}

/// What the batching task is asked: a position, or a claim's outcome.
enum Job {
    Next(Request),
    Settle { key: SendKey, published: bool },
}

/// The handle sends use; the batching task ends when the last handle is
/// dropped.
pub struct Sequencer {
    tx: mpsc::Sender<Job>,
}

impl Sequencer {
    /// Starts the batching task (needs a Tokio runtime).
    pub fn spawn(store: Store) -> Sequencer {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(store, rx));
        Sequencer { tx }
    }

    /// Queues the outcome of claim `key` after the bus answered: kept
    /// (`published`: a retry gets the original id) or released (a retry may
    /// publish). The `ack` does not wait for it; a retry racing it waits for
    /// the claim as before.
    pub async fn settle(&self, key: SendKey, published: bool) {
        if self.tx.send(Job::Settle { key, published }).await.is_err() {
            tracing::warn!("send dedupe: the sequencer stopped; claim not settled");
        }
    }

    /// Claims `claim` (when given) and, unless an earlier send holds it,
    /// takes the next position of `room`; positions of one room are handed
    /// out in the order of these calls.
    pub async fn next(&self, room: &RoomId, claim: Option<Claim>) -> Result<Next, String> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            room: room.clone(),
            claim,
            reply,
        };
        self.tx
            .send(Job::Next(req))
            .await
            .map_err(|_| "the sequencer stopped".to_string())?;
        rx.await.map_err(|_| "the sequencer stopped".to_string())?
    }
}

/// Takes every request already queued behind `first`, up to `max`.
fn burst<T>(first: T, rx: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    batch
}

/// Settles only: waits up to [`SETTLE_LINGER`] for a send, then takes it
/// and whatever queued behind it.
async fn linger(jobs: &mut Vec<Job>, rx: &mut mpsc::Receiver<Job>) {
    let deadline = tokio::time::Instant::now() + SETTLE_LINGER;
    while jobs.len() < MAX_BATCH {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(j @ Job::Next(_))) => {
                let room = MAX_BATCH - jobs.len();
                jobs.extend(burst(j, rx, room));
                return;
            }
            Ok(Some(j)) => jobs.push(j),
            Ok(None) | Err(_) => return,
        }
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = burst(first, &mut rx, MAX_BATCH);
        if jobs.iter().all(|j| matches!(j, Job::Settle { .. })) {
            linger(&mut jobs, &mut rx).await;
        }
        let mut batch = Vec::new();
        let (mut acked, mut failed) = (Vec::new(), Vec::new());
        for job in jobs {
            match job {
                Job::Next(r) => batch.push(r),
                Job::Settle { key, published } if published => acked.push(key),
                Job::Settle { key, .. } => failed.push(key),
            }
        }
        metrics::histogram!("sequencer_batch_size").record(batch.len() as f64);
        // Released claims go first (a retry in this burst may claim again),
        // and so do confirmations of keys this burst claims again (one
        // statement must not both update and claim a row) and, with no sends
        // to ride along with, all of them.
        let claimed: HashSet<(&str, &str, &str)> = batch
            .iter()
            .filter_map(|r| {
                r.claim
                    .as_ref()
                    .map(|c| (r.room.as_str(), c.user.as_str(), c.cid.as_str()))
            })
            .collect();
        let (early, ride): (Vec<SendKey>, Vec<SendKey>) = acked.into_iter().partition(|k| {
            batch.is_empty()
                || claimed.contains(&(k.room.as_str(), k.user.as_str(), k.cid.as_str()))
        });
        if (!early.is_empty() || !failed.is_empty())
            && let Err(e) = store.settle_sends(&early, &failed).await
        {
            tracing::warn!(error = %e, "send dedupe: claims not settled");
        }
        if batch.is_empty() {
            continue;
        }
        let sends: Vec<SeqSend<'_>> = batch
            .iter()
            .map(|r| SeqSend {
                room: &r.room,
                claim: r
                    .claim
                    .as_ref()
                    .map(|c| (c.user.as_str(), c.cid.as_str(), c.id.as_str())),
            })
            .collect();
        let Sequenced { takes, heads } = match store.sequence(&sends, &ride).await {
            Ok(s) => s,
            Err(e) => {
                // Nothing of the statement happened: the confirmations are
                // retried alone, and every send of the burst fails (its
                // claim, if any, was not made).
                if !ride.is_empty()
                    && let Err(e) = store.settle_sends(&ride, &[]).await
                {
                    tracing::warn!(error = %e, "send dedupe: claims not settled");
                }
                let msg = e.to_string();
                for r in batch {
                    let _ = r.reply.send(Err(msg.clone()));
                }
                continue;
            }
        };
        // Each room's n new sends got head - n + 1 ..= head, in burst order.
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for (r, _) in batch.iter().zip(&takes).filter(|(_, t)| **t) {
            *counts.entry(r.room.as_str()).or_default() += 1;
        }
        let mut next: HashMap<String, (i64, String)> = heads
            .into_iter()
            .map(|(room, h)| {
                let n = counts.get(room.as_str()).copied().unwrap_or(0);
                (room, (h.seq - n, h.epoch))
            })
            .collect();
        for (r, take) in batch.into_iter().zip(takes) {
            let answer = if !take {
                // An earlier send holds the claim: no position was taken.
                Ok(Next::Claimed)
            } else {
                match next.get_mut(r.room.as_str()) {
                    Some((seq, epoch)) => {
                        *seq += 1;
                        Ok(Next::Position(RoomHead {
                            seq: *seq,
                            epoch: epoch.clone(),
                        }))
                    }
                    None => Err("the database returned no position for the room".to_string()),
                }
            };
            let _ = r.reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn setup() -> (tempfile::TempDir, Store, RoomId) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("seq.db").display());
        let store = Store::connect(&url).await.expect("store");
        (dir, store, RoomId::parse("chat.seq").expect("room"))
    }

    fn key(room: &RoomId, cid: &str) -> SendKey {
        SendKey {
            room: room.clone(),
            user: "u".into(),
            cid: cid.into(),
        }
    }

    fn claim(cid: &str, id: &str) -> Option<Claim> {
        Some(Claim {
            user: "u".into(),
            cid: cid.into(),
            id: id.into(),
        })
    }

    /// The claim of `cid` as another send would find it: `Some(confirmed)`,
    /// or `None` when it is gone (the probe then holds it).
    async fn probe(store: &Store, room: &RoomId, cid: &str) -> Option<bool> {
        let found = store
            .claim_send(room, "u", cid, "probe")
            .await
            .expect("probe");
        found.map(|c| c.confirmed)
    }

    /// Waits until `cid`'s claim reads `want` (a settle needs no later send
    /// to reach the database; the bound only keeps a broken build from
    /// hanging, it is not a timing).
    async fn until(store: &Store, room: &RoomId, cid: &str, want: Option<bool>) {
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while probe(store, room, cid).await != want {
            assert!(
                tokio::time::Instant::now() < give_up,
                "{cid}: never {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_settle_reaches_the_database_with_no_send_behind_it() {
        let (_dir, store, room) = setup().await;
        let seq = Sequencer::spawn(store.clone());
        for (i, cid) in ["kept", "released"].into_iter().enumerate() {
            let next = seq.next(&room, claim(cid, &format!("m{i}"))).await;
            assert!(matches!(next, Ok(Next::Position(_))), "{next:?}");
        }
        assert_eq!(probe(&store, &room, "kept").await, Some(false));
        seq.settle(key(&room, "kept"), true).await;
        seq.settle(key(&room, "released"), false).await;
        until(&store, &room, "kept", Some(true)).await;
        // Released: gone, so the probe took it.
        until(&store, &room, "released", Some(false)).await;
    }

    #[tokio::test]
    async fn settles_ride_with_later_sends_and_go_alone_after_a_quiet_spell() {
        let (_dir, store, room) = setup().await;
        let seq = Sequencer::spawn(store.clone());
        // Steady traffic: each settle rides along with a later burst.
        for i in 0..20 {
            let cid = format!("c{i}");
            let next = seq.next(&room, claim(&cid, &format!("m{i}"))).await;
            assert!(matches!(next, Ok(Next::Position(_))), "{next:?}");
            seq.settle(key(&room, &cid), true).await;
        }
        until(&store, &room, "c19", Some(true)).await;
        for i in 0..19 {
            assert_eq!(probe(&store, &room, &format!("c{i}")).await, Some(true));
        }
        // After a quiet spell, a send and then its settle alone.
        tokio::time::sleep(SETTLE_LINGER * 5).await;
        let next = seq.next(&room, claim("late", "m-late")).await;
        assert!(matches!(next, Ok(Next::Position(_))), "{next:?}");
        tokio::time::sleep(SETTLE_LINGER * 5).await;
        seq.settle(key(&room, "late"), true).await;
        until(&store, &room, "late", Some(true)).await;
        // A retry of a kept claim is told, not given a second position.
        let again = seq.next(&room, claim("c3", "m-retry")).await;
        assert!(matches!(again, Ok(Next::Claimed)), "{again:?}");
    }

    #[tokio::test]
    async fn a_settle_queued_when_the_last_handle_goes_is_written() {
        let (_dir, store, room) = setup().await;
        let seq = Sequencer::spawn(store.clone());
        let next = seq.next(&room, claim("c", "m")).await;
        assert!(matches!(next, Ok(Next::Position(_))), "{next:?}");
        seq.settle(key(&room, "c"), true).await;
        drop(seq);
        until(&store, &room, "c", Some(true)).await;
    }
}
