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
    let _clean = common::rabbit::Cleanup::new(format!("test-{tag}"));
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
    say_acked_and_delivered(&mut c, room, "before").await;

    let _guard = StartOnDrop;
    rabbitmqctl("stop_app");
    sends_refused_while_down(&app, &mut c, room, Duration::from_secs(15)).await;
    rabbitmqctl("start_app");
    // The room was re-bound: our own message returns.
    let (got, acked) = delivery_resumes(
        &app,
        &mut c,
        room,
        "after",
        Duration::from_secs(60),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got["user"], "rose");
    stored_once(&app.store, room, "before", &acked).await;
    app.stop().await;
}
