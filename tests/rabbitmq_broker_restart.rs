//! RabbitMQ stopped and started under a running relay (`rabbitmqctl
//! stop_app` / `start_app`: every connection drops, durable queues and
//! persistent messages stay): `/readyz` goes 503, sends meanwhile are answered
//! `bus_unavailable`, and afterwards the relay has reconnected, redeclared its
//! topology and re-bound its rooms by itself — live delivery resumes and the
//! persistence queue stores every acked message once. Its own test binary, so
//! no other RabbitMQ test runs while the broker is down.
mod common;

use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::config::Role;
use chat_relay::protocol::RoomId;
use common::app::*;

fn rabbitmqctl(cmd: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .arg(cmd)
        .output()
        .expect("rabbitmqctl must be installed (scripts/services.sh)");
    assert!(
        out.status.success(),
        "rabbitmqctl {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the app again even if the test fails half-way.
struct StartOnDrop;
impl Drop for StartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

#[tokio::test]
async fn broker_stopped_and_started_under_the_relay() {
    let db = pg_db().await;
    let tag = common::conformance::uniq("rr");
    let mut cfg = test_config(&db);
    cfg.bus.bus = BusKind::Rabbitmq;
    cfg.bus.rabbitmq.rabbitmq_exchange = format!("test-{tag}");
    cfg.bus.rabbitmq.rabbitmq_queue_prefix = format!("test-{tag}.");
    cfg.bus.rabbitmq.rabbitmq_reconnect_max_ms = 500;
    cfg.persist.group = format!("db-writer-{tag}");
    cfg.analytics.group = format!("analytics-{tag}");
    cfg.limits.publish_timeout_ms = 3000;
    cfg.roles = vec![Role::Gateway, Role::Persist];
    let app = spawn_app(cfg).await;
    let room = "chat.rabbitrestart";
    let mut c = app.client("rose").await;
    c.join(room, None).await;
    c.say(room, "before").await;
    // Both the confirm (ack) and the delivery: RabbitMQ may deliver a
    // persistent message before it confirms it to the publisher.
    let (mut ack, mut msg) = (false, false);
    while !(ack && msg) {
        let v = c.recv().await;
        ack |= v["type"] == "ack";
        msg |= v["type"] == "message" && v["text"] == "before";
    }

    let _guard = StartOnDrop;
    rabbitmqctl("stop_app");
    eventually(Duration::from_secs(15), "readyz 503", || async {
        app.get_json("/readyz").await.0 == 503
    })
    .await;
    let cid = c.say(room, "while down").await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["cid"].as_str()),
        (Some("bus_unavailable"), Some(cid.as_str())),
        "{e}"
    );
    rabbitmqctl("start_app");
    eventually(Duration::from_secs(60), "readyz 200", || async {
        app.get_json("/readyz").await.0 == 200
    })
    .await;
    let mut acked = vec![];
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            c.say(room, "after").await;
            while let Some(v) = c.try_recv(Duration::from_millis(500)).await {
                if v["type"] == "ack" {
                    acked.push(v["id"].as_str().unwrap_or_default().to_string());
                }
                if v["type"] == "message" && v["text"] == "after" {
                    return v;
                }
            }
        }
    })
    .await
    .expect("live delivery resumes: the room was re-bound");
    assert_eq!(got["user"], "rose");
    let store = app.store.clone();
    let room_id = RoomId::parse(room).unwrap();
    eventually(Duration::from_secs(30), "acked messages stored", || {
        let (store, room_id, acked) = (store.clone(), room_id.clone(), acked.clone());
        async move {
            let rows = store.history(&room_id, None, 500).await.unwrap_or_default();
            rows.iter().any(|m| m.text == "before")
                && acked.iter().all(|id| rows.iter().any(|m| &m.id == id))
        }
    })
    .await;
    let rows = store.history(&room_id, None, 500).await.unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|m| m.id.as_str()).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicates");
    app.stop().await;
}
