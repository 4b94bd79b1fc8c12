//! A private nats-server (JetStream, its own `-sd` store directory on a free
//! port) SIGKILLed and restarted under a running relay: `/readyz` goes 503,
//! sends meanwhile are answered `bus_unavailable` (never silence), and once
//! the server is back the client library has reconnected and re-subscribed by
//! itself — live delivery resumes, the durable `db-writer` consumer (kept on
//! disk) stores what was acked exactly once. Its own test binary: the server
//! is private, so no other test is disturbed.
mod common;

use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::config::Role;
use common::app::*;
use common::nats::NatsServer;

#[tokio::test]
async fn server_killed_and_restarted_under_the_relay() {
    let mut server = NatsServer::start().await;
    let db = pg_db().await;
    let tag = common::conformance::uniq("nr");
    let mut cfg = test_config(&db);
    cfg.bus.bus = BusKind::Nats;
    cfg.bus.nats = common::nats::config(&tag);
    cfg.bus.nats.nats_url = server.url();
    cfg.bus.nats.nats_publish_timeout_ms = 2000;
    cfg.limits.publish_timeout_ms = 3000;
    cfg.persist.group = format!("db-writer-{tag}");
    cfg.analytics.group = format!("analytics-{tag}");
    cfg.roles = vec![Role::Gateway, Role::Persist];
    let app = spawn_app(cfg).await;
    let room = "chat.natsrestart";
    let mut c = app.client("nora").await;
    c.join(room, None).await;
    say_acked_and_delivered(&mut c, room, "before").await;

    server.kill().await;
    sends_refused_while_down(&app, &mut c, room, Duration::from_secs(15)).await;
    server.restart().await;
    // The room was re-subscribed: our own message returns.
    let (got, acked) = delivery_resumes(
        &app,
        &mut c,
        room,
        "after",
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got["user"], "nora");
    stored_once(&app.store, room, "before", &acked).await;
    app.stop().await;
}
