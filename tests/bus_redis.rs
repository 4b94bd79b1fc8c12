//! The conformance suite and Redis-specific behaviour on a real Redis
//! (`REDIS_URL`, default 127.0.0.1:6379). An unreachable Redis fails the tests.
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::redis::{RedisBus, RedisConfig};
use chat_relay::bus::{Leases, MessageBus, Outgoing, Priority, SubscribeOptions};
use chat_relay::protocol::RoomId;
use common::conformance as c;
use futures::StreamExt;

fn url() -> String {
    // The relay's own default (REDIS_URL or its clap default), written once.
    RedisConfig::default().redis_url
}

async fn bus() -> RedisBus {
    RedisBus::connect(RedisConfig {
        redis_url: url(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("Redis at {} is unreachable: {e}", url()))
}

conformance_tests!(bus().await);

#[tokio::test]
async fn channels_follow_the_original_design() {
    let bus = bus().await;
    let client = redis::Client::open(url()).unwrap();
    let mut raw = client.get_async_pubsub().await.unwrap();
    let name = c::uniq("n");
    raw.subscribe(format!("chatroom.{name}")).await.unwrap();
    raw.subscribe(format!("aichat.{name}")).await.unwrap();
    for room in [format!("chat.{name}"), format!("ai.{name}")] {
        bus.publish(Outgoing {
            room: RoomId::parse(&room).unwrap(),
            payload: Bytes::from(format!(r#"{{"room":"{room}"}}"#)),
            priority: Priority::Normal,
        })
        .await
        .unwrap();
    }
    let mut stream = raw.on_message();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        got.push((
            m.get_channel_name().to_string(),
            String::from_utf8(m.get_payload_bytes().to_vec()).unwrap(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (
                format!("chatroom.{name}"),
                format!(r#"{{"room":"chat.{name}"}}"#)
            ),
            (
                format!("aichat.{name}"),
                format!(r#"{{"room":"ai.{name}"}}"#)
            ),
        ]
    );
    drop(stream);
    // And a raw PUBLISH by another program reaches a relay subscriber.
    let mut sub = bus
        .subscribe(SubscribeOptions::instance(c::uniq("i")))
        .await
        .unwrap();
    let room = RoomId::parse(&format!("chat.{name}z")).unwrap();
    sub.interest.add_room(&room).await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("chatroom.{name}z"))
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.room, &d.payload[..]), (room, &b"hello"[..]));
}

#[tokio::test]
async fn lease_has_one_holder() {
    let bus = bus().await;
    let name = c::uniq("lease");
    let ttl = Duration::from_millis(600);
    assert!(bus.acquire_lease(&name, "a", ttl).await.unwrap());
    assert!(!bus.acquire_lease(&name, "b", ttl).await.unwrap());
    assert!(
        bus.acquire_lease(&name, "a", ttl).await.unwrap(),
        "the holder renews"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        bus.acquire_lease(&name, "b", ttl).await.unwrap(),
        "expired: another takes it"
    );
    assert!(!bus.acquire_lease(&name, "a", ttl).await.unwrap());
}

/// Redis goes away and comes back: publishes fail fast while it is down,
/// `ready()` reports it, and the subscription re-subscribes its rooms.
#[tokio::test]
async fn redis_restart_reconnects_and_resubscribes() {
    let mut server = common::redis_server::RedisServer::start().await;
    let bus = Arc::new(
        RedisBus::connect(RedisConfig {
            redis_url: server.url(),
            redis_reconnect_max_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let room = c::room("restart");
    let mut sub = bus
        .subscribe(SubscribeOptions::instance(c::uniq("i")))
        .await
        .unwrap();
    sub.interest.add_room(&room).await.unwrap();
    c::publish(bus.as_ref(), &room, "before").await;
    assert_eq!(&sub.next().await.unwrap().payload[..], b"before");

    server.kill().await;
    let t = std::time::Instant::now();
    assert!(bus.ready().await.is_err(), "ready() must report the outage");
    let r = bus
        .publish(Outgoing {
            room: room.clone(),
            payload: Bytes::from("lost"),
            priority: Priority::Normal,
        })
        .await;
    assert!(
        r.is_err(),
        "publish while Redis is down must fail, not hang or pretend"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "failures are fast");

    server.restart().await;
    common::app::eventually(Duration::from_secs(20), "ready again", || {
        let bus = bus.clone();
        async move { bus.ready().await.is_ok() }
    })
    .await;
    // Re-subscribed: a publish after recovery arrives (retry until the subscription is back).
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let _ = bus
                .publish(Outgoing {
                    room: room.clone(),
                    payload: Bytes::from("after"),
                    priority: Priority::Normal,
                })
                .await;
            if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await
            {
                return d;
            }
        }
    })
    .await
    .expect("the subscription comes back");
    assert_eq!(&got.payload[..], b"after");
}
