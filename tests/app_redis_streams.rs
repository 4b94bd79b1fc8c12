//! The relay on `BUS=redis-streams`, end to end: every cross-backend
//! scenario, the `db-writer` consumer group keeping every message while
//! persistence is down, and a live reader that resumes from its last id
//! instead of telling a gap. Each test has its own key prefix and deletes it.
mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_relay::bus::redis_streams::{RedisStreamsBus, RedisStreamsConfig};
use chat_relay::bus::{BusKind, MessageBus};
use chat_relay::config::{Config, Role};
use chat_relay::protocol::RoomId;
use common::app::*;
use common::redis_streams::{Admin, Cleanup, prefix, redis_at, url};

/// App settings: a claim idle time short enough for the tests' waits, long
/// enough that a busy worker rarely has its own entries claimed back.
fn streams(prefix: &str) -> RedisStreamsConfig {
    RedisStreamsConfig {
        redis_streams_claim_idle_ms: 3000,
        ..common::redis_streams::config(prefix)
    }
}

async fn bus(url: &str, prefix: &str) -> Arc<dyn MessageBus> {
    Arc::new(
        RedisStreamsBus::connect(redis_at(url), streams(prefix))
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}")),
    )
}

fn config(db: &str, url: &str, prefix: &str, roles: &[Role]) -> Config {
    let mut cfg = test_config(db);
    cfg.bus.bus = BusKind::RedisStreams;
    cfg.bus.redis = redis_at(url);
    cfg.bus.redis_streams = streams(prefix);
    cfg.roles = roles.to_vec();
    cfg
}

/// A fresh prefix on the shared Redis and its cleanup guard.
fn fresh(tag: &str) -> (String, Cleanup) {
    let p = prefix(tag);
    let c = Cleanup::new(&url(), &p);
    (p, c)
}

#[tokio::test]
async fn two_instances_act_as_one_on_redis_streams() {
    let (p, _clean) = fresh("m");
    let db = pg_db().await;
    common::multi::two_instances_act_as_one(bus(&url(), &p).await, bus(&url(), &p).await, &db)
        .await;
}

#[tokio::test]
async fn gateway_crash_clients_resume_on_the_other_on_redis_streams() {
    let (p, _clean) = fresh("c");
    let db = pg_db().await;
    common::multi::gateway_crash_clients_resume_on_the_other(
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn resume_is_a_proof_on_redis_streams() {
    let (p, _clean) = fresh("r");
    let db = pg_db().await;
    common::multi::resume_is_a_proof(
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn send_retries_are_published_once_on_redis_streams() {
    let (p, _clean) = fresh("d");
    let db = pg_db().await;
    common::multi::send_retries_are_published_once(
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn presence_is_cluster_wide_on_redis_streams() {
    let (p, _clean) = fresh("pr");
    let db = pg_db().await;
    common::multi::presence_is_cluster_wide(
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        bus(&url(), &p).await,
        &db,
    )
    .await;
}

/// Persistence stopped while N messages are sent, restarted: all N are in the
/// DB exactly once, in order — the `db-writer` group kept its position.
#[tokio::test]
async fn persistence_stopped_then_restarted_stores_everything_once() {
    let (p, _clean) = fresh("p");
    let db = pg_db().await;
    let gateway = spawn_app(config(&db, &url(), &p, &[Role::Gateway])).await;
    let persist = spawn_app(config(&db, &url(), &p, &[Role::Persist])).await;
    let room = format!("chat.{}", common::conformance::uniq("keep"));
    let room_id = RoomId::parse(&room).unwrap();
    let mut c = gateway.client("keeper").await;
    c.join(&room, None).await;
    persist.stop().await;
    let n = 200;
    for i in 0..n {
        c.say(&room, &format!("m{i}")).await;
    }
    let mut acks = 0;
    while acks < n {
        if c.recv().await["type"] == "ack" {
            acks += 1;
        }
    }
    let store = gateway.store.clone();
    assert_eq!(
        store.count_messages(Some(&room_id)).await.unwrap(),
        0,
        "nobody persisted yet"
    );
    let persist = spawn_app(config(&db, &url(), &p, &[Role::Persist])).await;
    eventually(Duration::from_secs(30), "all rows", || {
        let (store, room_id) = (store.clone(), room_id.clone());
        async move { store.count_messages(Some(&room_id)).await.unwrap() >= n as i64 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = store.after(&room_id, "", 1000).await.unwrap();
    let texts: Vec<String> = rows.iter().map(|m| m.text.clone()).collect();
    assert_eq!(
        texts,
        (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "all, once, in order"
    );
    gateway.stop().await;
    persist.stop().await;
}

/// A gateway's live reader loses its connection while the other instance
/// keeps publishing: it is killed (`CLIENT KILL ID`, found by its
/// `CLIENT SETNAME`) and new connections are refused (`maxclients`) while
/// three messages are acked, and no db-writer runs, so the DB cannot fill
/// anything. The reader reconnects and reads on from the last id it saw: the
/// client gets exactly the three, in order, and no `gap`.
#[tokio::test]
async fn live_gap_does_not_happen_on_redis_streams() {
    let server = common::redis_server::RedisServer::start().await;
    let p = prefix("g");
    let db = pg_db().await;
    let a = spawn_app(config(&db, &server.url(), &p, &[Role::Gateway])).await;
    let b = spawn_app(config(&db, &server.url(), &p, &[Role::Gateway])).await;
    let room = "chat.livegap";
    let mut anna = a.client("anna").await;
    let mut bert = b.client("bert").await;
    anna.join(room, None).await;
    bert.join(room, None).await;
    bert.say(room, "before").await;
    assert_eq!(anna.recv_type("message").await["text"], "before");

    let mut adm = Admin::connect(&server.url()).await;
    adm.kill_and_lock_out(&format!("chat-relay:live:live-{}", a.instance))
        .await;
    for i in 0..3 {
        bert.say(room, &format!("missed{i}")).await;
        bert.recv_type("ack").await;
    }
    adm.allow_connections().await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let v = next_message(&mut anna, "gap").await;
        got.push(v["text"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got, ["missed0", "missed1", "missed2"]);
    bert.say(room, "after").await;
    let v = next_message(&mut anna, "gap").await;
    assert_eq!(v["text"], "after", "exactly once: {v}");
    a.stop().await;
    b.stop().await;
}
