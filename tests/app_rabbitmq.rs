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
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
    let db = pg_db().await;
    common::multi::two_instances_act_as_one(bus(rabbit(&tag)).await, bus(rabbit(&tag)).await, &db)
        .await;
}

#[tokio::test]
async fn gateway_crash_clients_resume_on_the_other_on_rabbitmq() {
    let tag = common::conformance::uniq("c");
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
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
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
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
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
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
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
    let db = pg_db().await;
    common::multi::send_retries_are_published_once(
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        &db,
    )
    .await;
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/services.sh)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of its own, deleted at the end (even on panic), so its connection
/// limit touches no other test.
struct Vhost(String);

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

/// A gateway's own live queue is lost while the other instance keeps
/// publishing: its live connection is closed and new connections to the
/// vhost refused (`max-connections: 0`) while three messages are acked, so
/// they are routed to no live queue of that gateway. The durable `db-writer`
/// queue kept them; once the gateway's live subscription is back it catches
/// up from the DB: its client gets exactly the three, in room order, and no
/// `gap`.
#[tokio::test]
async fn live_gap_is_filled_on_rabbitmq() {
    let tag = common::conformance::uniq("g");
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
    let vhost = Vhost(format!("gap-{tag}"));
    rabbitmqctl(&["add_vhost", &vhost.0]);
    rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"]);
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0);
    let db = pg_db().await;
    let mut a_cfg = config(&db, &tag, &[Role::Gateway]);
    a_cfg.bus.rabbitmq.amqp_url = url.clone();
    let mut b_cfg = config(&db, &tag, &[Role::Gateway, Role::Persist]);
    b_cfg.bus.rabbitmq.amqp_url = url;
    let a = spawn_app(a_cfg).await;
    let b = spawn_app(b_cfg).await;
    let room = "chat.livegap";
    let mut anna = a.client("anna").await;
    let mut bert = b.client("bert").await;
    anna.join(room, None).await;
    bert.join(room, None).await;
    bert.say(room, "before").await;
    assert_eq!(anna.recv_type("message").await["text"], "before");

    rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        &vhost.0,
        r#"{"max-connections": 0}"#,
    ]);
    let list = rabbitmqctl(&[
        "list_connections",
        "-q",
        "-p",
        &vhost.0,
        "pid",
        "client_properties",
    ]);
    let live = format!("live-{}", a.instance);
    let pids: Vec<&str> = list
        .lines()
        .filter(|l| l.contains(&live))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(pids.len(), 1, "gateway A's live connection: {list}");
    rabbitmqctl(&["close_connection", pids[0], "test: live queue lost"]);
    send_missed_and_stored(&mut bert, &b.store, room, 3, 4).await;
    rabbitmqctl(&["clear_vhost_limits", "-p", &vhost.0]);
    // The DB had them: no `gap`.
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

#[tokio::test]
async fn presence_is_cluster_wide_on_rabbitmq() {
    let tag = common::conformance::uniq("pr");
    let _clean = common::rabbit::Cleanup::new(format!("app-{tag}"));
    let db = pg_db().await;
    common::multi::presence_is_cluster_wide(
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        bus(rabbit(&tag)).await,
        &db,
    )
    .await;
}
