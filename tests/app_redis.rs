//! The relay on `BUS=redis`, end to end: two instances as one chat, what
//! Pub/Sub loses when nobody listens (shown, not hidden), and Redis restarts.
mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_relay::bus::BusConfig;
use chat_relay::bus::MessageBus;
use chat_relay::bus::redis::{RedisBus, RedisConfig};
use chat_relay::config::{Config, Role};
use chat_relay::protocol::RoomId;
use common::app::*;

fn url() -> String {
    // The relay's own default (REDIS_URL or its clap default), written once.
    RedisConfig::default().redis_url
}

async fn bus_at(url: &str) -> Arc<dyn MessageBus> {
    Arc::new(
        RedisBus::connect(RedisConfig {
            redis_url: url.to_string(),
            redis_reconnect_max_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}")),
    )
}

fn redis_config(db: &str, url: &str, roles: &[Role]) -> Config {
    let mut cfg = test_config(db);
    cfg.bus = BusConfig {
        bus: chat_relay::bus::BusKind::Redis,
        ..cfg.bus
    };
    cfg.bus.redis.redis_url = url.to_string();
    cfg.analytics.group = common::conformance::uniq("analytics");
    cfg.roles = roles.to_vec();
    cfg
}

#[tokio::test]
async fn two_instances_act_as_one_on_redis() {
    let db = pg_db().await;
    common::multi::two_instances_act_as_one(bus_at(&url()).await, bus_at(&url()).await, &db).await;
}

#[tokio::test]
async fn gateway_crash_clients_resume_on_the_other_on_redis() {
    let db = pg_db().await;
    common::multi::gateway_crash_clients_resume_on_the_other(
        bus_at(&url()).await,
        bus_at(&url()).await,
        &db,
    )
    .await;
}

async fn send(c: &mut Client, room: &str, label: &str) {
    for i in 0..5 {
        c.say(room, &format!("{label}{i}")).await;
        c.recv_type("ack").await;
    }
}

/// Redis Pub/Sub keeps nothing for absent listeners: messages sent while the
/// persistence role is stopped never reach the DB, although clients got `ack`s.
#[tokio::test]
async fn messages_published_while_persistence_is_stopped_are_lost() {
    let (_d, db) = sqlite_db();
    let gateway = spawn_app(redis_config(&db, &url(), &[Role::Gateway])).await;
    let persist = spawn_app(redis_config(&db, &url(), &[Role::Persist])).await;
    let room = format!("chat.{}", common::conformance::uniq("loss"));
    let room_id = RoomId::parse(&room).unwrap();
    let mut c = gateway.client("lossy").await;
    c.join(&room, None).await;
    send(&mut c, &room, "before").await;
    let store = gateway.store.clone();
    let count = || {
        let (store, room_id) = (store.clone(), room_id.clone());
        async move { store.count_messages(Some(&room_id)).await.unwrap() }
    };
    eventually(Duration::from_secs(10), "first 5 stored", || async {
        count().await == 5
    })
    .await;

    persist.stop().await;
    send(&mut c, &room, "during").await; // acked by Redis, heard by nobody durable
    let persist = spawn_app(redis_config(&db, &url(), &[Role::Persist])).await;
    send(&mut c, &room, "after").await;
    eventually(Duration::from_secs(10), "last 5 stored", || async {
        count().await >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = store.after(&room_id, "", 100).await.unwrap();
    let texts: Vec<&str> = rows.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts.len(), 10, "{texts:?}");
    assert!(
        texts.iter().all(|t| !t.starts_with("during")),
        "Pub/Sub lost them: {texts:?}"
    );
    gateway.stop().await;
    persist.stop().await;
}

/// Redis restarted under a running relay: `/readyz` goes 503, sends get
/// `bus_unavailable` (never silence), and after Redis is back the relay has
/// re-subscribed its rooms and chat works again.
#[tokio::test]
async fn redis_restart_under_the_relay() {
    let mut server = common::redis_server::RedisServer::start().await;
    let (_d, db) = sqlite_db();
    let app = spawn_app(redis_config(
        &db,
        &server.url(),
        &[Role::Gateway, Role::Persist],
    ))
    .await;
    let room = "chat.restart";
    let mut c = app.client("rita").await;
    c.join(room, None).await;
    c.say(room, "one").await;
    assert_eq!(c.recv_type("message").await["text"], "one");

    server.kill().await;
    sends_refused_while_down(&app, &mut c, room, Duration::from_secs(10)).await;
    server.restart().await;
    // Re-subscribed: our own message comes back through Redis again.
    let (got, _) = delivery_resumes(
        &app,
        &mut c,
        room,
        "back",
        Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(got["user"], "rita");
    app.stop().await;
}

#[tokio::test]
async fn resume_is_a_proof_on_redis() {
    let db = pg_db().await;
    common::multi::resume_is_a_proof(
        bus_at(&url()).await,
        bus_at(&url()).await,
        bus_at(&url()).await,
        bus_at(&url()).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn send_retries_are_published_once_on_redis() {
    let db = pg_db().await;
    common::multi::send_retries_are_published_once(bus_at(&url()).await, bus_at(&url()).await, &db)
        .await;
}

/// A gateway's own live subscription is interrupted while the other instance
/// keeps publishing: its Pub/Sub connections are killed (`CLIENT KILL TYPE
/// pubsub`) and new connections refused (`maxclients`) while three messages
/// are acked. Redis kept nothing and neither did the db-writer (its Pub/Sub
/// connection was killed too), so the gateway cannot fill the gap: its
/// client is told with a `gap` frame naming the positions — not left to miss
/// them silently — and live delivery resumes.
#[tokio::test]
async fn live_gap_is_told_on_redis() {
    let server = common::redis_server::RedisServer::start().await;
    let db = pg_db().await;
    let mut a_cfg = redis_config(&db, &server.url(), &[Role::Gateway]);
    a_cfg.limits.recovery_wait_ms = 1000;
    a_cfg.bus.redis.redis_reconnect_max_ms = 300;
    let a = spawn_app(a_cfg).await;
    let b = spawn_app(redis_config(
        &db,
        &server.url(),
        &[Role::Gateway, Role::Persist],
    ))
    .await;
    let room = "chat.livegap";
    let mut anna = a.client("anna").await;
    let mut bert = b.client("bert").await;
    anna.join(room, None).await;
    bert.join(room, None).await;
    bert.say(room, "before").await;
    let before = anna.recv_type("message").await;
    let from = before["seq"].as_i64().expect("seq");

    let admin = redis::Client::open(server.url()).expect("url");
    let mut admin = admin
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    let cmd = |args: &[&str]| {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    };
    let _: () = cmd(&["CONFIG", "SET", "maxclients", "1"])
        .query_async(&mut admin)
        .await
        .expect("maxclients");
    let _: i64 = cmd(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .query_async(&mut admin)
        .await
        .expect("client kill");
    for i in 0..3 {
        bert.say(room, &format!("missed{i}")).await;
        bert.recv_type("ack").await;
    }
    let _: () = cmd(&["CONFIG", "SET", "maxclients", "10000"])
        .query_async(&mut admin)
        .await
        .expect("maxclients");
    let gap = anna.recv_type("gap").await;
    assert_eq!(gap["room"], room, "{gap}");
    assert_eq!(gap["from_seq"].as_i64(), Some(from), "{gap}");
    assert_eq!(gap["to_seq"].as_i64(), Some(from + 3), "{gap}");
    // Live again (the gap is only told once the subscription is back).
    bert.say(room, "after").await;
    let v = next_message(&mut anna, "gap").await;
    assert_eq!(v["text"], "after", "nothing missed arrives late: {v}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn presence_is_cluster_wide_on_redis() {
    let db = pg_db().await;
    common::multi::presence_is_cluster_wide(
        bus_at(&url()).await,
        bus_at(&url()).await,
        bus_at(&url()).await,
        &db,
    )
    .await;
}
