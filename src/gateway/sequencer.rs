//! Room positions and `cid` claims with group commit. Every send needs its
//! room's next position ([`Store::take_seqs`]) before it is published, and
//! the counter must be durable — one commit (a WAL flush) per message would
//! cap the relay at the disk's flush rate. So requests queue here and one
//! task takes every queued request at once: the burst's dedupe claims in one
//! statement ([`Store::claim_sends`]), then the positions of the new ones in
//! one transaction. A burst of sends costs two statements, and an idle relay
//! answers a lone send after two round trips. The [`Settler`] does the same
//! for the claims' outcomes after the bus answered.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::RoomId;
use crate::store::{NewClaim, RoomHead, SendKey, Store};

/// Most requests answered by one transaction.
const MAX_BATCH: usize = 1024;

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

/// The handle sends use; the batching task ends when the last handle is
/// dropped.
pub struct Sequencer {
    tx: mpsc::Sender<Request>,
}

impl Sequencer {
    /// Starts the batching task (needs a Tokio runtime).
    pub fn spawn(store: Store) -> Sequencer {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(store, rx));
        Sequencer { tx }
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
            .send(req)
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

async fn run(store: Store, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let batch = burst(first, &mut rx, MAX_BATCH);
        metrics::histogram!("sequencer_batch_size").record(batch.len() as f64);
        // The burst's claims first: a send whose claim is taken gets no position.
        let claims: Vec<NewClaim<'_>> = batch
            .iter()
            .filter_map(|r| {
                r.claim.as_ref().map(|c| NewClaim {
                    room: &r.room,
                    user: &c.user,
                    cid: &c.cid,
                    id: &c.id,
                })
            })
            .collect();
        let fresh = match store.claim_sends(&claims).await {
            Ok(f) => f,
            Err(e) => {
                let msg = e.to_string();
                for r in batch {
                    let _ = r.reply.send(Err(msg.clone()));
                }
                continue;
            }
        };
        let mut fresh = fresh.into_iter();
        let (batch, taken): (Vec<Request>, Vec<Request>) = batch
            .into_iter()
            .partition(|r| r.claim.is_none() || fresh.next().unwrap_or(false));
        for r in taken {
            let _ = r.reply.send(Ok(Next::Claimed));
        }
        if batch.is_empty() {
            continue;
        }
        // Positions per room, rooms in first-seen order.
        let mut index: HashMap<RoomId, usize> = HashMap::new();
        let mut counts: Vec<(RoomId, i64)> = Vec::new();
        for r in &batch {
            let i = *index.entry(r.room.clone()).or_insert_with(|| {
                counts.push((r.room.clone(), 0));
                counts.len() - 1
            });
            counts[i].1 += 1;
        }
        match store.take_seqs(&counts).await {
            Ok(heads) => {
                // Each room's first position in this batch.
                let mut next: Vec<(i64, String)> = heads
                    .into_iter()
                    .zip(&counts)
                    .map(|(h, (_, n))| (h.seq - n + 1, h.epoch))
                    .collect();
                for r in batch {
                    let Some(i) = index.get(&r.room).copied() else {
                        continue;
                    };
                    let (seq, epoch) = &mut next[i];
                    let _ = r.reply.send(Ok(Next::Position(RoomHead {
                        seq: *seq,
                        epoch: epoch.clone(),
                    })));
                    *seq += 1;
                }
            }
            Err(e) => {
                // Positions not taken: the claims just made are released so a
                // retry may publish.
                let keys: Vec<SendKey> = batch
                    .iter()
                    .filter_map(|r| {
                        r.claim.as_ref().map(|c| SendKey {
                            room: r.room.clone(),
                            user: c.user.clone(),
                            cid: c.cid.clone(),
                        })
                    })
                    .collect();
                if let Err(e) = store.settle_sends(&[], &keys).await {
                    tracing::warn!(error = %e, "send dedupe: claims not released");
                }
                let msg = e.to_string();
                for r in batch {
                    let _ = r.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

/// One claim's outcome: kept (`published`) or released.
struct Settle {
    key: SendKey,
    published: bool,
}

/// Settles `cid` claims after the bus answered, one statement per outcome
/// per burst instead of one per send. The `ack` does not wait for it; a
/// retry racing it waits for the claim like before.
pub struct Settler {
    tx: mpsc::Sender<Settle>,
}

impl Settler {
    /// Starts the batching task (needs a Tokio runtime).
    pub fn spawn(store: Store) -> Settler {
        let (tx, mut rx) = mpsc::channel::<Settle>(MAX_BATCH * 4);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let (acked, failed): (Vec<Settle>, Vec<Settle>) = burst(first, &mut rx, MAX_BATCH)
                    .into_iter()
                    .partition(|s| s.published);
                let keys = |v: Vec<Settle>| v.into_iter().map(|s| s.key).collect::<Vec<_>>();
                if let Err(e) = store.settle_sends(&keys(acked), &keys(failed)).await {
                    tracing::warn!(error = %e, "send dedupe: claims not settled");
                }
            }
        });
        Settler { tx }
    }

    /// Queues the outcome of claim `key`.
    pub async fn settle(&self, key: SendKey, published: bool) {
        if self.tx.send(Settle { key, published }).await.is_err() {
            tracing::warn!("send dedupe: the settler stopped; claim not settled");
        }
    }
}
