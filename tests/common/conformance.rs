//! The shared conformance suite: every backend's test file calls each of these
//! with its own bus. Each function asserts the behaviour the backend documents
//! in its [`Capabilities`] — including the documented exceptions (Redis Pub/Sub
//! has no competing consumers and no redelivery) — so a backend cannot pass by
//! claiming less than it does or more than it does.
//!
//! Tests use random room and group names, so backends whose groups read old
//! messages (Kafka from the earliest offset) simply skip other tests' rooms.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::{Delivery, MessageBus, Outgoing, Priority, SubscribeOptions, Subscription};
use chat_relay::protocol::RoomId;

pub fn uniq(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new().to_string().to_lowercase())
}

pub fn room(prefix: &str) -> RoomId {
    RoomId::parse(&format!("chat.{}", uniq(prefix))).expect("valid room")
}

pub async fn publish(bus: &dyn MessageBus, room: &RoomId, body: &str) {
    bus.publish(Outgoing {
        room: room.clone(),
        payload: Bytes::from(body.to_string()),
        priority: Priority::Normal,
    })
    .await
    .expect("publish");
}

/// Receives deliveries for `rooms` until `n` arrived or `wait` passed. Deliveries
/// for other rooms are acked and skipped. Deliveries returned are *not* acked.
pub async fn recv_n(
    sub: &mut Subscription,
    rooms: &[&RoomId],
    n: usize,
    wait: Duration,
) -> Vec<Delivery> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(d)) if rooms.contains(&&d.room) => out.push(d),
            Ok(Some(d)) => {
                let _ = d.ack().await;
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}

pub async fn ack_all(ds: Vec<Delivery>) -> Vec<String> {
    let mut bodies = Vec::new();
    for d in ds {
        bodies.push(String::from_utf8_lossy(&d.payload).into_owned());
        d.ack().await.expect("ack");
    }
    bodies
}

const WAIT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(1500);

/// Publish then subscribe-receive: every message arrives once, payload intact.
pub async fn publish_subscribe(bus: &dyn MessageBus) {
    let r = room("ps");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(uniq("g")))
        .await
        .expect("subscribe");
    for i in 0..10 {
        publish(bus, &r, &format!("m{i}")).await;
    }
    let got = ack_all(recv_n(&mut sub, &[&r], 10, WAIT).await).await;
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "{}: publish/subscribe", bus.backend());
}

/// Two different groups each get every message.
pub async fn fan_out_across_groups(bus: &dyn MessageBus) {
    let r = room("fan");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(uniq("ga")))
        .await
        .expect("sub a");
    let mut b = bus
        .subscribe(SubscribeOptions::shared(uniq("gb")))
        .await
        .expect("sub b");
    for i in 0..20 {
        publish(bus, &r, &format!("m{i}")).await;
    }
    let rs = [&r];
    let (ga, gb) = tokio::join!(recv_n(&mut a, &rs, 20, WAIT), recv_n(&mut b, &rs, 20, WAIT));
    let (ga, gb) = (ack_all(ga).await, ack_all(gb).await);
    assert_eq!(ga.len(), 20, "{}: group a got {}", bus.backend(), ga.len());
    assert_eq!(ga, gb, "{}: both groups get everything", bus.backend());
}

/// Two subscriptions in one group: they share the messages (each exactly
/// once) where the backend has consumer groups; each gets all where it does
/// not (the documented Redis exception).
pub async fn competing_consumers(bus: &dyn MessageBus) {
    let n = 200;
    // Several rooms, so that key-partitioned backends spread them over members.
    let rooms: Vec<RoomId> = (0..8).map(|i| room(&format!("cc{i}x"))).collect();
    let refs: Vec<&RoomId> = rooms.iter().collect();
    let g = uniq("gc");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub a");
    let mut b = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub b");
    // A Kafka group rebalances when the second member joins; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        publish(bus, &rooms[i % rooms.len()], &format!("m{i}")).await;
    }
    let competing = bus.capabilities().competing_consumers;
    let (ga, gb) = tokio::join!(
        recv_n(&mut a, &refs, n, if competing { QUIET * 4 } else { WAIT }),
        recv_n(&mut b, &refs, n, if competing { QUIET * 4 } else { WAIT })
    );
    let (ga, gb) = (ack_all(ga).await, ack_all(gb).await);
    if competing {
        let mut all: Vec<&String> = ga.iter().chain(gb.iter()).collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(
            total,
            n,
            "{}: every message once across the group (a={}, b={})",
            bus.backend(),
            ga.len(),
            gb.len()
        );
        assert_eq!(
            all.len(),
            n,
            "{}: no message twice in a group",
            bus.backend()
        );
        assert!(
            !ga.is_empty() && !gb.is_empty(),
            "{}: both members got work (a={}, b={})",
            bus.backend(),
            ga.len(),
            gb.len()
        );
    } else {
        assert_eq!(
            ga.len(),
            n,
            "{}: without groups each subscriber gets all",
            bus.backend()
        );
        assert_eq!(
            gb.len(),
            n,
            "{}: without groups each subscriber gets all",
            bus.backend()
        );
    }
}

/// One room's messages arrive in publish order, interleaved with other rooms.
pub async fn order_per_room(bus: &dyn MessageBus) {
    let rooms: Vec<RoomId> = (0..5).map(|i| room(&format!("ord{i}x"))).collect();
    let refs: Vec<&RoomId> = rooms.iter().collect();
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(uniq("go")))
        .await
        .expect("sub");
    let per_room = 60;
    // Concurrent publishers, one per room, each sending its room in order.
    let mut tasks = Vec::new();
    for r in &rooms {
        let r = r.clone();
        tasks.push(async move {
            for i in 0..per_room {
                publish(bus, &r, &format!("{i}")).await;
            }
        });
    }
    futures::future::join_all(tasks).await;
    let got = recv_n(&mut sub, &refs, per_room * rooms.len(), WAIT).await;
    let mut seen: HashMap<RoomId, Vec<usize>> = HashMap::new();
    for d in got {
        let i: usize = String::from_utf8_lossy(&d.payload).parse().expect("number");
        seen.entry(d.room.clone()).or_default().push(i);
        d.ack().await.expect("ack");
    }
    for r in &rooms {
        let want: Vec<usize> = (0..per_room).collect();
        assert_eq!(seen.get(r), Some(&want), "{}: order in {r}", bus.backend());
    }
}

/// A delivery that is not acked comes back to the group (with a fresh member,
/// as after a crash) where the backend supports redelivery, and does not where
/// it does not.
pub async fn ack_redelivery(bus: &dyn MessageBus) {
    let r = room("redel");
    let g = uniq("gr");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub a");
    publish(bus, &r, "acked").await;
    publish(bus, &r, "dropped").await;
    let got = recv_n(&mut a, &[&r], 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}: both delivered", bus.backend());
    let mut it = got.into_iter();
    let first = it.next().expect("first");
    assert_eq!(&first.payload[..], b"acked");
    first.ack().await.expect("ack");
    // Give ack time to reach brokers that commit asynchronously.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = it.next().expect("second");
    drop(second); // never acked: the consumer "crashed"
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = bus
        .subscribe(SubscribeOptions::shared(g))
        .await
        .expect("sub b");
    let again = recv_n(
        &mut b,
        &[&r],
        1,
        if bus.capabilities().redelivery {
            WAIT
        } else {
            QUIET
        },
    )
    .await;
    let bodies: Vec<String> = again
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    if bus.capabilities().redelivery {
        assert_eq!(
            bodies,
            vec!["dropped".to_string()],
            "{}: the unacked message comes back, the acked one does not",
            bus.backend()
        );
    } else {
        assert!(
            bodies.is_empty(),
            "{}: no redelivery expected, got {bodies:?}",
            bus.backend()
        );
    }
    ack_all(again).await;
}

/// Publishing to a room nobody listens to succeeds. A shared group that exists
/// but has no member at that moment gets it later only where the backend
/// retains for absent groups (not Redis Pub/Sub: lost, and shown).
pub async fn publish_without_listener(bus: &dyn MessageBus) {
    let r = room("nobody");
    publish(bus, &r, "into-the-void").await;

    let g = uniq("gabs");
    let first = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r2 = room("absent");
    publish(bus, &r2, "while-away").await;
    let mut back = bus
        .subscribe(SubscribeOptions::shared(g))
        .await
        .expect("resub");
    let retains = bus.capabilities().retains_for_absent_groups;
    let got = ack_all(recv_n(&mut back, &[&r2], 1, if retains { WAIT } else { QUIET }).await).await;
    if retains {
        assert_eq!(
            got,
            vec!["while-away".to_string()],
            "{}: kept for the absent group",
            bus.backend()
        );
    } else {
        assert!(
            got.is_empty(),
            "{}: documented as lost, but got {got:?}",
            bus.backend()
        );
    }
}

/// A dynamic (live-delivery) subscription receives only the rooms it added,
/// and stops receiving a room once removed. Two instance groups each get all.
pub async fn dynamic_rooms(bus: &dyn MessageBus) {
    let (ra, rb) = (room("dyna"), room("dynb"));
    let mut s1 = bus
        .subscribe(SubscribeOptions::instance(uniq("inst")))
        .await
        .expect("sub1");
    let mut s2 = bus
        .subscribe(SubscribeOptions::instance(uniq("inst")))
        .await
        .expect("sub2");
    s1.interest.add_room(&ra).await.expect("add");
    s2.interest.add_room(&ra).await.expect("add");
    s2.interest.add_room(&rb).await.expect("add");
    publish(bus, &rb, "b1").await;
    publish(bus, &ra, "a1").await;
    let g1 = ack_all(recv_n(&mut s1, &[&ra, &rb], 2, QUIET * 2).await).await;
    let g2 = ack_all(recv_n(&mut s2, &[&ra, &rb], 2, WAIT).await).await;
    assert_eq!(
        g1,
        vec!["a1".to_string()],
        "{}: only the added room",
        bus.backend()
    );
    let mut g2s = g2.clone();
    g2s.sort();
    assert_eq!(
        g2s,
        vec!["a1".to_string(), "b1".to_string()],
        "{}: instance groups each get all",
        bus.backend()
    );
    s1.interest.remove_room(&ra).await.expect("remove");
    publish(bus, &ra, "a2").await;
    let g1 = ack_all(recv_n(&mut s1, &[&ra], 1, QUIET).await).await;
    assert!(
        g1.is_empty(),
        "{}: removed room still delivered: {g1:?}",
        bus.backend()
    );
    let g2 = ack_all(recv_n(&mut s2, &[&ra], 1, WAIT).await).await;
    assert_eq!(g2, vec!["a2".to_string()]);
}

/// [`Delivery::ack_batch`] settles exactly the batch it is given. A whole
/// batch is acked at once; then, where an ack is selective, a batch with a
/// hole — one delivery the worker still holds — is acked around it, and
/// after a crash only the held delivery comes back. Where an ack is a
/// position (Kafka's offset; other tests' rooms share the partitions, and
/// acking one of their messages commits past anything held before it) the
/// second batch is acked whole and nothing comes back.
pub async fn batch_ack(bus: &dyn MessageBus) {
    let r = room("batch");
    let g = uniq("gb");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub a");
    for i in 0..3 {
        publish(bus, &r, &format!("m{i}")).await;
    }
    let first = recv_n(&mut a, &[&r], 3, WAIT).await;
    assert_eq!(first.len(), 3, "{}: first batch delivered", bus.backend());
    Delivery::ack_batch(first).await.expect("ack first batch");
    for i in 3..9 {
        publish(bus, &r, &format!("m{i}")).await;
    }
    let mut second = recv_n(&mut a, &[&r], 6, WAIT).await;
    assert_eq!(second.len(), 6, "{}: second batch delivered", bus.backend());
    let selective = bus.capabilities().selective_ack;
    // Hold m5 (the third of the batch) back where an ack settles just its
    // delivery.
    let held = selective.then(|| second.remove(2));
    if let Some(h) = &held {
        assert_eq!(&h.payload[..], b"m5");
    }
    Delivery::ack_batch(second).await.expect("ack second batch");
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(a); // the member "crashed" (holding m5)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = bus
        .subscribe(SubscribeOptions::shared(g))
        .await
        .expect("sub b");
    // Dropped only once another member pulls: on nats-server 2.9.10 a nak
    // that finds only the dead member's pull request pending also brings
    // back m8, acked (even with a confirmed double ack) — a server-side
    // duplicate this test is not about.
    drop(held);
    let want: Vec<String> = if bus.capabilities().redelivery && selective {
        vec!["m5".to_string()]
    } else {
        Vec::new()
    };
    let mut got = ack_all(recv_n(&mut b, &[&r], want.len(), WAIT).await).await;
    // Nothing else comes back: no acked delivery, no second copy.
    got.extend(ack_all(recv_n(&mut b, &[&r], 1, QUIET * 2).await).await);
    assert_eq!(
        got,
        want,
        "{}: exactly the unacked deliveries come back",
        bus.backend()
    );
}

/// Where a backend reports consumer lag (`/metrics`' `bus_consumer_lag`), it
/// counts what the group has not acked: messages handed to a member and not
/// acked are not consumed (a member that dies holding them has not stored
/// them). After the acks it comes back to 0. Backends without lag (Redis
/// Pub/Sub, RabbitMQ) have nothing to check.
pub async fn lag_counts_unacked(bus: &dyn MessageBus) {
    let Some(lag) = bus.consumer_lag() else {
        return;
    };
    let r = room("lag");
    let g = uniq("gl");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .expect("sub");
    for i in 0..3 {
        publish(bus, &r, &format!("m{i}")).await;
    }
    let got = recv_n(&mut a, &[&r], 3, WAIT).await;
    assert_eq!(got.len(), 3, "{}: delivered", bus.backend());
    assert_eq!(
        lag.lag(&g).await,
        Some(3),
        "{}: handed out and not acked is lag",
        bus.backend()
    );
    ack_all(got).await;
    // Some backends apply acks later (Kafka commits stored offsets every
    // 500 ms; a JetStream ack is a fire-and-forget publish).
    let what = format!("{}: lag 0 once all are acked", bus.backend());
    super::app::eventually(WAIT, &what, || {
        let g = g.clone();
        async move { lag.lag(&g).await == Some(0) }
    })
    .await;
}

/// Runs the whole suite.
pub async fn run_all(bus: &dyn MessageBus) {
    publish_subscribe(bus).await;
    fan_out_across_groups(bus).await;
    competing_consumers(bus).await;
    order_per_room(bus).await;
    ack_redelivery(bus).await;
    publish_without_listener(bus).await;
    dynamic_rooms(bus).await;
    batch_ack(bus).await;
    lag_counts_unacked(bus).await;
}

/// Declares one `#[tokio::test]` per conformance function for a backend;
/// `$bus` is an async expression that builds a fresh bus for each test.
#[macro_export]
macro_rules! conformance_tests {
    ($bus:expr) => {
        #[tokio::test]
        async fn publish_subscribe() {
            common::conformance::publish_subscribe(&$bus).await
        }
        #[tokio::test]
        async fn fan_out_across_groups() {
            common::conformance::fan_out_across_groups(&$bus).await
        }
        #[tokio::test]
        async fn competing_consumers() {
            common::conformance::competing_consumers(&$bus).await
        }
        #[tokio::test]
        async fn order_per_room() {
            common::conformance::order_per_room(&$bus).await
        }
        #[tokio::test]
        async fn ack_redelivery() {
            common::conformance::ack_redelivery(&$bus).await
        }
        #[tokio::test]
        async fn publish_without_listener() {
            common::conformance::publish_without_listener(&$bus).await
        }
        #[tokio::test]
        async fn dynamic_rooms() {
            common::conformance::dynamic_rooms(&$bus).await
        }
        #[tokio::test]
        async fn batch_ack() {
            common::conformance::batch_ack(&$bus).await
        }
        #[tokio::test]
        async fn lag_counts_unacked() {
            common::conformance::lag_counts_unacked(&$bus).await
        }
    };
}
