//! The relay on `BUS=rabbitmq`, end to end: two instances as one chat, and the
//! durable `db-writer` queue keeping every message while persistence is down.
mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::bus::MessageBus;
use chat_relay::bus::rabbitmq::{RabbitBus, RabbitConfig};
use chat_relay::config::{Config, Role};
use chat_relay::protocol::RoomId;
use common::app::*;

fn rabbit(tag: &str) -> RabbitConfig {
    RabbitConfig {
        rabbitmq_exchange: format!("app-{tag}"),
        rabbitmq_queue_prefix: format!("app-{tag}."),
        rabbitmq_reconnect_max_ms: 500,
        ..Default::default()
    }
}

async fn bus(cfg: RabbitConfig) -> Arc<dyn MessageBus> {
    let url = cfg.amqp_url.clone();
    Arc::new(
        RabbitBus::connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {url} is unreachable: {e}")),
    )
}

fn config(db: &str, tag: &str, roles: &[Role]) -> Config {
    let mut cfg = test_config(db);
    cfg.bus.bus = BusKind::Rabbitmq;
    cfg.bus.rabbitmq = rabbit(tag);
    cfg.roles = roles.to_vec();
    cfg
}

#[tokio::test]
async fn two_instances_act_as_one_on_rabbitmq() {
    let tag = common::conformance::uniq("m");
    let db = pg_db().await;
    common::multi::two_instances_act_as_one(bus(rabbit(&tag)).await, bus(rabbit(&tag)).await, &db)
        .await;
}

#[tokio::test]
async fn gateway_crash_clients_resume_on_the_other_on_rabbitmq() {
    let tag = common::conformance::uniq("c");
    let db = pg_db().await;
    common::multi::gateway_crash_clients_resume_on_the_other(
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        &db,
    )
    .await;
}

/// Persistence stopped while N messages are sent, restarted: all N are in the
/// DB exactly once — the durable queue kept them.
#[tokio::test]
async fn persistence_stopped_then_restarted_stores_everything_once() {
    let tag = common::conformance::uniq("p");
    let db = pg_db().await;
    let gateway = spawn_app(config(&db, &tag, &[Role::Gateway])).await;
    let persist = spawn_app(config(&db, &tag, &[Role::Persist])).await;
    let room = format!("chat.{tag}");
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
    let persist = spawn_app(config(&db, &tag, &[Role::Persist])).await;
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

#[tokio::test]
async fn resume_is_a_proof_on_rabbitmq() {
    let tag = common::conformance::uniq("r");
    let db = pg_db().await;
    common::multi::resume_is_a_proof(
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn send_retries_are_published_once_on_rabbitmq() {
    let tag = common::conformance::uniq("d");
    let db = pg_db().await;
    common::multi::send_retries_are_published_once(
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        &db,
    )
    .await;
}
