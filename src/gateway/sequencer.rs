//! Room positions with group commit. Every send needs its room's next
//! position ([`Store::take_seqs`]) before it is published, and the counter
//! must be durable — one commit (a WAL flush) per message would cap the relay
//! at the disk's flush rate. So requests queue here and one task takes every
//! queued request at once, in one transaction: a burst of sends costs one
//! commit, and an idle relay answers a lone send after one round trip.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::RoomId;
use crate::store::{RoomHead, Store};

/// Most requests answered by one transaction.
const MAX_BATCH: usize = 1024;

struct Request {
    room: RoomId,
    reply: oneshot::Sender<Result<RoomHead, String>>,
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

    /// The next position of `room`; positions of one room are handed out in
    /// the order of these calls.
    pub async fn next(&self, room: &RoomId) -> Result<RoomHead, String> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            room: room.clone(),
            reply,
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| "the sequencer stopped".to_string())?;
        rx.await.map_err(|_| "the sequencer stopped".to_string())?
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
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
        metrics::histogram!("sequencer_batch_size").record(batch.len() as f64);
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
                    let _ = r.reply.send(Ok(RoomHead {
                        seq: *seq,
                        epoch: epoch.clone(),
                    }));
                    *seq += 1;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in batch {
                    let _ = r.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
