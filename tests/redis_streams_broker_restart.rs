//! A private `redis-server` with an AOF (`appendfsync always`: every XADD is
//! on disk before Redis answers) SIGKILLed and restarted under a running
//! relay: `/readyz` goes 503, sends meanwhile are answered
//! `bus_unavailable`, and afterwards the producer, the live reader and the
//! `db-writer` group recover by themselves — live delivery resumes and every
//! acked message is stored once.
mod common;

use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::config::Role;
use common::app::*;
use common::redis_streams::{config, prefix, redis_at};

#[tokio::test]
async fn redis_killed_and_restarted_under_the_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut server = common::redis_server::RedisServer::start_with(&[
        "--dir",
        &dir_s,
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await;
    let db = pg_db().await;
    let mut cfg = test_config(&db);
    cfg.bus.bus = BusKind::RedisStreams;
    cfg.bus.redis = redis_at(&server.url());
    cfg.bus.redis_streams = config(&prefix("rr"));
    cfg.limits.publish_timeout_ms = 3000;
    cfg.roles = vec![Role::Gateway, Role::Persist];
    let app = spawn_app(cfg).await;
    let room = "chat.streamsrestart";
    let mut c = app.client("rosa").await;
    c.join(room, None).await;
    say_acked_and_delivered(&mut c, room, "before").await;

    server.kill().await;
    sends_refused_while_down(&app, &mut c, room, Duration::from_secs(15)).await;
    server.restart().await;
    let (got, acked) = delivery_resumes(
        &app,
        &mut c,
        room,
        "after",
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got["user"], "rosa");
    stored_once(&app.store, room, "before", &acked).await;
    app.stop().await;
}
