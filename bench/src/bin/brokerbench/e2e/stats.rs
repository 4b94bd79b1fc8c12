//! What travels and what is counted: the bus payload (the relay's own
//! message frame, so the broker moves the same bytes) and the per-consumer
//! tallies (latency, duplicates, reordering, what was seen for the loss count).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use chat_relay::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};
use hdrhistogram::Histogram;

/// Wall-clock microseconds: publishers and consumers share this process, so
/// one clock stamps and reads the send time.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A latency histogram in µs from 1 µs to 60 s (loadgen's bounds).
pub fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: no input reaches this.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Builds the payloads of one run.
pub struct Encoder {
    tag: String,
    pad: String,
}

impl Encoder {
    /// `size` is the message *text* size, as loadgen counts it (its body is
    /// `{"r","p","s","t","x": pad}` with a pad of `size - 60`).
    pub fn new(tag: &str, size: usize) -> Self {
        Encoder {
            tag: tag.to_string(),
            pad: "x".repeat(size.saturating_sub(60)),
        }
    }

    /// The relay's bus frame (`BusEvent::Message`) around a loadgen-style body
    /// carrying run tag, publisher, sequence and send time: the broker carries
    /// what it carries behind the relay, and the consumers decode it as the
    /// relay's live consumer does.
    pub fn encode(&self, room: &RoomId, publisher: u64, seq: u64, sent_us: u64) -> Vec<u8> {
        let text = serde_json::json!({"r": self.tag, "p": publisher, "s": seq, "t": sent_us, "x": self.pad})
            .to_string();
        let ev = BusEvent::Message(ChatMessage {
            room: room.clone(),
            id: ulid::Ulid::new().to_string(),
            user: format!("p{publisher}"),
            text,
            ts: (sent_us / 1000) as i64,
            kind: MessageKind::Chat,
            seq: Some(seq as i64 + 1),
        });
        ev.to_json().into_bytes()
    }
}

/// The fields of a body the consumers read.
#[derive(serde::Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    r: std::borrow::Cow<'a, str>,
    p: u64,
    s: u64,
    t: u64,
}

/// Decodes a payload as the relay does (the typed bus event), then its body.
/// `None` for anything that is not a message of this run (`tag`).
fn decode(payload: &[u8], tag: &str) -> Option<(u64, u64, u64)> {
    let BusEvent::Message(m) = serde_json::from_slice::<BusEvent>(payload).ok()? else {
        return None;
    };
    let b: Body = serde_json::from_str(&m.text).ok()?;
    (b.r == tag).then_some((b.p, b.s, b.t))
}

/// Messages seen by one consumer: per publisher, the sequence numbers.
#[derive(Default)]
pub struct Seen(HashMap<u64, HashSet<u64>>);

impl Seen {
    /// `false` if it was seen before (a duplicate).
    fn insert(&mut self, p: u64, s: u64) -> bool {
        self.0.entry(p).or_default().insert(s)
    }
    pub fn contains(&self, p: u64, s: u64) -> bool {
        self.0.get(&p).is_some_and(|set| set.contains(&s))
    }
}

/// One live consumer's tallies. Owned by its consumer task (no locking on the
/// delivery path); `unique` is shared so the driver can see progress.
pub struct LiveStats {
    tag: String,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries that were not messages of this run (warm-up, foreign).
    pub other: u64,
    pub hist: Histogram<u64>,
    pub seen: Seen,
    last: HashMap<u64, u64>,
    pub unique: Arc<AtomicU64>,
}

impl LiveStats {
    pub fn new(tag: &str) -> Self {
        LiveStats {
            tag: tag.to_string(),
            received: 0,
            duplicates: 0,
            reordered: 0,
            other: 0,
            hist: histogram(),
            seen: Seen::default(),
            last: HashMap::new(),
            unique: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One delivery: latency from the send stamp, duplicate and reorder
    /// checks per publisher (loadgen's rules).
    pub fn record(&mut self, payload: &[u8]) {
        let Some((p, s, t)) = decode(payload, &self.tag) else {
            self.other += 1;
            return;
        };
        let _ = self.hist.record(now_us().saturating_sub(t).max(1));
        self.received += 1;
        if !self.seen.insert(p, s) {
            self.duplicates += 1;
            return;
        }
        self.unique.fetch_add(1, Ordering::Relaxed);
        let last = self.last.entry(p).or_insert(s);
        if s < *last {
            self.reordered += 1;
        } else {
            *last = s;
        }
    }
}

/// One worker group's tallies (it "processes" = decodes, then acks).
pub struct WorkerStats {
    tag: String,
    pub received: u64,
    pub duplicates: u64,
    pub other: u64,
    seen: Seen,
    pub unique: Arc<AtomicU64>,
}

impl WorkerStats {
    pub fn new(tag: &str) -> Self {
        WorkerStats {
            tag: tag.to_string(),
            received: 0,
            duplicates: 0,
            other: 0,
            seen: Seen::default(),
            unique: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn record(&mut self, payload: &[u8]) {
        let Some((p, s, _)) = decode(payload, &self.tag) else {
            self.other += 1;
            return;
        };
        self.received += 1;
        if self.seen.insert(p, s) {
            self.unique.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicates += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_reorders_and_foreign_payloads() {
        let room = RoomId::parse("chat.t-0").expect("room");
        let enc = Encoder::new("run", 100);
        let mut live = LiveStats::new("run");
        for s in [0, 1, 3, 2, 3] {
            live.record(&enc.encode(&room, 7, s, now_us()));
        }
        live.record(&Encoder::new("warm", 100).encode(&room, 7, 9, now_us()));
        live.record(b"not json");
        assert_eq!(live.received, 5);
        assert_eq!(live.duplicates, 1);
        assert_eq!(live.reordered, 1);
        assert_eq!(live.other, 2);
        assert_eq!(live.unique.load(Ordering::Relaxed), 4);
        assert!(live.seen.contains(7, 2) && !live.seen.contains(7, 4));
    }

    #[test]
    fn payload_is_the_relays_frame() {
        let room = RoomId::parse("chat.t-0").expect("room");
        let bytes = Encoder::new("run", 100).encode(&room, 1, 2, 3_000_000);
        let ev: BusEvent = serde_json::from_slice(&bytes).expect("bus event");
        assert_eq!(ev.room(), &room);
        assert_eq!(decode(&bytes, "run"), Some((1, 2, 3_000_000)));
        assert_eq!(decode(&bytes, "other"), None);
    }
}
