//! The conformance suite and JetStream-specific behaviour on the real server
//! (`NATS_URL`, default nats://127.0.0.1:4222, JetStream enabled). Each test
//! has its own stream, subject prefix and consumer names, and deletes its
//! stream. An unreachable server fails the tests.
mod common;

use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::{MessageBus, Outgoing, Priority, SubscribeOptions};
use common::conformance as c;

async fn bus() -> common::nats::CleanBus {
    common::nats::CleanBus::new(common::nats::config(&c::uniq("t"))).await
}

conformance_tests!(bus().await);

fn chat_payload(room: &chat_relay::protocol::RoomId, id: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"message","room":"{room}","id":"{id}","user":"u","text":"{id}","ts":1,"kind":"chat"}}"#
    ))
}

/// A chat message published twice (a retry after a lost ack) is stored once:
/// the second publish carries the same `Nats-Msg-Id` and the server drops it
/// within its duplicate window. Presence-like payloads without an id are not
/// deduplicated.
#[tokio::test]
async fn retried_publish_is_stored_once() {
    let bus = bus().await;
    let room = c::room("dup");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(c::uniq("g")))
        .await
        .unwrap();
    for id in ["m1", "m1", "m2"] {
        bus.publish(Outgoing {
            room: room.clone(),
            payload: chat_payload(&room, id),
            priority: Priority::Normal,
        })
        .await
        .expect("stored");
    }
    for _ in 0..2 {
        c::publish(&bus, &room, "no-id").await;
    }
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 5, Duration::from_secs(3)).await).await;
    let ids: Vec<String> = got
        .iter()
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(p)
                .ok()
                .and_then(|v| v["id"].as_str().map(String::from))
                .unwrap_or_else(|| p.clone())
        })
        .collect();
    assert_eq!(ids, ["m1", "m2", "no-id", "no-id"]);
}

/// A worker that dies holding unacked deliveries (its process is gone, no
/// nak is sent): another member of the group gets them after `ack_wait`,
/// flagged as redelivered.
#[tokio::test]
async fn deliveries_of_a_dead_worker_come_back_after_ack_wait() {
    let tag = c::uniq("w");
    let cfg = common::nats::config(&tag);
    let _clean = common::nats::Cleanup::new(&cfg);
    let dying = common::nats::connect(cfg.clone()).await;
    let bus = common::nats::connect(cfg.clone()).await;
    let g = c::uniq("dies");
    let room = c::room("dies");
    let mut a = dying
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    for i in 0..10 {
        c::publish(&bus, &room, &format!("m{i}")).await;
    }
    let held = c::recv_n(&mut a, &[&room], 10, Duration::from_secs(10)).await;
    assert_eq!(held.len(), 10);
    assert!(held.iter().all(|d| !d.redelivered));
    // The process "dies": its connection goes away, nothing is nacked.
    std::mem::forget(held);
    dying.close().await;
    drop(a);
    drop(dying);
    let started = std::time::Instant::now();
    let mut b = bus.subscribe(SubscribeOptions::shared(g)).await.unwrap();
    let again = c::recv_n(&mut b, &[&room], 10, Duration::from_secs(20)).await;
    assert_eq!(again.len(), 10, "all unacked messages redelivered to b");
    assert!(
        again.iter().all(|d| d.redelivered),
        "flagged as redelivered"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(cfg.nats_ack_wait_ms / 2),
        "they came back with ack_wait, not before: {:?}",
        started.elapsed()
    );
    let mut bodies = c::ack_all(again).await;
    bodies.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
    assert_eq!(bodies, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// The lag of a group is what it has not acked yet: not yet delivered, or
/// delivered and not acked (as Kafka counts end minus committed).
#[tokio::test]
async fn consumer_lag_counts_unacked() {
    let bus = bus().await;
    let g = c::uniq("lag");
    drop(
        bus.subscribe(SubscribeOptions::shared(g.clone()))
            .await
            .unwrap(),
    );
    let room = c::room("lag");
    for i in 0..7 {
        c::publish(&bus, &room, &format!("m{i}")).await;
    }
    // Counted whether or not the dropped member's still-open pull request got
    // one of them (then it is ack-pending, not pending, until it comes back).
    let lag = bus.consumer_lag().expect("nats reports lag");
    assert_eq!(lag.lag(&g).await, Some(7));
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 7, Duration::from_secs(15)).await).await;
    assert_eq!(got.len(), 7);
    // An ack is a fire-and-forget publish: wait for the server to apply all 7.
    common::app::eventually(Duration::from_secs(5), "lag 0 once all 7 are acked", || {
        let g = g.clone();
        async move { lag.lag(&g).await == Some(0) }
    })
    .await;
}
